# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Convolution kernels, two algorithms (the backend's Python module says which serves what).

Direct (stride 1, on CPUs with AVX2 or AVX-512): each unit of work (an image, or a band of its output rows)
copies its input rows, zero-padded, into a per-thread buffer; every output pixel is then a fixed set of taps
of that buffer at fixed offsets, and register tiles of direct_conv.h (4-8 output channels x 12-48 pixels)
accumulate them without any column matrix. The stride-1 input gradient is a forward convolution with the
flipped kernel; the weight gradient sums tiles of channels x taps over each unit's rows.

im2col + GEMM (any convolution): im2col of a block of work into a per-thread buffer, then one GEMM per group.
A block is a few whole images, or a band of output rows of one image (so a small batch still feeds every
core). Blocks run in parallel under OpenMP, each calling single-threaded BLAS (scipy.linalg.cython_blas).

How the work is cut depends on the shape only, never on the thread count, and every reduction (the weight
gradient's sum over the batch) adds fixed partials in a fixed order: the results are bitwise identical
whatever the number of threads.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stddef cimport ptrdiff_t
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

from openmp_shim cimport FASTCONV_OPENMP, omp_get_max_threads, omp_get_thread_num

cdef extern from "direct_conv.h" nogil:
    int direct_select(const char* name)
    const char* direct_isa_name()
    int direct_channels()
    int direct_width(int is_double)
    void direct_tile_float(const float* x, ptrdiff_t channel_stride, int channels, const ptrdiff_t* taps,
                           int n_taps, const float* w, float* out)
    void direct_tile_double(const double* x, ptrdiff_t channel_stride, int channels, const ptrdiff_t* taps,
                            int n_taps, const double* w, double* out)
    int WEIGHT_TAPS
    void direct_weight_float(const float* gy, ptrdiff_t gy_channel_stride, const float* band, ptrdiff_t band_row,
                             const ptrdiff_t* taps, int rows, int width, float* out)
    void direct_weight_double(const double* gy, ptrdiff_t gy_channel_stride, const double* band,
                              ptrdiff_t band_row, const ptrdiff_t* taps, int rows, int width, double* out)

OPENMP = bool(FASTCONV_OPENMP)  # built with OpenMP; without it prange runs serially
VECTOR_ISAS = ("avx512", "avx2", "none")  # the direct path's register tiles, best first ("none": GEMM only)


def use_vector_isa(name):
    """Use the named register tiles for the direct path (VECTOR_ISAS; the best the CPU runs by default).
    Returns False, changing nothing, when the CPU cannot run them."""
    return bool(direct_select(name.encode()))


def vector_isa():
    return direct_isa_name().decode()


for _isa in VECTOR_ISAS:
    if use_vector_isa(_isa):
        break


def openmp_max_threads():
    return omp_get_max_threads()

# A block's column buffer is sized to stay in a core's L2 cache.
cdef Py_ssize_t BLOCK_BYTES = 1 << 20
# Fewer blocks than this and images are cut into row bands; also the number of weight-gradient partials.
cdef int MIN_BLOCKS = 8
# A direct unit's padded input rows are cut to stay in a core's L2 cache beside the weights.
cdef Py_ssize_t BAND_BYTES = 1 << 19


cdef struct Conv:
    int batch, channels, height, width, out_channels, kernel_h, kernel_w
    int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w
    int groups, out_h, out_w
    int group_in, group_out  # channels of one group, in and out
    int k                    # rows of a column matrix: group_in * kernel_h * kernel_w
    bint pointwise           # 1x1, stride 1, no padding: the input is its own column matrix


cdef struct Plan:
    int images     # images per block (more than one only when an image is one band)
    int bands      # row bands per image
    int band_rows  # output rows per band
    int blocks
    int columns    # the most columns a block has: the width of its buffers


cdef struct Block:
    int image, images  # images [image, image + images)
    int row, rows      # output rows [row, row + rows) of each


cdef inline int floor_div(int a, int b) noexcept nogil:
    return a // b if a >= 0 else -((-a + b - 1) // b)


cdef inline int ceil_div(int a, int b) noexcept nogil:
    return -floor_div(-a, b)


cdef inline int clamp(int a, int low, int high) noexcept nogil:
    return low if a < low else (high if a > high else a)


cdef Conv geometry(p):
    cdef Conv c
    c.batch, c.channels, c.height, c.width = p.input_shape
    c.out_channels, c.group_in, c.kernel_h, c.kernel_w = p.weight_shape
    c.stride_h, c.stride_w = p.stride
    c.pad_top, c.pad_left = p.padding[0], p.padding[2]
    c.dilation_h, c.dilation_w = p.dilation
    c.groups, c.out_h, c.out_w = p.groups, p.out_height, p.out_width
    c.group_out = c.out_channels // c.groups
    c.k = c.group_in * c.kernel_h * c.kernel_w
    c.pointwise = (c.kernel_h == 1 and c.kernel_w == 1 and p.stride == (1, 1) and p.padding == (0, 0, 0, 0))
    return c


cdef Plan make_plan(const Conv* c, Py_ssize_t itemsize):
    """Blocks of about BLOCK_BYTES of columns, at least MIN_BLOCKS of them where the batch is small."""
    cdef Plan plan
    cdef Py_ssize_t image_bytes = <Py_ssize_t>c.k * c.out_h * c.out_w * itemsize
    plan.images, plan.bands = 1, 1
    if c.pointwise or image_bytes > BLOCK_BYTES:
        plan.bands = <int>((image_bytes + BLOCK_BYTES - 1) // BLOCK_BYTES)
    else:
        plan.images = <int>max(1, min(BLOCK_BYTES // image_bytes, c.batch // MIN_BLOCKS))
    if plan.images == 1 and c.batch * plan.bands < MIN_BLOCKS:
        plan.bands = ceil_div(MIN_BLOCKS, c.batch)
    plan.band_rows = ceil_div(c.out_h, min(plan.bands, c.out_h))
    plan.bands = ceil_div(c.out_h, plan.band_rows)
    plan.blocks = ceil_div(c.batch, plan.images) * plan.bands
    plan.columns = plan.images * plan.band_rows * c.out_w
    return plan


cdef inline Block block_of(const Conv* c, const Plan* plan, int t) noexcept nogil:
    cdef Block b
    b.image = (t // plan.bands) * plan.images
    b.images = min(plan.images, c.batch - b.image)
    b.row = (t % plan.bands) * plan.band_rows
    b.rows = min(plan.band_rows, c.out_h - b.row)
    return b


cdef inline Block input_band(const Conv* c, const Plan* plan, int t, int* first, int* last) noexcept nogil:
    """Block t of the input gradient: it owns input rows [first, last) (the bands partition the input rows)
    and needs every output row whose window touches them."""
    cdef Block b = block_of(c, plan, t)
    cdef int band = t % plan.bands
    first[0] = 0 if band == 0 else clamp(b.row * c.stride_h - c.pad_top, 0, c.height)
    last[0] = c.height if band == plan.bands - 1 else clamp((b.row + b.rows) * c.stride_h - c.pad_top, 0, c.height)
    b.row = max(0, ceil_div(first[0] + c.pad_top - (c.kernel_h - 1) * c.dilation_h, c.stride_h))
    b.rows = max(0, min(c.out_h, floor_div(last[0] - 1 + c.pad_top, c.stride_h) + 1) - b.row)
    return b


cdef inline void valid_columns(const Conv* c, int kw, int* offset, int* low, int* high) noexcept nogil:
    """Output columns [low, high) whose tap kw falls inside the input row, at input column ow*sw + offset."""
    offset[0] = kw * c.dilation_w - c.pad_left
    low[0] = clamp(ceil_div(-offset[0], c.stride_w), 0, c.out_w)
    high[0] = clamp(ceil_div(c.width - offset[0], c.stride_w), low[0], c.out_w)


cdef inline void zero(floating* a, int start, int end) noexcept nogil:
    cdef int j
    for j in range(start, end):
        a[j] = 0


cdef void gemm(bint trans_a, bint trans_b, int m, int n, int k, const floating* a, int lda,
               const floating* b, int ldb, floating beta, floating* c, int ldc) noexcept nogil:
    """Row-major C = op(A) @ op(B) + beta * C, as column-major BLAS's C^T = op(B)^T @ op(A)^T."""
    cdef char transa = b'T' if trans_a else b'N'
    cdef char transb = b'T' if trans_b else b'N'
    cdef floating one = 1
    if floating is float:
        sgemm(&transb, &transa, &n, &m, &k, &one, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&transb, &transa, &n, &m, &k, &one, <double*>b, &ldb, <double*>a, &lda, &beta, c, &ldc)


cdef void im2col(const floating* x, const Conv* c, Block b, floating* col) noexcept nogil:
    """col[(ch, kh, kw), (i, r, ow)] = the input tap of output pixel (b.row + r, ow) of image i, zero in the
    padding. x points at the block's first image, at the group's first channel."""
    cdef Py_ssize_t columns = <Py_ssize_t>b.images * b.rows * c.out_w
    cdef Py_ssize_t plane = <Py_ssize_t>c.height * c.width, j
    # Stride 1 with the output as wide as the input ('same'): consecutive rows are one contiguous run.
    cdef bint runs = c.stride_h == 1 and c.stride_w == 1 and c.out_w == c.width
    cdef int ch, kh, kw, i, r, ih, ow, offset, low, high, first, end
    cdef const floating* src
    cdef floating* dst
    for ch in range(c.group_in):
        for kh in range(c.kernel_h):
            for kw in range(c.kernel_w):
                valid_columns(c, kw, &offset, &low, &high)
                dst = col + ((ch * c.kernel_h + kh) * c.kernel_w + kw) * columns
                for i in range(b.images):
                    src = x + (i * c.channels + ch) * plane + offset
                    ih = b.row * c.stride_h - c.pad_top + kh * c.dilation_h  # input row of output row r = 0
                    if runs:  # rows [first, end) are inside the input: copy them at once, then zero the edges
                        first = clamp(-ih, 0, b.rows)
                        end = clamp(c.height - ih, first, b.rows)
                        for j in range(first * c.out_w + low, (end - 1) * c.out_w + high):
                            dst[j] = src[ih * c.width + j]
                        for r in range(b.rows):
                            if r < first or r >= end:
                                zero(dst + r * c.out_w, 0, c.out_w)
                            else:
                                zero(dst + r * c.out_w, 0, low)
                                zero(dst + r * c.out_w, high, c.out_w)
                        dst += b.rows * c.out_w
                        continue
                    for r in range(b.rows):
                        if ih < 0 or ih >= c.height:
                            zero(dst, 0, c.out_w)
                        else:
                            zero(dst, 0, low)
                            for ow in range(low, high):
                                dst[ow] = src[ih * c.width + ow * c.stride_w]
                            zero(dst, high, c.out_w)
                        ih += c.stride_h
                        dst += c.out_w


cdef void col2im(const floating* col, const Conv* c, Block b, int first, int last, floating* gx) noexcept nogil:
    """The adjoint of im2col, restricted to input rows [first, last): gx += the taps of col that land there.
    Each gx element adds its terms in the fixed order (kh, kw, r)."""
    cdef Py_ssize_t columns = <Py_ssize_t>b.images * b.rows * c.out_w
    cdef Py_ssize_t plane = <Py_ssize_t>c.height * c.width
    cdef int ch, kh, kw, i, r, ih, ow, offset, low, high
    cdef const floating* src
    cdef floating* dst
    for ch in range(c.group_in):
        for kh in range(c.kernel_h):
            for kw in range(c.kernel_w):
                valid_columns(c, kw, &offset, &low, &high)
                src = col + ((ch * c.kernel_h + kh) * c.kernel_w + kw) * columns
                for i in range(b.images):
                    for r in range(b.rows):
                        ih = (b.row + r) * c.stride_h - c.pad_top + kh * c.dilation_h
                        if first <= ih < last:
                            dst = gx + (i * c.channels + ch) * plane + ih * c.width + offset
                            for ow in range(low, high):
                                dst[ow * c.stride_w] += src[ow]
                        src += c.out_w


cdef inline Py_ssize_t output_offset(const Conv* c, Block b, int g) noexcept nogil:
    """Offset of the block's first element of group g in an output-shaped array (y, grad_output)."""
    return ((<Py_ssize_t>b.image * c.out_channels + g * c.group_out) * c.out_h + b.row) * c.out_w


cdef const floating* output_rows(const floating* a, const Conv* c, Block b, int g, floating* buffer,
                                 int* ld) noexcept nogil:
    """The block's rows of group g of an output-shaped array as a (group_out, columns) matrix: in place for
    one image, else gathered into buffer."""
    cdef Py_ssize_t image_rows = <Py_ssize_t>b.rows * c.out_w, image_size = <Py_ssize_t>c.out_h * c.out_w
    cdef int co, i
    if b.images == 1:
        ld[0] = <int>image_size
        return a + output_offset(c, b, g)
    ld[0] = <int>(b.images * image_rows)
    for co in range(c.group_out):
        for i in range(b.images):
            memcpy(buffer + co * ld[0] + i * image_rows,
                   a + output_offset(c, b, g) + (i * c.out_channels + co) * image_size,
                   image_rows * sizeof(floating))
    return buffer


cdef void store_output(const floating* block_out, int ld, const floating* bias, const Conv* c, Block b, int g,
                       floating* y) noexcept nogil:
    """y's block rows of group g = block_out (+ bias); block_out may already be those rows of y."""
    cdef Py_ssize_t image_rows = <Py_ssize_t>b.rows * c.out_w, image_size = <Py_ssize_t>c.out_h * c.out_w
    cdef floating shift
    cdef floating* dst
    cdef const floating* src
    cdef int co, i
    cdef Py_ssize_t j
    for co in range(c.group_out):
        shift = bias[g * c.group_out + co] if bias != NULL else 0
        for i in range(b.images):
            dst = y + output_offset(c, b, g) + (i * c.out_channels + co) * image_size
            src = block_out + co * ld + i * image_rows
            if src == dst and bias == NULL:
                continue
            for j in range(image_rows):
                dst[j] = src[j] + shift


cdef inline const floating* group_input(const floating* x, const Conv* c, Block b, int g) noexcept nogil:
    """The block's first image at group g's first channel."""
    return x + (<Py_ssize_t>b.image * c.channels + g * c.group_in) * c.height * c.width


cdef void forward_block(const floating* x, const floating* w, const floating* bias, const Conv* c, Block b,
                        floating* y, floating* col, floating* out) noexcept nogil:
    cdef int columns = b.images * b.rows * c.out_w, g, ldb, ldc
    cdef const floating* cols
    cdef floating* target
    for g in range(c.groups):
        if c.pointwise:  # one image, and its output rows are its input rows
            cols, ldb = group_input(x, c, b, g) + b.row * c.width, c.height * c.width
        else:
            im2col(group_input(x, c, b, g), c, b, col)
            cols, ldb = col, columns
        if b.images == 1:
            target, ldc = y + output_offset(c, b, g), c.out_h * c.out_w
        else:
            target, ldc = out, columns
        gemm(False, False, c.group_out, columns, c.k, w + <Py_ssize_t>g * c.group_out * c.k, c.k,
             cols, ldb, 0, target, ldc)
        store_output(target, ldc, bias, c, b, g, y)


cdef void backward_input_block(const floating* gy, const floating* w, const Conv* c, const Plan* plan, int t,
                               floating* gx, floating* col, floating* rows) noexcept nogil:
    cdef int first, last, g, ld, i
    cdef Block b = input_band(c, plan, t, &first, &last)
    cdef int columns = b.images * b.rows * c.out_w
    cdef Py_ssize_t plane = <Py_ssize_t>c.height * c.width
    cdef const floating* gy_rows
    cdef floating* gx_image = gx + <Py_ssize_t>b.image * c.channels * plane
    if not c.pointwise:  # col2im adds into gx; pointwise GEMMs write it whole
        for i in range(b.images * c.channels):
            memset(gx_image + i * plane + first * c.width, 0, (last - first) * c.width * sizeof(floating))
        if columns == 0:  # these input rows only meet padding... of no output: their gradient is zero
            return
    for g in range(c.groups):
        gy_rows = output_rows(gy, c, b, g, rows, &ld)
        if c.pointwise:
            gemm(True, False, c.k, columns, c.group_out, w + <Py_ssize_t>g * c.group_out * c.k, c.k,
                 gy_rows, ld, 0, <floating*>group_input(gx, c, b, g) + b.row * c.width, <int>plane)
        else:
            gemm(True, False, c.k, columns, c.group_out, w + <Py_ssize_t>g * c.group_out * c.k, c.k,
                 gy_rows, ld, 0, col, columns)
            col2im(col, c, b, first, last, <floating*>group_input(gx, c, b, g))


cdef void backward_weight_chunk(const floating* gy, const floating* x, const Conv* c, const Plan* plan,
                                int first_block, int end_block, floating* partial, floating* col,
                                floating* rows) noexcept nogil:
    """partial = the weight gradient of blocks [first_block, end_block), accumulated in block order."""
    cdef int t, g, ld, ldb, columns
    cdef Block b
    cdef const floating* gy_rows
    cdef const floating* cols
    for t in range(first_block, end_block):
        b = block_of(c, plan, t)
        columns = b.images * b.rows * c.out_w
        for g in range(c.groups):
            gy_rows = output_rows(gy, c, b, g, rows, &ld)
            if c.pointwise:
                cols, ldb = group_input(x, c, b, g) + b.row * c.width, c.height * c.width
            else:
                im2col(group_input(x, c, b, g), c, b, col)
                cols, ldb = col, columns
            gemm(False, True, c.group_out, c.k, columns, gy_rows, ld, cols, ldb, 0 if t == first_block else 1,
                 partial + <Py_ssize_t>g * c.group_out * c.k, c.k)


cdef struct Direct:
    int channels               # output channels per register tile
    int width                  # output pixels per register tile
    int padded_width           # input row width with its padding: output pixel (r, ow) is at r * padded_width + ow
    int band_rows              # output rows per unit of work (an image's last band may have fewer)
    int bands                  # units per image
    int halo                   # input rows a band needs beyond its output rows
    int blocks                 # tiles of `channels` output channels per group
    int taps                   # kernel_h * kernel_w
    ptrdiff_t channel_stride   # one channel's rows in the padded buffer
    ptrdiff_t buffer           # the padded buffer, with the slack the last tile reads past its end


cdef bint direct_plan(const Conv* c, Py_ssize_t itemsize, Direct* d):
    """The direct path's cut of the work, or False when it does not serve this convolution."""
    d.channels, d.width = direct_channels(), direct_width(itemsize == 8)
    if d.width == 0 or c.stride_h != 1 or c.stride_w != 1:
        return False
    d.padded_width = c.out_w + (c.kernel_w - 1) * c.dilation_w
    d.halo = (c.kernel_h - 1) * c.dilation_h
    cdef Py_ssize_t row_bytes = <Py_ssize_t>c.group_in * d.padded_width * itemsize
    cdef int rows = ceil_div(c.out_h, ceil_div(MIN_BLOCKS, c.batch)) if c.batch < MIN_BLOCKS else c.out_h
    rows = <int>max(1, min(rows, BAND_BYTES // row_bytes - d.halo))
    d.band_rows = ceil_div(c.out_h, ceil_div(c.out_h, rows))  # bands of even height
    d.bands = ceil_div(c.out_h, d.band_rows)
    d.blocks = ceil_div(c.group_out, d.channels)
    d.taps = c.kernel_h * c.kernel_w
    d.channel_stride = <ptrdiff_t>(d.band_rows + d.halo) * d.padded_width
    d.buffer = c.group_in * d.channel_stride + d.width + (c.kernel_w - 1) * c.dilation_w
    return True


def direct_serves(p, Py_ssize_t itemsize):
    cdef Conv c = geometry(p)
    cdef Direct d
    return direct_plan(&c, itemsize, &d)


cdef void pack_weight(const floating* w, const Conv* c, const Direct* d, bint flipped, floating* packed) noexcept nogil:
    """packed[g, block, ch, tap, j] = the weight of output channel block * d.channels + j of group g (zero past
    the group's channels), as the register tiles read it. flipped: w is the weight of the convolution whose
    input gradient this is, (c.group_in, c.out_channels, kh, kw) per group: its channel axes swap and its
    taps run backwards."""
    cdef int g, block, ch, tap, j, o
    cdef Py_ssize_t source
    for g in range(c.groups):
        for block in range(d.blocks):
            for ch in range(c.group_in):
                for tap in range(d.taps):
                    for j in range(d.channels):
                        o = block * d.channels + j
                        if o >= c.group_out:
                            packed[0] = 0
                        elif flipped:
                            source = ((<Py_ssize_t>g * c.group_in + ch) * c.group_out + o) * d.taps + d.taps - 1 - tap
                            packed[0] = w[source]
                        else:
                            source = ((<Py_ssize_t>g * c.group_out + o) * c.group_in + ch) * d.taps + tap
                            packed[0] = w[source]
                        packed += 1


cdef void pad_band(const floating* x, const Conv* c, const Direct* d, int first_row, int rows,
                   floating* band) noexcept nogil:
    """band[ch, r, :] = input row first_row + r of channel ch of x (one image, one group), zero-padded to
    padded_width (stride 1: pad_left + width + pad_right); rows outside the input are zeros."""
    cdef int ch, r, ih
    cdef floating* dst
    cdef int right = d.padded_width - c.pad_left - c.width
    for ch in range(c.group_in):
        for r in range(rows):
            ih = first_row + r
            dst = band + ch * d.channel_stride + <ptrdiff_t>r * d.padded_width
            if ih < 0 or ih >= c.height:
                memset(dst, 0, d.padded_width * sizeof(floating))
                continue
            memset(dst, 0, c.pad_left * sizeof(floating))
            memcpy(dst + c.pad_left, x + (<Py_ssize_t>ch * c.height + ih) * c.width, c.width * sizeof(floating))
            memset(dst + c.pad_left + c.width, 0, right * sizeof(floating))


cdef void store_tile(const floating* tile, const Conv* c, const Direct* d, int start, int end, int channels,
                     const floating* bias, floating* y) noexcept nogil:
    """y[j, r, ow] = tile[j, q - start] (+ bias[j]) for the tile's pixels q = r * padded_width + ow in
    [start, end) with ow < out_w (the others lie in the padding columns) and its first `channels` channels.
    y points at the band's first output row of the tile's first channel."""
    cdef int j, k, q, r, run
    cdef floating shift
    cdef floating* dst
    cdef const floating* src
    for j in range(channels):
        shift = bias[j] if bias != NULL else 0
        q = start
        while q < end:  # one run of valid pixels per output row
            r = q // d.padded_width
            run = min(end, r * d.padded_width + c.out_w) - q
            dst = y + (<Py_ssize_t>j * c.out_h + r) * c.out_w + q - r * d.padded_width
            src = tile + j * d.width + q - start
            for k in range(run):
                dst[k] = src[k] + shift
            q = (r + 1) * d.padded_width


cdef void direct_unit(const floating* x, const floating* packed, const floating* bias, const Conv* c,
                      const Direct* d, const ptrdiff_t* taps, int unit, floating* y, floating* band,
                      floating* tile) noexcept nogil:
    """Output rows [row, row + rows) of one image, every channel: pad the band's input once per group, then
    for each block of d.channels channels sweep the tiles across it."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row), pixels = rows * d.padded_width
    cdef int g, block, start, channels
    cdef floating* y_block
    cdef const floating* w_block
    for g in range(c.groups):
        pad_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, row - c.pad_top,
                 rows + d.halo, band)
        for block in range(d.blocks):
            channels = min(d.channels, c.group_out - block * d.channels)
            w_block = packed + (<Py_ssize_t>g * d.blocks + block) * c.group_in * d.taps * d.channels
            y_block = y + ((<Py_ssize_t>image * c.out_channels + g * c.group_out + block * d.channels) * c.out_h
                           + row) * c.out_w
            start = 0
            while start < pixels:
                if floating is float:
                    direct_tile_float(band + start, d.channel_stride, c.group_in, taps, d.taps, w_block, tile)
                else:
                    direct_tile_double(band + start, d.channel_stride, c.group_in, taps, d.taps, w_block, tile)
                store_tile(tile, c, d, start, min(start + d.width, pixels), channels,
                           bias + g * c.group_out + block * d.channels if bias != NULL else NULL, y_block)
                start += d.width


cdef tap_offsets(const Conv* c, const Direct* d, int length):
    """Where each kernel tap (kh, kw) reads in a padded band, relative to the output pixel; `length` long,
    the taps past the real ones reading at offset 0 (their results are dropped)."""
    offsets = np.zeros(length, np.intp)
    offsets[:d.taps] = [kh * c.dilation_h * d.padded_width + kw * c.dilation_w
                        for kh in range(c.kernel_h) for kw in range(c.kernel_w)]
    return offsets


cdef void direct(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating* bias,
                 floating[:, :, :, ::1] y, const Conv* c, const Direct* d, bint flipped, int threads):
    """y = conv2d(x, w) + bias by the direct path; flipped: w is the weight of the convolution whose stride-1
    input gradient this is (params.input_gradient_as_forward)."""
    dtype = np.asarray(y).dtype
    cdef floating[::1] packed = np.empty(c.groups * d.blocks * c.group_in * d.taps * d.channels, dtype)
    pack_weight(&w[0, 0, 0, 0], c, d, flipped, &packed[0])
    cdef ptrdiff_t[::1] taps = tap_offsets(c, d, d.taps)
    # zeroed once: the slack past the band and the rows a short last band leaves stale are read by tiles
    # whose results are never stored, and must not hold signalling garbage
    cdef floating[:, ::1] workspace = np.zeros((threads, d.buffer + d.channels * d.width), dtype)
    cdef floating* band
    cdef int unit
    for unit in prange(c.batch * d.bands, nogil=True, schedule="dynamic", num_threads=threads):
        band = &workspace[omp_get_thread_num(), 0]
        direct_unit(&x[0, 0, 0, 0], &packed[0], bias, c, d, &taps[0], unit, &y[0, 0, 0, 0], band, band + d.buffer)


cdef const floating* bias_pointer(const floating[::1] bias):
    if bias is None:
        return NULL
    return &bias[0]


def forward_direct(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
                   floating[:, :, :, ::1] y, p, int threads):
    """y = conv2d(x, w) + bias (bias may be None), by the direct path."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve {p}")
    direct(x, w, bias_pointer(bias), y, &c, &d, False, threads)


def forward_gemm(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
                 floating[:, :, :, ::1] y, p, int threads):
    """y = conv2d(x, w) + bias (bias may be None), by im2col + GEMM."""
    cdef Conv c = geometry(p)
    cdef const floating* bias_ptr = bias_pointer(bias)
    cdef Plan plan = make_plan(&c, sizeof(floating))
    cdef floating[:, ::1] workspace = np.empty((threads, (c.k + c.group_out) * plan.columns), np.asarray(y).dtype)
    cdef floating* col
    cdef int t
    for t in prange(plan.blocks, nogil=True, schedule="dynamic", num_threads=threads):
        col = &workspace[omp_get_thread_num(), 0]
        forward_block(&x[0, 0, 0, 0], &w[0, 0, 0, 0], bias_ptr, &c, block_of(&c, &plan, t), &y[0, 0, 0, 0],
                      col, col + <Py_ssize_t>c.k * plan.columns)


def backward_input_direct(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w,
                          floating[:, :, :, ::1] gx, p, int threads):
    """gx = the gradient of conv2d with respect to its input, as the direct forward convolution of gy with
    the flipped kernel (stride 1, padding at most the kernel's span)."""
    cdef Conv as_forward
    cdef Direct d
    as_forward_params = p.input_gradient_as_forward()
    if as_forward_params is None:
        raise ValueError(f"the direct path does not serve the input gradient of {p}")
    as_forward = geometry(as_forward_params)
    if not direct_plan(&as_forward, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve the input gradient of {p}")
    direct(gy, w, NULL, gx, &as_forward, &d, True, threads)


def backward_input_gemm(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w, floating[:, :, :, ::1] gx,
                        p, int threads):
    """gx = the gradient of conv2d with respect to its input, by GEMM + col2im."""
    cdef Conv c = geometry(p)
    cdef Plan plan = make_plan(&c, sizeof(floating))
    cdef int first, last, t
    for t in range(plan.blocks):  # an input band's output rows reach beyond its own band (the kernel's halo)
        plan.columns = max(plan.columns, input_band(&c, &plan, t, &first, &last).rows * c.out_w * plan.images)
    cdef floating[:, ::1] workspace = np.empty((threads, (c.k + c.group_out) * plan.columns),
                                               np.asarray(gx).dtype)
    cdef floating* col
    for t in prange(plan.blocks, nogil=True, schedule="dynamic", num_threads=threads):
        col = &workspace[omp_get_thread_num(), 0]
        backward_input_block(&gy[0, 0, 0, 0], &w[0, 0, 0, 0], &c, &plan, t, &gx[0, 0, 0, 0],
                             col, col + <Py_ssize_t>c.k * plan.columns)


cdef void direct_weight_unit(const floating* gy, const floating* x, const Conv* c, const Direct* d,
                             const ptrdiff_t* taps, int unit, floating* partial, floating* band, floating* gy_block,
                             floating* sums) noexcept nogil:
    """partial += the weight gradient of one unit (output rows [row, row + rows) of one image): its input
    rows padded once per group, then a weight tile per (block of output channels, input channel, group of
    WEIGHT_TAPS taps), its sums added in that order. A block short of d.channels channels is read from a
    copy padded with zero channels, so no tile reads past grad_output."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row)
    cdef int g, block, channels, ch, k, group, j, t
    cdef Py_ssize_t plane = <Py_ssize_t>c.out_h * c.out_w, stride
    cdef const floating* grads
    cdef floating* dst
    for g in range(c.groups):
        pad_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, row - c.pad_top,
                 rows + d.halo, band)
        for block in range(d.blocks):
            channels = min(d.channels, c.group_out - block * d.channels)
            grads = gy + ((<Py_ssize_t>image * c.out_channels + g * c.group_out + block * d.channels) * c.out_h
                          + row) * c.out_w
            stride = plane
            if channels < d.channels:
                stride = <Py_ssize_t>rows * c.out_w
                for j in range(d.channels):
                    if j < channels:
                        memcpy(gy_block + j * stride, grads + j * plane, stride * sizeof(floating))
                    else:
                        memset(gy_block + j * stride, 0, stride * sizeof(floating))
                grads = gy_block
            for ch in range(c.group_in):
                for k in range(ceil_div(d.taps, WEIGHT_TAPS)):
                    group = k * WEIGHT_TAPS
                    if floating is float:
                        direct_weight_float(grads, stride, band + ch * d.channel_stride, d.padded_width,
                                            taps + group, rows, c.out_w, sums)
                    else:
                        direct_weight_double(grads, stride, band + ch * d.channel_stride, d.padded_width,
                                             taps + group, rows, c.out_w, sums)
                    for j in range(channels):
                        dst = partial + ((<Py_ssize_t>g * c.group_out + block * d.channels + j) * c.group_in + ch) * d.taps
                        for t in range(min(WEIGHT_TAPS, d.taps - group)):
                            dst[group + t] += sums[j * WEIGHT_TAPS + t]


cdef void direct_weight_partials(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, const Conv* c,
                                 const Direct* d, floating[:, ::1] partials, int threads):
    """partials[k] = the weight gradient of the k-th fixed run of units, by the direct path."""
    cdef int chunks = partials.shape[0], units = c.batch * d.bands, chunk, unit
    cdef ptrdiff_t[::1] taps = tap_offsets(c, d, ceil_div(d.taps, WEIGHT_TAPS) * WEIGHT_TAPS)
    cdef Py_ssize_t block_size = <Py_ssize_t>d.channels * d.band_rows * c.out_w
    cdef floating[:, ::1] workspace = np.zeros((threads, d.buffer + block_size + d.channels * WEIGHT_TAPS),
                                               np.asarray(partials).dtype)
    cdef floating* band
    for chunk in prange(chunks, nogil=True, schedule="dynamic", num_threads=threads):
        band = &workspace[omp_get_thread_num(), 0]
        memset(&partials[chunk, 0], 0, partials.shape[1] * sizeof(floating))
        for unit in range(chunk * units // chunks, (chunk + 1) * units // chunks):
            direct_weight_unit(&gy[0, 0, 0, 0], &x[0, 0, 0, 0], c, d, &taps[0], unit, &partials[chunk, 0], band,
                               band + d.buffer, band + d.buffer + block_size)


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, :, :, ::1] gw,
                    p, int threads, bint direct_path):
    """gw = the gradient of conv2d with respect to its weight, by the direct path or by im2col + GEMM: one
    partial per fixed run of units (never per thread), the partials then added in their order."""
    cdef Conv c = geometry(p)
    cdef Direct d
    cdef Plan plan
    if direct_path and not direct_plan(&c, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve the weight gradient of {p}")
    if not direct_path:
        plan = make_plan(&c, sizeof(floating))
    cdef int units = c.batch * d.bands if direct_path else plan.blocks
    cdef int chunks = min(units, MIN_BLOCKS), chunk, later
    cdef Py_ssize_t size = <Py_ssize_t>c.out_channels * c.k, e
    dtype = np.asarray(gw).dtype
    cdef floating[:, ::1] partials = np.empty((chunks, size), dtype)
    cdef floating[::1] flat_gw = np.asarray(gw).reshape(-1)
    cdef floating[:, ::1] workspace
    cdef floating* col
    cdef floating total
    if direct_path:
        direct_weight_partials(gy, x, &c, &d, partials, threads)
    else:
        workspace = np.empty((threads, (c.k + c.group_out) * plan.columns), dtype)
        for chunk in prange(chunks, nogil=True, schedule="dynamic", num_threads=threads):
            col = &workspace[omp_get_thread_num(), 0]
            backward_weight_chunk(&gy[0, 0, 0, 0], &x[0, 0, 0, 0], &c, &plan, chunk * plan.blocks // chunks,
                                  (chunk + 1) * plan.blocks // chunks, &partials[chunk, 0], col,
                                  col + <Py_ssize_t>c.k * plan.columns)
    for e in prange(size, nogil=True, schedule="static", num_threads=threads):
        total = partials[0, e]
        for later in range(1, chunks):
            total = total + partials[later, e]
        flat_gw[e] = total
