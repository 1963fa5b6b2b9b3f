# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The im2col + GEMM algorithm (any convolution): im2col of a block of work into a per-thread buffer, then
one GEMM per group. A block is a few whole images, or a band of output rows of one image (so a small batch
still feeds every core). Blocks run in parallel under OpenMP, each running a single-threaded GEMM: the
project's own (blocked_gemm.h, on the AVX-512 or AVX2 micro-kernels chosen at run time) or, on a CPU with
neither, BLAS's (scipy.linalg.cython_blas); col2im adds whole runs of rows at a time (col_rows.h, vectorized
for the CPU it runs on). The blocks depend on the shape only, never on the
thread count, and the weight gradient adds WEIGHT_PARTIALS fixed partials in a fixed order: results are
bitwise identical whatever the number of threads.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stddef cimport ptrdiff_t
from libc.string cimport memcpy, memset, strcmp

from blas_gemm cimport gemm
from conv_common cimport (
    MIN_UNITS,
    WEIGHT_PARTIALS,
    Conv,
    aligned_rows,
    bias_pointer,
    ceil_div,
    clamp,
    floor_div,
    geometry,
    sum_partials,
)
from openmp_shim cimport FASTCONV_OPENMP, omp_get_max_threads, omp_get_thread_num

cdef extern from "blocked_gemm.h" nogil:
    ctypedef struct micro_kernels:
        const char* name
    micro_kernels micro_find(const char* name)
    void blocked_gemm_float(const micro_kernels*, int, int, int, const float*, ptrdiff_t, ptrdiff_t, const float*,
                            ptrdiff_t, ptrdiff_t, int, ptrdiff_t, int, float*, ptrdiff_t, ptrdiff_t, float*)
    void blocked_gemm_double(const micro_kernels*, int, int, int, const double*, ptrdiff_t, ptrdiff_t,
                             const double*, ptrdiff_t, ptrdiff_t, int, ptrdiff_t, int, double*, ptrdiff_t, ptrdiff_t,
                             double*)
    int GEMM_WORK

cdef extern from "col_rows.h" nogil:
    void add_rows_float(float* dst, ptrdiff_t dst_plane, ptrdiff_t dst_row, ptrdiff_t dst_step, const float* src,
                        ptrdiff_t src_plane, ptrdiff_t src_row, int planes, int rows, int n, bint avx512)
    void add_rows_double(double* dst, ptrdiff_t dst_plane, ptrdiff_t dst_row, ptrdiff_t dst_step,
                         const double* src, ptrdiff_t src_plane, ptrdiff_t src_row, int planes, int rows, int n,
                         bint avx512)

OPENMP = bool(FASTCONV_OPENMP)  # built with OpenMP; without it prange runs serially

VECTOR_ISAS = ("avx512", "avx2", "none")  # the GEMM's micro-kernels, best first ("none": BLAS's GEMM)
cdef micro_kernels KERNELS


def use_vector_isa(name):
    """Run the GEMMs on the named micro-kernels (VECTOR_ISAS; the best the CPU runs by default, "none" for
    BLAS). Returns False, changing nothing, when the CPU cannot run them."""
    global KERNELS
    found = micro_find(name.encode())
    if found.name.decode() != name:
        return False
    KERNELS = found
    return True


def vector_isa():
    return KERNELS.name.decode()


for _isa in VECTOR_ISAS:
    if use_vector_isa(_isa):
        break


def openmp_max_threads():
    return omp_get_max_threads()

# A block's column buffer is sized to stay in a core's L2 cache.
cdef Py_ssize_t BLOCK_BYTES = 1 << 20


cdef struct Plan:
    int images     # images per block (more than one only when an image is one band)
    int bands      # row bands per image
    int band_rows  # output rows per band
    int blocks
    int columns    # the most columns a block has: the width of its buffers


cdef struct Block:
    int image, images  # images [image, image + images)
    int row, rows      # output rows [row, row + rows) of each



cdef Plan make_plan(const Conv* c, Py_ssize_t itemsize, bint pointwise_images):
    """Blocks of about BLOCK_BYTES of columns, at least MIN_UNITS of them where the batch is small; a pointwise
    block is one image unless `pointwise_images` (its GEMMs take several images side by side)."""
    cdef Plan plan
    cdef Py_ssize_t image_bytes = <Py_ssize_t>c.k * c.out_h * c.out_w * itemsize
    plan.images, plan.bands = 1, 1
    if (c.pointwise and not pointwise_images) or image_bytes > BLOCK_BYTES:
        plan.bands = <int>((image_bytes + BLOCK_BYTES - 1) // BLOCK_BYTES)
    else:
        plan.images = <int>max(1, min(BLOCK_BYTES // image_bytes, c.batch // MIN_UNITS))
    if plan.images == 1 and c.batch * plan.bands < MIN_UNITS:
        plan.bands = ceil_div(MIN_UNITS, c.batch)
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




cdef inline void matmul(const micro_kernels* kernels, bint trans_a, bint trans_b, int m, int n, int k,
                        const floating* a, int lda, const floating* b, int ldb, bint accumulate, floating* c,
                        int ldc, floating* work, int images=1, ptrdiff_t b_image=0,
                        ptrdiff_t c_image=0) noexcept nogil:
    """Row-major C = op(A) @ op(B) (+ C if accumulate), by the micro-kernels or, with kernels NULL, BLAS; for
    `images` side by side, image i's n columns of op(B) and C at b + i * b_image and c + i * c_image (one GEMM
    on the micro-kernels, BLAS image by image)."""
    cdef ptrdiff_t a_row = 1 if trans_a else lda, a_col = lda if trans_a else 1
    cdef ptrdiff_t b_row = 1 if trans_b else ldb, b_col = ldb if trans_b else 1
    cdef int i
    if kernels == NULL:
        for i in range(images):
            gemm(trans_a, trans_b, m, n, k, a, lda, b + i * b_image, ldb, 1 if accumulate else 0, c + i * c_image,
                 ldc)
    elif floating is float:
        blocked_gemm_float(kernels, m, images * n, k, a, a_row, a_col, b, b_row, b_col, n, b_image, accumulate, c,
                           ldc, c_image, work)
    else:
        blocked_gemm_double(kernels, m, images * n, k, a, a_row, a_col, b, b_row, b_col, n, b_image, accumulate, c,
                            ldc, c_image, work)


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
                    if runs and low < high:  # rows [first, end) are inside the input: copy them at once,
                        # from the first valid column of the first to the last of the last (the run stays inside
                        # the plane), zero what comes before and after, then the edge columns the run wrapped
                        # through, column by column
                        first = clamp(-ih, 0, b.rows)
                        end = clamp(c.height - ih, first, b.rows)
                        if first == end:
                            zero(dst, 0, b.rows * c.out_w)
                        else:
                            zero(dst, 0, first * c.out_w + low)
                            for j in range(first * c.out_w + low, (end - 1) * c.out_w + high):
                                dst[j] = src[ih * c.width + j]
                            zero(dst, (end - 1) * c.out_w + high, b.rows * c.out_w)
                            for ow in range(low):
                                for r in range(first + 1, end):
                                    dst[r * c.out_w + ow] = 0
                            for ow in range(high, c.out_w):
                                for r in range(first, end - 1):
                                    dst[r * c.out_w + ow] = 0
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


cdef void col2im(const floating* col, const Conv* c, Block b, int first, int last, bint avx512,
                 floating* gx) noexcept nogil:
    """The adjoint of im2col, restricted to input rows [first, last): gx += the taps of col that land there.
    Each gx element adds its terms in the fixed order (kw, kh, r). avx512: on AVX-512 (col_rows.h)."""
    cdef Py_ssize_t columns = <Py_ssize_t>b.images * b.rows * c.out_w
    cdef Py_ssize_t plane = <Py_ssize_t>c.height * c.width
    cdef int ch, kh, kw, top, low_row, high_row, offset, low, high
    cdef const floating* src
    cdef floating* dst
    for ch in range(c.group_in):
        for kw in range(c.kernel_w):
            valid_columns(c, kw, &offset, &low, &high)
            for kh in range(c.kernel_h):
                top = b.row * c.stride_h - c.pad_top + kh * c.dilation_h  # the input row of the block's first row
                # the block's rows whose input row lies in [first, last)
                low_row = clamp(ceil_div(first - top, c.stride_h), 0, b.rows)
                high_row = clamp(ceil_div(last - top, c.stride_h), low_row, b.rows)
                if low_row == high_row or low == high:
                    continue
                src = col + ((ch * c.kernel_h + kh) * c.kernel_w + kw) * columns + low_row * c.out_w + low
                dst = (gx + ch * plane + <Py_ssize_t>(top + low_row * c.stride_h) * c.width + offset
                       + low * c.stride_w)
                if floating is float:
                    add_rows_float(dst, c.channels * plane, <ptrdiff_t>c.stride_h * c.width, c.stride_w, src,
                                   <ptrdiff_t>b.rows * c.out_w, c.out_w, b.images, high_row - low_row, high - low,
                                   avx512)
                else:
                    add_rows_double(dst, c.channels * plane, <ptrdiff_t>c.stride_h * c.width, c.stride_w, src,
                                    <ptrdiff_t>b.rows * c.out_w, c.out_w, b.images, high_row - low_row, high - low,
                                    avx512)


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
            memcpy(buffer + <Py_ssize_t>co * ld[0] + i * image_rows,
                   a + output_offset(c, b, g) + (i * c.out_channels + co) * image_size,
                   image_rows * sizeof(floating))
    return buffer


cdef void store_output(const floating* block_out, ptrdiff_t channel_step, ptrdiff_t image_step, const floating* bias,
                       const Conv* c, Block b, int g, floating* y) noexcept nogil:
    """y's block rows of group g = block_out (+ bias), whose rows of channel co of image i start at
    block_out + co * channel_step + i * image_step: a buffer, or those rows of y themselves."""
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
            src = block_out + co * channel_step + i * image_step
            if src == dst and bias == NULL:
                continue
            for j in range(image_rows):
                dst[j] = src[j] + shift


cdef inline const floating* group_input(const floating* x, const Conv* c, Block b, int g) noexcept nogil:
    """The block's first image at group g's first channel."""
    return x + (<Py_ssize_t>b.image * c.channels + g * c.group_in) * c.height * c.width


cdef enum:
    # An image's output columns from which a block of several images multiplies image by image straight into
    # the output, not once through a buffer copied out after: one copy pass less, GEMMs still wide enough.
    STRAIGHT_COLUMNS = 256


cdef void forward_block(const micro_kernels* kernels, const floating* x, const floating* w, const floating* bias,
                        const Conv* c, Block b, floating* y, floating* col, floating* out,
                        floating* work) noexcept nogil:
    cdef int image_columns = b.rows * c.out_w, columns = b.images * image_columns, g, i
    cdef Py_ssize_t out_plane = <Py_ssize_t>c.out_h * c.out_w, plane = <Py_ssize_t>c.height * c.width
    cdef const floating* weights
    cdef floating* target
    cdef Block one
    for g in range(c.groups):
        weights = w + <Py_ssize_t>g * c.group_out * c.k
        target = y + output_offset(c, b, g)
        if c.pointwise:  # the output rows are the input rows: one GEMM of x's images side by side, into y
            matmul(kernels, False, False, c.group_out, image_columns, c.k, weights, c.k,
                   group_input(x, c, b, g) + b.row * c.width, <int>plane, False, target, out_plane, work, b.images,
                   c.channels * plane, c.out_channels * out_plane)
            store_output(target, out_plane, c.out_channels * out_plane, bias, c, b, g, y)
            continue
        im2col(group_input(x, c, b, g), c, b, col)
        if b.images == 1 or image_columns >= STRAIGHT_COLUMNS:  # each image's GEMM straight into y
            one = b
            one.images = 1
            for i in range(b.images):
                one.image = b.image + i
                target = y + output_offset(c, one, g)
                matmul(kernels, False, False, c.group_out, image_columns, c.k, weights, c.k,
                       col + i * image_columns, columns, False, target, out_plane, work)
                store_output(target, out_plane, 0, bias, c, one, g, y)
        else:  # narrow images: one GEMM over the block, through the buffer
            matmul(kernels, False, False, c.group_out, columns, c.k, weights, c.k, col, columns, False, out,
                   columns, work)
            store_output(out, columns, image_columns, bias, c, b, g, y)


cdef void backward_input_block(const micro_kernels* kernels, const floating* gy, const floating* w, const Conv* c,
                               const Plan* plan, int t, floating* gx, floating* col, floating* work) noexcept nogil:
    cdef int first, last, g, i
    cdef Block b = input_band(c, plan, t, &first, &last)
    cdef int image_columns = b.rows * c.out_w, columns = b.images * image_columns
    cdef Py_ssize_t plane = <Py_ssize_t>c.height * c.width, out_plane = <Py_ssize_t>c.out_h * c.out_w
    cdef const floating* gy_rows
    cdef floating* gx_image = gx + <Py_ssize_t>b.image * c.channels * plane
    if not c.pointwise:  # col2im adds into gx; pointwise GEMMs write it whole
        for i in range(b.images * c.channels):
            memset(gx_image + i * plane + first * c.width, 0, (last - first) * c.width * sizeof(floating))
        if columns == 0:  # these input rows only meet padding... of no output: their gradient is zero
            return
    for g in range(c.groups):  # the images' grad_output rows in place
        gy_rows = gy + output_offset(c, b, g)
        if c.pointwise:  # one GEMM of the images side by side, into gx
            matmul(kernels, True, False, c.k, image_columns, c.group_out, w + <Py_ssize_t>g * c.group_out * c.k,
                   c.k, gy_rows, out_plane, False, <floating*>group_input(gx, c, b, g) + b.row * c.width,
                   <int>plane, work, b.images, c.out_channels * out_plane, c.channels * plane)
            continue
        for i in range(b.images):
            matmul(kernels, True, False, c.k, image_columns, c.group_out, w + <Py_ssize_t>g * c.group_out * c.k,
                   c.k, gy_rows + i * c.out_channels * out_plane, out_plane, False, col + i * image_columns,
                   columns, work)
        col2im(col, c, b, first, last, kernels != NULL and strcmp(kernels.name, b"avx512") == 0,
               <floating*>group_input(gx, c, b, g))


cdef void backward_weight_chunk(const micro_kernels* kernels, const floating* gy, const floating* x, const Conv* c,
                                const Plan* plan, int first_block, int end_block, floating* partial, floating* col,
                                floating* rows, floating* work) noexcept nogil:
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
            matmul(kernels, False, True, c.group_out, c.k, columns, gy_rows, ld, cols, ldb, t > first_block,
                   partial + <Py_ssize_t>g * c.group_out * c.k, c.k, work)



cdef inline const micro_kernels* gemm_kernels(micro_kernels* copy):
    """The micro-kernels a call's GEMMs run on (a copy: a switch of KERNELS never reaches a running call),
    NULL for BLAS."""
    copy[0] = KERNELS
    return NULL if strcmp(copy.name, b"none") == 0 else copy


cdef inline Py_ssize_t workspace_size(const Conv* c, const Plan* plan, bint output_rows):
    """Elements of one thread's workspace: the GEMM's panels (first: aligned), its column matrix, its
    output-shaped rows (a block's output, or its gathered grad_output) where `output_rows`."""
    return GEMM_WORK + (c.k + (c.group_out if output_rows else 0)) * <Py_ssize_t>plan.columns


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
            floating[:, :, :, ::1] y, p, int threads):
    """y = conv2d(x, w) + bias (bias may be None), by im2col + GEMM."""
    cdef Conv c = geometry(p)
    cdef const floating* bias_ptr = bias_pointer(bias)
    cdef Plan plan = make_plan(&c, sizeof(floating), True)
    cdef micro_kernels chosen
    cdef const micro_kernels* kernels = gemm_kernels(&chosen)
    cdef floating[:, ::1] workspace = aligned_rows(threads, workspace_size(&c, &plan, True), np.asarray(y).dtype,
                                                   False)
    cdef floating* work
    cdef int t
    for t in prange(plan.blocks, nogil=True, schedule="dynamic", num_threads=threads):
        work = &workspace[omp_get_thread_num(), 0]
        forward_block(kernels, &x[0, 0, 0, 0], &w[0, 0, 0, 0], bias_ptr, &c, block_of(&c, &plan, t),
                      &y[0, 0, 0, 0], work + GEMM_WORK, work + GEMM_WORK + <Py_ssize_t>c.k * plan.columns, work)



def backward_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w, floating[:, :, :, ::1] gx,
                   p, int threads):
    """gx = the gradient of conv2d with respect to its input, by GEMM + col2im."""
    cdef Conv c = geometry(p)
    cdef Plan plan = make_plan(&c, sizeof(floating), True)
    cdef micro_kernels chosen
    cdef const micro_kernels* kernels = gemm_kernels(&chosen)
    cdef int first, last, t
    for t in range(plan.blocks):  # an input band's output rows reach beyond its own band (the kernel's halo)
        plan.columns = max(plan.columns, input_band(&c, &plan, t, &first, &last).rows * c.out_w * plan.images)
    cdef floating[:, ::1] workspace = aligned_rows(threads, workspace_size(&c, &plan, False), np.asarray(gx).dtype,
                                                   False)
    cdef floating* work
    for t in prange(plan.blocks, nogil=True, schedule="dynamic", num_threads=threads):
        work = &workspace[omp_get_thread_num(), 0]
        backward_input_block(kernels, &gy[0, 0, 0, 0], &w[0, 0, 0, 0], &c, &plan, t, &gx[0, 0, 0, 0],
                             work + GEMM_WORK, work)



def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, :, :, ::1] gw,
                    p, int threads):
    """gw = the gradient of conv2d with respect to its weight: one partial per fixed run of blocks (never per
    thread), the partials then added in their order."""
    cdef Conv c = geometry(p)
    cdef Plan plan = make_plan(&c, sizeof(floating), False)
    cdef micro_kernels chosen
    cdef const micro_kernels* kernels = gemm_kernels(&chosen)
    cdef int chunks = min(plan.blocks, WEIGHT_PARTIALS), chunk
    dtype = np.asarray(gw).dtype
    cdef floating[:, ::1] partials = np.empty((chunks, <Py_ssize_t>c.out_channels * c.k), dtype)
    cdef floating[:, ::1] workspace = aligned_rows(threads, workspace_size(&c, &plan, True), dtype, False)
    cdef floating* work
    for chunk in prange(chunks, nogil=True, schedule="dynamic", num_threads=threads):
        work = &workspace[omp_get_thread_num(), 0]
        backward_weight_chunk(kernels, &gy[0, 0, 0, 0], &x[0, 0, 0, 0], &c, &plan, chunk * plan.blocks // chunks,
                              (chunk + 1) * plan.blocks // chunks, &partials[chunk, 0], work + GEMM_WORK,
                              work + GEMM_WORK + <Py_ssize_t>c.k * plan.columns, work)
    cdef floating[::1] flat_gw = np.asarray(gw).reshape(-1)
    sum_partials(partials, flat_gw, threads)
