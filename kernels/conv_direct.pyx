# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The direct algorithm (on CPUs with AVX2 or AVX-512): each unit of work (an image, or a band of its output
rows) copies its input rows, zero-padded, into a per-thread buffer, a strided convolution's split into the
stride's phases (see direct_plan); every output pixel is then a fixed set of taps of that buffer at fixed
offsets, and the register tiles of direct_conv.h (channels x pixels) accumulate them without any column
matrix. Where every output sums enough terms, the buffer holds the rows channels last instead, and
micro_gemm.h's blocks (pixels x vectors of output channels) sum all of a pixel's taps in one call
(channel_tiles_pay). The input gradient runs the same tiles over a band of grad_output, one stride phase of
the input at a time (see transposed_plan); the weight gradient sums tiles of channels x taps over each
unit's rows, or channels-last micro-kernel blocks with vectors over input channels (wide groups) or output
channels (weight_path), in WEIGHT_PARTIALS fixed partials added in a fixed order. The units depend on the
shape only: results are bitwise identical whatever the number of threads.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stddef cimport ptrdiff_t
from libc.string cimport memcpy, memset

from conv_common cimport (
    MIN_UNITS,
    WEIGHT_PARTIALS,
    Conv,
    aligned_rows,
    bias_pointer,
    ceil_div,
    geometry,
    sum_partials,
)
from openmp_shim cimport omp_get_thread_num

cdef extern from "direct_conv.h" nogil:
    ctypedef void (*direct_tile_float_fn)(const float* x, ptrdiff_t channel_stride, int channels,
                                          const ptrdiff_t* taps, int n_taps, const float* w, float* out)
    ctypedef void (*direct_tile_double_fn)(const double* x, ptrdiff_t channel_stride, int channels,
                                           const ptrdiff_t* taps, int n_taps, const double* w, double* out)
    ctypedef void (*direct_weight_float_fn)(const float* gy, ptrdiff_t gy_channel_stride, ptrdiff_t gy_row,
                                            const float* band, ptrdiff_t band_row, const ptrdiff_t* taps, int n_taps,
                                            int rows, int width, float* sums)
    ctypedef void (*direct_weight_double_fn)(const double* gy, ptrdiff_t gy_channel_stride, ptrdiff_t gy_row,
                                             const double* band, ptrdiff_t band_row, const ptrdiff_t* taps,
                                             int n_taps, int rows, int width, double* sums)
    ctypedef void (*micro_float_fn)(int runs, int depth, const float* a, ptrdiff_t a_row, ptrdiff_t a_step,
                                    ptrdiff_t a_run, const float* b, ptrdiff_t b_step, ptrdiff_t b_run, float* c,
                                    ptrdiff_t c_row, int accumulate)
    ctypedef void (*micro_double_fn)(int runs, int depth, const double* a, ptrdiff_t a_row, ptrdiff_t a_step,
                                     ptrdiff_t a_run, const double* b, ptrdiff_t b_step, ptrdiff_t b_run, double* c,
                                     ptrdiff_t c_row, int accumulate)
    ctypedef struct micro_kernels:
        const char* name
        micro_float_fn float_kernels[4]
        micro_double_fn double_kernels[4]
        int mr, lanes_float, lanes_double
        micro_float_fn short_float_kernels[4]
        micro_double_fn short_double_kernels[4]
    ctypedef void (*evens_float_fn)(float* dst, const float* src, int n)
    ctypedef void (*evens_double_fn)(double* dst, const double* src, int n)
    ctypedef void (*transpose_float_fn)(const float* src, ptrdiff_t src_row, int rows, int cols, const float* add,
                                        float* dst, ptrdiff_t dst_row)
    ctypedef struct direct_tiles:
        const char* name
        direct_tile_float_fn tile_float
        direct_tile_double_fn tile_double
        direct_weight_float_fn weight_float
        direct_weight_double_fn weight_double
        int channels
        int width_float
        int width_double
        micro_kernels micro
        evens_float_fn evens_float
        evens_double_fn evens_double
        transpose_float_fn transpose_float
    int MICRO_NV
    void transpose_double(const double* src, ptrdiff_t src_row, int rows, int cols, const double* add, double* dst,
                          ptrdiff_t dst_row)
    int direct_select(const char* name)
    direct_tiles direct_current()
    int WEIGHT_TAPS

VECTOR_ISAS = ("avx512", "avx2", "none")  # the register tiles, best first ("none": the direct path serves nothing)


def use_vector_isa(name):
    """Use the named register tiles for the direct path (VECTOR_ISAS; the best the CPU runs by default).
    Returns False, changing nothing, when the CPU cannot run them."""
    return bool(direct_select(name.encode()))


def vector_isa():
    return direct_current().name.decode()


for _isa in VECTOR_ISAS:
    if use_vector_isa(_isa):
        break


# A direct unit's padded input rows are cut to about a core's L2 cache.
cdef Py_ssize_t BAND_BYTES = 1 << 20


cdef int band_rows(int rows, int batch, Py_ssize_t row_bytes, int halo):
    """Rows per unit of work, of `rows` per image each `row_bytes` long (plus `halo` more rows a unit reads):
    bands of even height of about BAND_BYTES, at least MIN_UNITS units where the batch is small."""
    cdef int cut = ceil_div(rows, ceil_div(MIN_UNITS, batch)) if batch < MIN_UNITS else rows
    cut = <int>max(1, min(cut, BAND_BYTES // row_bytes - halo))
    return ceil_div(rows, ceil_div(rows, cut))


cdef struct Direct:
    direct_tiles tiles         # the register tiles of this call, copied when it is planned
    int channels               # output channels per register tile
    int width                  # output pixels per register tile
    int phases_h, phases_w     # the stride's phases: a band holds each channel as stride_h x stride_w planes
    int row_width              # a phase row's width: output pixel (r, ow) is at r * row_width + ow of a plane
    int band_rows              # output rows per unit of work (an image's last band may have fewer)
    int bands                  # units per image
    int halo                   # phase rows a band needs beyond its output rows
    int blocks                 # tiles of `channels` output channels per group
    int taps                   # kernel_h * kernel_w
    ptrdiff_t plane            # one phase plane: (band_rows + halo) * row_width
    ptrdiff_t channel_stride   # one channel's planes in the band buffer
    ptrdiff_t buffer           # the band buffer, with the slack the last tile reads past its end
    bint by_channels           # the forward's vectors run over output channels (see channel_tiles_pay)
    int channel_width          # output channels per micro-kernel block (MICRO_NV vectors)
    int channel_blocks         # micro-kernel blocks per group
    ptrdiff_t tile_size        # elements of a unit's tile buffer


cdef inline int micro_vectors(int left) noexcept nogil:
    """The vectors of the next micro-kernel block across `left` vectors: up to MICRO_NV, but 2 + 2 rather than
    3 + 1 (a block of one vector loads as many values as it multiplies)."""
    return 2 if left % MICRO_NV == 1 and left > 1 else min(MICRO_NV, left)


cdef inline bint short_block(int left, int mr) noexcept nogil:
    """Whether a row's block with `left` pixels still to compute runs on the micro-kernels of mr / 2 rows."""
    return left <= mr // 2


cdef inline int row_slots(int width, int mr) noexcept nogil:
    """Pixels the channel blocks of a row of `width` compute: blocks of mr, the last one short (short_block)
    where it can be."""
    cdef int rest = width % mr
    return width - rest + (0 if rest == 0 else (mr // 2 if short_block(rest, mr) else mr))


cdef enum:
    CHANNEL_TERMS = 64  # the fewest terms per output (input channels x taps) for which the channel blocks pay


cdef bint channel_tiles_pay(const Conv* c, const Direct* d, int lanes):
    """Whether the forward runs faster with its vectors over output channels (channel_blocks: micro-kernel
    blocks of mr pixels of a row x up to MICRO_NV vectors of output channels, on a channels-last band) than
    over pixels (the register tiles on a padded band). Measured in float32 and float64 on both instruction
    sets, the blocks win wherever every output sums at least CHANNEL_TERMS terms (a block's transposed store
    is paid once for all of them) and their lanes are not much emptier than the tiles' (the blocks waste a
    row's last pixels and the lanes past the group's channels; the tiles waste a band row's padding columns).
    Without dilation across only: a kernel row's columns x channels are consecutive in the band."""
    cdef int mr = d.tiles.micro.mr
    if c.dilation_w != 1 or mr == 0 or c.k < CHANNEL_TERMS:
        return False
    cdef double pixel_lanes = <double>c.out_w / (ceil_div(d.band_rows * d.row_width, d.width) * d.width
                                                 / <double>d.band_rows)
    pixel_lanes *= <double>c.group_out / (d.blocks * d.channels)
    cdef double channel_lanes = <double>c.out_w / row_slots(c.out_w, mr)
    channel_lanes *= <double>c.group_out / (ceil_div(c.group_out, lanes) * lanes)
    return channel_lanes >= 0.8 * pixel_lanes


cdef bint direct_plan(const Conv* c, Py_ssize_t itemsize, Direct* d):
    """The direct path's cut of the work, or False when it does not serve this convolution (no vector tiles).
    A stride s is split into its phases: input row s * i + a of a band goes to row i of phase plane a (columns
    alike), so each kernel tap reads one plane at a fixed offset and consecutive output pixels read consecutive
    elements, as at stride 1 (one plane, the zero-padded input rows themselves)."""
    d.tiles = direct_current()  # this call's tiles, whatever is selected while it runs
    d.channels, d.width = d.tiles.channels, (d.tiles.width_double if itemsize == 8 else d.tiles.width_float)
    if d.width == 0:
        return False
    d.phases_h, d.phases_w = c.stride_h, c.stride_w
    d.row_width = c.out_w + (c.kernel_w - 1) * c.dilation_w // c.stride_w
    d.halo = (c.kernel_h - 1) * c.dilation_h // c.stride_h
    cdef Py_ssize_t row_bytes = <Py_ssize_t>c.group_in * d.phases_h * d.phases_w * d.row_width * itemsize
    d.band_rows = band_rows(c.out_h, c.batch, row_bytes, d.halo)
    d.bands = ceil_div(c.out_h, d.band_rows)
    d.blocks = ceil_div(c.group_out, d.channels)
    d.taps = c.kernel_h * c.kernel_w
    d.plane = <ptrdiff_t>(d.band_rows + d.halo) * d.row_width
    d.channel_stride = d.phases_h * d.phases_w * d.plane
    d.buffer = c.group_in * d.channel_stride + d.width + (c.kernel_w - 1) * c.dilation_w // c.stride_w
    cdef int lanes = d.tiles.micro.lanes_double if itemsize == 8 else d.tiles.micro.lanes_float
    d.by_channels = channel_tiles_pay(c, d, lanes)
    # blocks of equal width of up to MICRO_NV vectors of output channels; four vectors as 2 + 2, not 3 + 1
    cdef int vectors = ceil_div(c.group_out, lanes)
    d.channel_width = lanes * (2 if vectors == 4 else min(MICRO_NV, vectors))
    d.channel_blocks = ceil_div(c.group_out, d.channel_width)
    d.tile_size = max(d.channels * d.width, d.tiles.micro.mr * d.channel_width)
    return True


def direct_serves(p, Py_ssize_t itemsize):
    cdef Conv c = geometry(p)
    cdef Direct d
    return direct_plan(&c, itemsize, &d)


def forward_vectors(p, Py_ssize_t itemsize):
    """What the forward's vectors run over: "channels" (channel_tiles_pay) or "pixels"."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, itemsize, &d):
        raise ValueError(f"the direct path does not serve {p}")
    return "channels" if d.by_channels else "pixels"


cdef struct ChannelsLast:
    int mr              # output channels per micro-kernel block
    int lanes           # elements per vector: the input channels are padded to a multiple of it
    int in_pad          # input channels of a group, padded
    int out_pad         # output channels of a group, padded to whole blocks
    int band_w          # padded input columns a band row holds
    int band_h          # padded input rows of a full band
    bint merged         # the band's output pixels are evenly spaced: one run over all of them, not one per row
    ptrdiff_t step      # from one output pixel's input to the next one's: stride_w * in_pad
    ptrdiff_t row_step  # from one output row's input to the next one's: stride_h * band_w * in_pad
    ptrdiff_t size      # elements of the band buffer
    int term_rows       # a kernel row's terms (columns x channels) padded to whole blocks of mr
    int out_lanes       # output channels of a group, padded to whole vectors


cdef ChannelsLast channels_last_plan(const Conv* c, const Direct* d, Py_ssize_t itemsize, bint pad_channels):
    """The channels-last band of a unit; its input channels padded to whole vectors when `pad_channels` (the
    weight gradient's vectors run over them)."""
    cdef ChannelsLast cl
    cl.mr = d.tiles.micro.mr
    cl.lanes = d.tiles.micro.lanes_double if itemsize == 8 else d.tiles.micro.lanes_float
    cl.in_pad = ceil_div(c.group_in, cl.lanes) * cl.lanes if pad_channels else c.group_in
    cl.out_pad = ceil_div(c.group_out, cl.mr) * cl.mr
    cl.band_w = (c.out_w - 1) * c.stride_w + (c.kernel_w - 1) * c.dilation_w + 1
    cl.band_h = (d.band_rows - 1) * c.stride_h + (c.kernel_h - 1) * c.dilation_h + 1
    cl.merged = c.stride_h * cl.band_w == c.stride_w * c.out_w
    cl.step = <ptrdiff_t>c.stride_w * cl.in_pad
    cl.row_step = <ptrdiff_t>c.stride_h * cl.band_w * cl.in_pad
    cl.size = <ptrdiff_t>cl.band_h * cl.band_w * cl.in_pad + cl.mr * cl.step  # slack: a row's last block reads on
    cl.term_rows = ceil_div(c.kernel_w * cl.in_pad, cl.mr) * cl.mr
    cl.out_lanes = ceil_div(c.group_out, cl.lanes) * cl.lanes
    return cl


cdef void channels_last_band(const floating* x, const Conv* c, const Direct* d, const ChannelsLast* cl, int row,
                             int rows, floating* band) noexcept nogil:
    """band[i, j, ch] = the zero-padded input of one image and group at row row * stride_h + i, column j (of
    the padding's coordinates), channel ch (zeros past group_in): the input the output rows [row, row + rows)
    read, channels last, so that each pixel's channels are one vector run."""
    cdef int in_rows = (rows - 1) * c.stride_h + (c.kernel_h - 1) * c.dilation_h + 1
    cdef int first = min(cl.band_w, c.pad_left), end = max(first, min(cl.band_w, c.pad_left + c.width))
    # a band row is a whole input row (no padding columns): consecutive rows are one run, transposed at once
    cdef bint whole = first == 0 and cl.band_w == c.width
    cdef int i = 0, ih, j, count, pixels
    cdef ptrdiff_t row_size = <ptrdiff_t>cl.band_w * cl.in_pad
    cdef floating* dst
    cdef const floating* src
    while i < in_rows:
        ih = row * c.stride_h - c.pad_top + i
        dst = band + i * row_size
        if ih < 0 or ih >= c.height:
            memset(dst, 0, row_size * sizeof(floating))
            i += 1
            continue
        count = min(in_rows - i, c.height - ih) if whole else 1
        pixels = count * (end - first)
        memset(dst, 0, first * cl.in_pad * sizeof(floating))
        memset(dst + <ptrdiff_t>end * cl.in_pad, 0, (cl.band_w - end) * cl.in_pad * sizeof(floating))
        if pixels > 0:
            src = x + <Py_ssize_t>ih * c.width + first - c.pad_left
            if floating is float:
                d.tiles.transpose_float(src, <ptrdiff_t>c.height * c.width, c.group_in, pixels, NULL,
                                        dst + <ptrdiff_t>first * cl.in_pad, cl.in_pad)
            else:
                transpose_double(src, <ptrdiff_t>c.height * c.width, c.group_in, pixels, NULL,
                                 dst + <ptrdiff_t>first * cl.in_pad, cl.in_pad)
        if cl.in_pad > c.group_in:
            for j in range(first, first + pixels):
                memset(dst + <ptrdiff_t>j * cl.in_pad + c.group_in, 0, (cl.in_pad - c.group_in) * sizeof(floating))
        i += count


cdef void pack_weight(const floating* w, const Conv* c, int taps, int blocks, int width, bint channels_last,
                      floating* packed) noexcept nogil:
    """packed[g, block, ch, tap, j] (packed[g, block, tap, ch, j] when `channels_last`) = the weight of output
    channel block * width + j of group g (zero past the group's channels), as the register tiles (width
    d.channels) or the micro-kernels on a channels-last band (d.channel_width) read it."""
    cdef int g, block, k, ch, tap, j, o
    for g in range(c.groups):
        for block in range(blocks):
            for k in range(c.group_in * taps):
                ch = k % c.group_in if channels_last else k // taps
                tap = k // c.group_in if channels_last else k % taps
                for j in range(width):
                    o = block * width + j
                    packed[0] = (w[((<Py_ssize_t>g * c.group_out + o) * c.group_in + ch) * taps + tap]
                                 if o < c.group_out else 0)
                    packed += 1


cdef void pad_band(const floating* x, const Conv* c, const Direct* d, int row, int rows,
                   floating* band) noexcept nogil:
    """The band of output rows [row, row + rows) of one image, one group: band[ch, a, b, i, j] = the zero-padded
    input at row (row + i) * stride_h + a, column j * stride_w + b (zero outside the input), for the rows + halo
    phase rows i and row_width columns j of each phase (a, b). The input is read in row order."""
    cdef int ch, a, b, i, ih, j, first, end
    cdef floating* dst
    cdef const floating* src
    for ch in range(c.group_in):
        for i in range(rows + d.halo):
            for a in range(d.phases_h):
                ih = (row + i) * c.stride_h + a - c.pad_top
                for b in range(d.phases_w):
                    dst = band + ch * d.channel_stride + (a * d.phases_w + b) * d.plane + <ptrdiff_t>i * d.row_width
                    # the columns j whose input column j * stride_w + b - pad_left lies in [0, width)
                    first = min(d.row_width, ceil_div(c.pad_left - b, c.stride_w)) if c.pad_left > b else 0
                    end = max(first, min(d.row_width, ceil_div(c.pad_left + c.width - b, c.stride_w)))
                    if ih < 0 or ih >= c.height or first == end:
                        memset(dst, 0, d.row_width * sizeof(floating))
                        continue
                    src = x + (<Py_ssize_t>ch * c.height + ih) * c.width + first * c.stride_w + b - c.pad_left
                    memset(dst, 0, first * sizeof(floating))
                    if c.stride_w == 1:
                        memcpy(dst + first, src, (end - first) * sizeof(floating))
                    elif c.stride_w == 2:
                        if floating is float:
                            d.tiles.evens_float(dst + first, src, end - first)
                        else:
                            d.tiles.evens_double(dst + first, src, end - first)
                    else:
                        for j in range(end - first):
                            dst[first + j] = src[<ptrdiff_t>j * c.stride_w]
                    memset(dst + end, 0, (d.row_width - end) * sizeof(floating))


cdef void store_tile(const floating* tile, const Conv* c, const Direct* d, int start, int end, int channels,
                     const floating* bias, floating* y) noexcept nogil:
    """y[j, r, ow] = tile[j, q - start] (+ bias[j]) for the tile's pixels q = r * row_width + ow in
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
            r = q // d.row_width
            run = min(end, r * d.row_width + c.out_w) - q
            dst = y + (<Py_ssize_t>j * c.out_h + r) * c.out_w + q - r * d.row_width
            src = tile + j * d.width + q - start
            for k in range(run):
                dst[k] = src[k] + shift
            q = (r + 1) * d.row_width


cdef void pixel_tiles(const floating* packed, const floating* bias, const Conv* c, const Direct* d,
                      const ptrdiff_t* taps, int image, int row, int rows, int g, floating* y, const floating* band,
                      floating* tile) noexcept nogil:
    """Group g's output rows [row, row + rows) of one image from its padded band: for each block of d.channels
    channels, the register tiles swept across the band."""
    cdef int pixels = rows * d.row_width, block, start, channels
    cdef floating* y_block
    cdef const floating* w_block
    for block in range(d.blocks):
        channels = min(d.channels, c.group_out - block * d.channels)
        w_block = packed + (<Py_ssize_t>g * d.blocks + block) * c.group_in * d.taps * d.channels
        y_block = y + ((<Py_ssize_t>image * c.out_channels + g * c.group_out + block * d.channels) * c.out_h
                       + row) * c.out_w
        start = 0
        while start < pixels:
            if floating is float:
                d.tiles.tile_float(band + start, d.channel_stride, c.group_in, taps, d.taps, w_block, tile)
            else:
                d.tiles.tile_double(band + start, d.channel_stride, c.group_in, taps, d.taps, w_block, tile)
            store_tile(tile, c, d, start, min(start + d.width, pixels), channels,
                       bias + g * c.group_out + block * d.channels if bias != NULL else NULL, y_block)
            start += d.width


cdef void channel_blocks(const floating* packed, const floating* bias, const Conv* c, const Direct* d,
                         const ChannelsLast* cl, int image, int row, int rows, int g, floating* y,
                         const floating* band, floating* tile) noexcept nogil:
    """pixel_tiles with the vectors over output channels, on a channels-last band: for each run of pixels (an
    output row, or all the band's rows at once where their pixels are evenly spaced: cl.merged) and block of mr
    pixels of it (mr / 2 for a run's last few, see short_block), one micro-kernel call sums every tap of every
    input channel (runs: the kernel rows; depth: a kernel row's columns x input channels, consecutive in the
    band) into a pixels x channels tile, stored transposed."""
    cdef int mr = d.tiles.micro.mr
    cdef micro_float_fn float_kernel
    cdef micro_double_fn double_kernel
    cdef int lanes = d.tiles.micro.lanes_double if floating is double else d.tiles.micro.lanes_float
    cdef int depth = c.kernel_w * cl.in_pad, block, channels, vectors, first, r, q, ow
    cdef int runs = 1 if cl.merged else rows, run_pixels = rows * c.out_w if cl.merged else c.out_w
    cdef ptrdiff_t kernel_row = <ptrdiff_t>c.dilation_h * cl.band_w * cl.in_pad
    cdef ptrdiff_t plane = <ptrdiff_t>c.out_h * c.out_w
    cdef floating* y_block
    cdef const floating* bias_block
    cdef const floating* pixel
    cdef const floating* w_block
    for block in range(d.channel_blocks):
        channels = min(d.channel_width, c.group_out - block * d.channel_width)
        vectors = ceil_div(channels, lanes)
        w_block = packed + (<Py_ssize_t>g * d.channel_blocks + block) * c.group_in * d.taps * d.channel_width
        first = g * c.group_out + block * d.channel_width
        y_block = y + (<Py_ssize_t>image * c.out_channels + first) * plane
        bias_block = bias + first if bias != NULL else NULL
        for r in range(runs):
            for q in range(ceil_div(run_pixels, mr)):
                ow = q * mr
                pixel = band + r * cl.row_step + ow * cl.step
                if floating is float:
                    float_kernel = (d.tiles.micro.short_float_kernels[vectors] if short_block(run_pixels - ow, mr)
                                    else d.tiles.micro.float_kernels[vectors])
                    float_kernel(c.kernel_h, depth, pixel, cl.step, 1, kernel_row, w_block, d.channel_width,
                                 depth * d.channel_width, tile, d.channel_width, 0)
                else:
                    double_kernel = (d.tiles.micro.short_double_kernels[vectors] if short_block(run_pixels - ow, mr)
                                     else d.tiles.micro.double_kernels[vectors])
                    double_kernel(c.kernel_h, depth, pixel, cl.step, 1, kernel_row, w_block, d.channel_width,
                                  depth * d.channel_width, tile, d.channel_width, 0)
                if floating is float:
                    d.tiles.transpose_float(tile, d.channel_width, min(mr, run_pixels - ow), channels, bias_block,
                                            y_block + (row + r) * c.out_w + ow, plane)
                else:
                    transpose_double(tile, d.channel_width, min(mr, run_pixels - ow), channels, bias_block,
                                     y_block + (row + r) * c.out_w + ow, plane)


cdef void direct_unit(const floating* x, const floating* packed, const floating* bias, const Conv* c,
                      const Direct* d, const ChannelsLast* cl, const ptrdiff_t* taps, int unit, floating* y,
                      floating* band, floating* tile) noexcept nogil:
    """Output rows [row, row + rows) of one image, every channel: the band's input once per group (padded, or
    channels last), then the register tiles or the channel blocks over it."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row), g
    cdef const floating* group_x
    for g in range(c.groups):
        group_x = x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width
        if d.by_channels:
            channels_last_band(group_x, c, d, cl, row, rows, band)
            channel_blocks(packed, bias, c, d, cl, image, row, rows, g, y, band, tile)
        else:
            pad_band(group_x, c, d, row, rows, band)
            pixel_tiles(packed, bias, c, d, taps, image, row, rows, g, y, band, tile)


cdef tap_offsets(const Conv* c, const Direct* d):
    """Where each kernel tap (kh, kw) reads in a band (its phase plane, then its row and column there),
    relative to the output pixel."""
    offsets = np.zeros(d.taps, np.intp)
    cdef int kh, kw, t = 0, down, across
    for kh in range(c.kernel_h):
        for kw in range(c.kernel_w):
            down, across = kh * c.dilation_h, kw * c.dilation_w
            offsets[t] = (((down % c.stride_h) * d.phases_w + across % c.stride_w) * d.plane
                          + (down // c.stride_h) * d.row_width + across // c.stride_w)
            t += 1
    return offsets


cdef void direct(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating* bias,
                 floating[:, :, :, ::1] y, const Conv* c, const Direct* d, int threads):
    """y = conv2d(x, w) + bias by the direct path."""
    dtype = np.asarray(y).dtype
    cdef int blocks = d.channel_blocks if d.by_channels else d.blocks
    cdef int block_width = d.channel_width if d.by_channels else d.channels
    cdef floating[::1] packed = aligned_rows(1, c.groups * blocks * c.group_in * d.taps * block_width, dtype,
                                             False)[0]
    pack_weight(&w[0, 0, 0, 0], c, d.taps, blocks, block_width, d.by_channels, &packed[0])
    cdef ptrdiff_t[::1] taps = tap_offsets(c, d)
    cdef ChannelsLast cl = channels_last_plan(c, d, sizeof(floating), False)
    cdef ptrdiff_t buffer = cl.size if d.by_channels else d.buffer
    # zeroed once: the slack past the band and the rows a short last band leaves stale are read by tiles
    # whose results are never stored, and must not hold signalling garbage
    cdef floating[:, ::1] workspace = aligned_rows(threads, buffer + d.tile_size, dtype, True)
    cdef floating* band
    cdef int unit
    for unit in prange(c.batch * d.bands, nogil=True, schedule="dynamic", num_threads=threads):
        band = &workspace[omp_get_thread_num(), 0]
        direct_unit(&x[0, 0, 0, 0], &packed[0], bias, c, d, &cl, &taps[0], unit, &y[0, 0, 0, 0], band,
                    band + buffer)



def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
                   floating[:, :, :, ::1] y, p, int threads):
    """y = conv2d(x, w) + bias (bias may be None), by the direct path."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve {p}")
    direct(x, w, bias_pointer(bias), y, &c, &d, threads)



cdef struct Transposed:
    direct_tiles tiles         # the register tiles of this call, copied when it is planned
    int channels, width        # a tile's input-gradient channels and pixels
    int reach_h, reach_w       # how many grad_output rows / columns back a tap reaches from its phase pixel
    int first_i, first_j       # the first phase row / column holding an input pixel
    int phase_rows             # phase rows holding input pixels
    int phase_cols             # phase columns holding input pixels
    int row_width              # a band row: phase_cols + reach_w
    int band_rows              # phase rows per unit of work (an image's last band may have fewer)
    int bands                  # units per image
    int blocks                 # tiles of `channels` input-gradient channels per group
    ptrdiff_t channel_stride   # one grad_output channel's rows in the band: (band_rows + reach_h) * row_width
    ptrdiff_t buffer           # the band buffer, with the slack the last tile reads past its end


cdef bint transposed_plan(const Conv* c, Py_ssize_t itemsize, Transposed* t):
    """The input gradient's cut of the work, or False without vector tiles. The padded input splits into the
    stride's phases: input pixel (i * stride_h + a, j * stride_w + b) of the padding's coordinates gathers
    grad_output (i - q_kh, j - q_kw) times w[kh, kw] over the taps with kh * dilation_h = q_kh * stride_h + a
    (columns alike), a stride-1 correlation of grad_output per phase with that phase's taps, all of them read
    from one zero-padded band of grad_output rows."""
    t.tiles = direct_current()
    t.channels, t.width = t.tiles.channels, (t.tiles.width_double if itemsize == 8 else t.tiles.width_float)
    if t.width == 0:
        return False
    t.reach_h = (c.kernel_h - 1) * c.dilation_h // c.stride_h
    t.reach_w = (c.kernel_w - 1) * c.dilation_w // c.stride_w
    t.first_i, t.first_j = c.pad_top // c.stride_h, c.pad_left // c.stride_w
    t.phase_rows = ceil_div(c.pad_top + c.height, c.stride_h) - t.first_i
    t.phase_cols = ceil_div(c.pad_left + c.width, c.stride_w) - t.first_j
    t.row_width = t.phase_cols + t.reach_w
    cdef Py_ssize_t row_bytes = <Py_ssize_t>c.group_out * t.row_width * itemsize
    t.band_rows = band_rows(t.phase_rows, c.batch, row_bytes, t.reach_h)
    t.bands = ceil_div(t.phase_rows, t.band_rows)
    t.blocks = ceil_div(c.group_in, t.channels)
    t.channel_stride = <ptrdiff_t>(t.band_rows + t.reach_h) * t.row_width
    t.buffer = c.group_out * t.channel_stride + t.width + t.reach_w
    return True


cdef phase_taps(const Conv* c, const Transposed* t):
    """The kernel taps (kh, kw) by phase (a, b), phase after phase, each with its offset in the band relative to
    the phase pixel, and where each phase's taps start (phases + 1 of them)."""
    cdef int a, b, kh, kw
    order, offsets, starts = [], [], [0]
    for a in range(c.stride_h):
        for b in range(c.stride_w):
            for kh in range(c.kernel_h):
                for kw in range(c.kernel_w):
                    if kh * c.dilation_h % c.stride_h == a and kw * c.dilation_w % c.stride_w == b:
                        order.append(kh * c.kernel_w + kw)
                        offsets.append((t.reach_h - kh * c.dilation_h // c.stride_h) * t.row_width
                                       + t.reach_w - kw * c.dilation_w // c.stride_w)
            starts.append(len(order))
    return np.array(order, np.intp), np.array(offsets, np.intp), np.array(starts, np.intp)


cdef void pack_phase_weight(const floating* w, const Conv* c, const Transposed* t, const ptrdiff_t* order,
                            const ptrdiff_t* starts, floating* packed) noexcept nogil:
    """packed[phase][g, block, co, tap, j] = w[g * group_out + co, block * channels + j, tap] (zero past the
    group's input channels) over each phase's taps: the tiles' weights, grad_output channels as their input."""
    cdef int phase, g, block, co, k, j, ci
    for phase in range(c.stride_h * c.stride_w):
        for g in range(c.groups):
            for block in range(t.blocks):
                for co in range(c.group_out):
                    for k in range(starts[phase], starts[phase + 1]):
                        for j in range(t.channels):
                            ci = block * t.channels + j
                            packed[0] = (w[((<Py_ssize_t>g * c.group_out + co) * c.group_in + ci)
                                           * c.kernel_h * c.kernel_w + order[k]] if ci < c.group_in else 0)
                            packed += 1


cdef void grad_output_band(const floating* gy, const Conv* c, const Transposed* t, int i, int rows,
                           floating* band) noexcept nogil:
    """band[co, r, k] = grad_output (one image and group) at row first_i + i + r - reach_h, column
    first_j + k - reach_w, zero outside it, for the rows + reach_h rows of phase rows [i, i + rows)."""
    cdef int co, r, oh
    cdef int first = min(t.row_width, max(0, t.reach_w - t.first_j))  # band columns before grad_output's first
    cdef int end = max(first, min(t.row_width, c.out_w + t.reach_w - t.first_j))
    cdef floating* dst
    for co in range(c.group_out):
        for r in range(rows + t.reach_h):
            oh = t.first_i + i + r - t.reach_h
            dst = band + co * t.channel_stride + <ptrdiff_t>r * t.row_width
            if oh < 0 or oh >= c.out_h or first == end:
                memset(dst, 0, t.row_width * sizeof(floating))
                continue
            memset(dst, 0, first * sizeof(floating))
            memcpy(dst + first, gy + (<Py_ssize_t>co * c.out_h + oh) * c.out_w + first + t.first_j - t.reach_w,
                   (end - first) * sizeof(floating))
            memset(dst + end, 0, (t.row_width - end) * sizeof(floating))


cdef void store_phase_tile(const floating* tile, const Conv* c, const Transposed* t, int i, int a, int b,
                           int start, int end, int channels, floating* gx) noexcept nogil:
    """gx[j, ih, iw] = tile[j, q - start] for the tile's pixels q = r * row_width + k of phase (a, b) in
    [start, end) that are input pixels: ih = (first_i + i + r) * stride_h + a - pad_top and
    iw = (first_j + k) * stride_w + b - pad_left inside the input. gx points at the tile's first channel."""
    # the columns k whose input column lies in [0, width)
    cdef int low = max(0, ceil_div(c.pad_left - b, c.stride_w) - t.first_j)
    cdef int high = min(t.phase_cols, ceil_div(c.pad_left + c.width - b, c.stride_w) - t.first_j)
    cdef int j, k, q, r, ih, first, last
    cdef Py_ssize_t plane = <Py_ssize_t>c.height * c.width
    cdef floating* dst
    cdef const floating* src
    q = start
    while q < end:  # one run per phase row
        r = q // t.row_width
        ih = (t.first_i + i + r) * c.stride_h + a - c.pad_top
        first = max(q - r * t.row_width, low)
        last = min(end - r * t.row_width, high)
        if 0 <= ih < c.height and first < last:
            for j in range(channels):
                dst = gx + j * plane + <Py_ssize_t>ih * c.width + (t.first_j + first) * c.stride_w + b - c.pad_left
                src = tile + j * t.width + r * t.row_width + first - start
                if c.stride_w == 1:
                    memcpy(dst, src, (last - first) * sizeof(floating))
                else:
                    for k in range(last - first):
                        dst[k * c.stride_w] = src[k]
        q = (r + 1) * t.row_width


cdef void transposed_unit(const floating* gy, const floating* packed, const Conv* c, const Transposed* t,
                          const ptrdiff_t* offsets, const ptrdiff_t* starts, int unit, floating* gx,
                          floating* band, floating* tile) noexcept nogil:
    """Phase rows [i, i + rows) of one image, every phase and input channel: the band of grad_output once per
    group, then for each phase and block of channels the tiles swept across it (a phase with no tap is zero)."""
    cdef int image = unit // t.bands, i = (unit % t.bands) * t.band_rows
    cdef int rows = min(t.band_rows, t.phase_rows - i), pixels = rows * t.row_width
    cdef int g, block, start, channels, phase, n_taps, j
    cdef floating* gx_block
    cdef const floating* w_block
    cdef Py_ssize_t phase_pack = 0
    for g in range(c.groups):
        grad_output_band(gy + (<Py_ssize_t>image * c.out_channels + g * c.group_out) * c.out_h * c.out_w, c, t, i,
                         rows, band)
        phase_pack = 0
        for phase in range(c.stride_h * c.stride_w):
            n_taps = <int>(starts[phase + 1] - starts[phase])
            for block in range(t.blocks):
                channels = min(t.channels, c.group_in - block * t.channels)
                w_block = packed + phase_pack + (<Py_ssize_t>g * t.blocks + block) * c.group_out * n_taps * t.channels
                gx_block = gx + (<Py_ssize_t>image * c.channels + g * c.group_in + block * t.channels) * c.height * c.width
                start = 0
                while start < pixels:
                    if n_taps == 0:
                        memset(tile, 0, t.channels * t.width * sizeof(floating))
                    elif floating is float:
                        t.tiles.tile_float(band + start, t.channel_stride, c.group_out, offsets + starts[phase],
                                           n_taps, w_block, tile)
                    else:
                        t.tiles.tile_double(band + start, t.channel_stride, c.group_out, offsets + starts[phase],
                                            n_taps, w_block, tile)
                    store_phase_tile(tile, c, t, i, phase // c.stride_w, phase % c.stride_w, start,
                                     min(start + t.width, pixels), channels, gx_block)
                    start += t.width
            phase_pack += <Py_ssize_t>c.groups * t.blocks * c.group_out * n_taps * t.channels


def backward_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w,
                   floating[:, :, :, ::1] gx, p, int threads):
    """gx = the gradient of conv2d with respect to its input, by the direct path over the stride's phases."""
    cdef Conv c = geometry(p)
    cdef Transposed t
    if not transposed_plan(&c, sizeof(floating), &t):
        raise ValueError(f"the direct path does not serve the input gradient of {p}")
    order, offsets, starts = phase_taps(&c, &t)
    cdef ptrdiff_t[::1] tap_order = order, tap_offset = offsets, tap_starts = starts
    dtype = np.asarray(gx).dtype
    cdef floating[::1] packed = aligned_rows(1, c.groups * t.blocks * c.group_out * c.kernel_h * c.kernel_w
                                             * t.channels, dtype, False)[0]
    pack_phase_weight(&w[0, 0, 0, 0], &c, &t, &tap_order[0], &tap_starts[0], &packed[0])
    cdef floating[:, ::1] workspace = aligned_rows(threads, t.buffer + t.channels * t.width, dtype, True)
    cdef floating* band
    cdef int unit
    for unit in prange(c.batch * t.bands, nogil=True, schedule="dynamic", num_threads=threads):
        band = &workspace[omp_get_thread_num(), 0]
        transposed_unit(&gy[0, 0, 0, 0], &packed[0], &c, &t, &tap_offset[0], &tap_starts[0], unit,
                        &gx[0, 0, 0, 0], band, band + t.buffer)



cdef const floating* grad_block(const floating* gy, const Conv* c, int image, int first, int channels, int block,
                                int row, int rows, floating* copy, Py_ssize_t* channel_stride) noexcept nogil:
    """grad_output's rows [row, row + rows) of channels [first, first + channels) of one image, as `block`
    channels `channel_stride[0]` apart: in place when the block is full, else a copy padded with zero
    channels, so that a weight-gradient block never reads past grad_output."""
    cdef Py_ssize_t plane = <Py_ssize_t>c.out_h * c.out_w, run = <Py_ssize_t>rows * c.out_w
    cdef const floating* grads = gy + ((<Py_ssize_t>image * c.out_channels + first) * c.out_h + row) * c.out_w
    cdef int j
    if channels == block:
        channel_stride[0] = plane
        return grads
    channel_stride[0] = run
    for j in range(block):
        if j < channels:
            memcpy(copy + j * run, grads + j * plane, run * sizeof(floating))
        else:
            memset(copy + j * run, 0, run * sizeof(floating))
    return copy


# A weight tile call's rows of grad_output: they stay in L2 across the taps, and each call's loads and stores
# of its lane sums are spread over many rows.
cdef Py_ssize_t WEIGHT_ROWS_BYTES = 256 << 10
cdef int ALIGNED_COPY_READS = 16  # the fewest tiles reading a block's rows of grad_output for an aligned copy to pay


cdef struct TapTiles:
    int rows         # output rows per tile call (WEIGHT_ROWS_BYTES of a block's grad_output)
    int lanes        # elements of a vector
    int row          # a row of the block's copy of grad_output: out_w padded to whole vectors
    int tap_groups   # groups of WEIGHT_TAPS taps
    bint copied      # grad_output's rows copied, aligned, even for a full block: enough tiles read each copy
    Py_ssize_t block  # elements of the copy: channels x rows x row
    Py_ssize_t sums   # elements of a block's lane sums: every input channel and tap group


cdef TapTiles tap_tiles(const Conv* c, const Direct* d, Py_ssize_t itemsize):
    cdef TapTiles t
    t.lanes = d.tiles.micro.lanes_double if itemsize == 8 else d.tiles.micro.lanes_float
    t.row = ceil_div(c.out_w, t.lanes) * t.lanes
    t.rows = <int>max(1, min(d.band_rows, WEIGHT_ROWS_BYTES // (d.channels * t.row * itemsize)))
    t.tap_groups = ceil_div(d.taps, WEIGHT_TAPS)
    t.copied = c.group_in * t.tap_groups >= ALIGNED_COPY_READS
    t.block = <Py_ssize_t>d.channels * t.rows * t.row
    t.sums = <Py_ssize_t>c.group_in * t.tap_groups * d.channels * WEIGHT_TAPS * t.lanes
    return t


cdef void aligned_grads(const floating* gy, const Conv* c, const TapTiles* tt, int image, int first, int channels,
                        int block, int row, int rows, floating* copy) noexcept nogil:
    """copy[j, r, :out_w] = grad_output's row + r of channel first + j of one image, for j < block (zero past
    `channels`) and r < rows, each row tt.row long: the tiles' whole-vector loads then never split a cache
    line (the copy is aligned; grad_output, a NumPy array, is not)."""
    cdef Py_ssize_t plane = <Py_ssize_t>c.out_h * c.out_w
    cdef const floating* grads = gy + ((<Py_ssize_t>image * c.out_channels + first) * c.out_h + row) * c.out_w
    cdef int j, r
    cdef floating* dst
    for j in range(block):
        for r in range(rows):
            dst = copy + (<Py_ssize_t>j * rows + r) * tt.row
            if j < channels:
                memcpy(dst, grads + j * plane + <Py_ssize_t>r * c.out_w, c.out_w * sizeof(floating))
            else:
                memset(dst, 0, c.out_w * sizeof(floating))


cdef void direct_weight_unit(const floating* gy, const floating* x, const Conv* c, const Direct* d,
                             const TapTiles* tt, const ptrdiff_t* taps, int unit, floating* partial, floating* band,
                             floating* copy, floating* sums) noexcept nogil:
    """partial += the weight gradient of one unit (output rows [row, row + rows) of one image): its input
    rows padded once per group, then for each block of output channels, a few rows of grad_output at a time
    (in place, or copied by aligned_grads: see TapTiles.copied), a weight tile per (input channel, group of
    WEIGHT_TAPS taps) adding into its lane sums; the lanes are added last, in order."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row)
    cdef int g, block, channels, piece, first, count, ch, k, j, t, lane
    cdef Py_ssize_t stride, grads_row
    cdef const floating* grads
    cdef const floating* lanes
    cdef floating* tile_sums
    cdef floating* dst
    cdef floating total
    for g in range(c.groups):
        pad_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, row, rows, band)
        for block in range(d.blocks):
            channels = min(d.channels, c.group_out - block * d.channels)
            memset(sums, 0, tt.sums * sizeof(floating))
            for piece in range(ceil_div(rows, tt.rows)):
                first = piece * tt.rows
                count = min(tt.rows, rows - first)
                if channels == d.channels and not tt.copied:  # in place
                    grads = grad_block(gy, c, image, g * c.group_out + block * d.channels, channels, d.channels,
                                       row + first, count, copy, &stride)
                    grads_row = c.out_w
                else:
                    aligned_grads(gy, c, tt, image, g * c.group_out + block * d.channels, channels, d.channels,
                                  row + first, count, copy)
                    grads, stride, grads_row = copy, <Py_ssize_t>count * tt.row, tt.row
                tile_sums = sums
                for ch in range(c.group_in):
                    for k in range(tt.tap_groups):
                        if floating is float:
                            d.tiles.weight_float(grads, stride, grads_row,
                                                 band + ch * d.channel_stride + first * d.row_width, d.row_width,
                                                 taps + k * WEIGHT_TAPS, d.taps - k * WEIGHT_TAPS, count, c.out_w,
                                                 tile_sums)
                        else:
                            d.tiles.weight_double(grads, stride, grads_row,
                                                  band + ch * d.channel_stride + first * d.row_width, d.row_width,
                                                  taps + k * WEIGHT_TAPS, d.taps - k * WEIGHT_TAPS, count, c.out_w,
                                                  tile_sums)
                        tile_sums += d.channels * WEIGHT_TAPS * tt.lanes
            for ch in range(c.group_in):
                for k in range(tt.tap_groups):
                    for j in range(channels):
                        dst = partial + (((<Py_ssize_t>g * c.group_out + block * d.channels + j) * c.group_in + ch)
                                         * d.taps)
                        for t in range(min(WEIGHT_TAPS, d.taps - k * WEIGHT_TAPS)):
                            lanes = sums + (((ch * tt.tap_groups + k) * d.channels + j) * WEIGHT_TAPS + t) * tt.lanes
                            total = 0
                            for lane in range(tt.lanes):
                                total = total + lanes[lane]
                            dst[k * WEIGHT_TAPS + t] += total


cdef void direct_weight_partials(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, const Conv* c,
                                 const Direct* d, floating[:, ::1] partials, int threads):
    """partials[k] = the weight gradient of the k-th fixed run of units, by the direct path."""
    cdef int chunks = partials.shape[0], units = c.batch * d.bands, chunk, unit
    cdef TapTiles tt = tap_tiles(c, d, sizeof(floating))
    cdef ptrdiff_t[::1] taps = tap_offsets(c, d)
    # per thread, aligned: the copy of grad_output, the lane sums (whole vectors both), the band
    cdef floating[:, ::1] workspace = aligned_rows(threads, tt.block + tt.sums + d.buffer, np.asarray(partials).dtype,
                                                   True)
    cdef floating* grads
    for chunk in prange(chunks, nogil=True, schedule="dynamic", num_threads=threads):
        grads = &workspace[omp_get_thread_num(), 0]
        memset(&partials[chunk, 0], 0, partials.shape[1] * sizeof(floating))
        for unit in range(chunk * units // chunks, (chunk + 1) * units // chunks):
            direct_weight_unit(&gy[0, 0, 0, 0], &x[0, 0, 0, 0], c, d, &tt, &taps[0], unit, &partials[chunk, 0],
                               grads + tt.block + tt.sums, grads, grads + tt.block)


cdef void channels_last_weight_unit(const floating* gy, const floating* x, const Conv* c, const Direct* d,
                                    const ChannelsLast* cl, int unit, floating* acc, floating* band,
                                    floating* gy_block) noexcept nogil:
    """acc[g, o, tap, ch] += the weight gradient of one unit (output rows [row, row + rows) of one image), as
    micro-kernel blocks of mr output channels x input channels summed over the unit's output pixels (a run
    per output row, or one run where they are all evenly spaced), one kernel tap at a time (grad_output
    through grad_block)."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row)
    cdef int runs = 1 if cl.merged else rows, depth = rows * c.out_w if cl.merged else c.out_w
    cdef int g, block, channels, kh, kw, ch, vectors
    cdef Py_ssize_t a_row
    cdef ptrdiff_t c_row = <ptrdiff_t>d.taps * cl.in_pad
    cdef const floating* grads
    cdef const floating* b
    cdef floating* dst
    for g in range(c.groups):
        channels_last_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, cl, row,
                           rows, band)
        for block in range(cl.out_pad // cl.mr):
            channels = min(cl.mr, c.group_out - block * cl.mr)
            grads = grad_block(gy, c, image, g * c.group_out + block * cl.mr, channels, cl.mr, row, rows, gy_block,
                               &a_row)
            for kh in range(c.kernel_h):
                for kw in range(c.kernel_w):
                    b = band + (<ptrdiff_t>kh * c.dilation_h * cl.band_w + kw * c.dilation_w) * cl.in_pad
                    dst = acc + ((<ptrdiff_t>g * cl.out_pad + block * cl.mr) * d.taps + kh * c.kernel_w + kw) * cl.in_pad
                    ch = 0
                    while ch < cl.in_pad:
                        vectors = micro_vectors((cl.in_pad - ch) // cl.lanes)
                        if floating is float:
                            d.tiles.micro.float_kernels[vectors](runs, depth, grads, a_row, 1, c.out_w, b + ch, cl.step,
                                                                 cl.row_step, dst + ch, c_row, 1)
                        else:
                            d.tiles.micro.double_kernels[vectors](runs, depth, grads, a_row, 1, c.out_w, b + ch,
                                                                  cl.step, cl.row_step, dst + ch, c_row, 1)
                        ch += vectors * cl.lanes


cdef void channels_last_to_weight(const floating* acc, const Conv* c, const Direct* d, const ChannelsLast* cl,
                                  floating* weight) noexcept nogil:
    """weight[g, o, ch, tap] = acc[g, o, tap, ch] for the real channels."""
    cdef int g, o, ch, t
    for g in range(c.groups):
        for o in range(c.group_out):
            for ch in range(c.group_in):
                for t in range(d.taps):
                    weight[0] = acc[((<ptrdiff_t>g * cl.out_pad + o) * d.taps + t) * cl.in_pad + ch]
                    weight += 1


cdef enum:
    BY_TAPS, BY_INPUT_CHANNELS, BY_OUTPUT_CHANNELS  # the weight gradient's paths (weight_path)


cdef int weight_path(const Conv* c, const Direct* d, const ChannelsLast* cl, const ChannelsLast* narrow,
                     Py_ssize_t itemsize):
    """What the weight gradient's vectors run over: input channels (channels_last_weight_unit) for groups of a
    vector of them or more; output channels (output_vector_weight_unit) where its blocks of mr terms of a kernel
    row (columns x input channels) x vectors of output channels are at least 3/4 full (no dilation across:
    those terms are consecutive in the band) and a unit's grad_output, transposed, stays in a core's L2 cache
    (BAND_BYTES); else output columns, in the tiles of taps (direct_weight_unit)."""
    if c.group_in >= cl.lanes:
        return BY_INPUT_CHANNELS
    cdef double full = <double>c.kernel_w * narrow.in_pad / narrow.term_rows * c.group_out / narrow.out_lanes
    cdef Py_ssize_t transposed = <Py_ssize_t>d.band_rows * c.out_w * narrow.out_lanes * itemsize
    return BY_OUTPUT_CHANNELS if c.dilation_w == 1 and full >= 0.75 and transposed <= BAND_BYTES else BY_TAPS


def weight_vectors(p, Py_ssize_t itemsize):
    """What the weight gradient's vectors run over (weight_path): "input channels", "output channels" or
    "columns"."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, itemsize, &d):
        raise ValueError(f"the direct path does not serve {p}")
    cdef ChannelsLast cl = channels_last_plan(&c, &d, itemsize, True)
    cdef ChannelsLast narrow = channels_last_plan(&c, &d, itemsize, False)
    return ("columns", "input channels", "output channels")[weight_path(&c, &d, &cl, &narrow, itemsize)]


cdef void output_vector_weight_unit(const floating* gy, const floating* x, const Conv* c, const Direct* d,
                                    const ChannelsLast* cl, int unit, floating* acc, floating* band,
                                    floating* grads) noexcept nogil:
    """acc[g, kh, term, o] += the weight gradient of one unit (output rows [row, row + rows) of one image) for
    the terms (kw, ch) of each kernel row, consecutive in a channels-last band: micro-kernel blocks of mr terms
    x up to MICRO_NV vectors of output channels summed over the unit's output pixels, a run per output row,
    grad_output transposed to channels last (its padding channels stay zero)."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row)
    cdef int out_pad = cl.out_lanes, g, kh, term_block, term, o, vectors
    cdef const floating* group_gy
    cdef const floating* a
    cdef floating* dst
    for g in range(c.groups):
        channels_last_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, cl, row,
                           rows, band)
        group_gy = gy + ((<Py_ssize_t>image * c.out_channels + g * c.group_out) * c.out_h + row) * c.out_w
        if floating is float:
            d.tiles.transpose_float(group_gy, <ptrdiff_t>c.out_h * c.out_w, c.group_out, rows * c.out_w, NULL, grads,
                                    out_pad)
        else:
            transpose_double(group_gy, <ptrdiff_t>c.out_h * c.out_w, c.group_out, rows * c.out_w, NULL, grads,
                             out_pad)
        for kh in range(c.kernel_h):
            for term_block in range(cl.term_rows // cl.mr):
                term = term_block * cl.mr
                a = band + <ptrdiff_t>kh * c.dilation_h * cl.band_w * cl.in_pad + term
                dst = acc + ((<ptrdiff_t>g * c.kernel_h + kh) * cl.term_rows + term) * out_pad
                o = 0
                while o < out_pad:
                    vectors = micro_vectors((out_pad - o) // cl.lanes)
                    if floating is float:
                        d.tiles.micro.float_kernels[vectors](rows, c.out_w, a, 1, cl.step, cl.row_step, grads + o,
                                                             out_pad, <ptrdiff_t>c.out_w * out_pad, dst + o, out_pad, 1)
                    else:
                        d.tiles.micro.double_kernels[vectors](rows, c.out_w, a, 1, cl.step, cl.row_step, grads + o,
                                                              out_pad, <ptrdiff_t>c.out_w * out_pad, dst + o, out_pad,
                                                              1)
                    o += vectors * cl.lanes


cdef void output_vector_to_weight(const floating* acc, const Conv* c, const ChannelsLast* cl,
                                  floating* weight) noexcept nogil:
    """weight[g, o, ch, kh, kw] = acc[g, kh, kw * group_in + ch, o] for the real channels and terms."""
    cdef int g, o, ch, kh, kw
    for g in range(c.groups):
        for o in range(c.group_out):
            for ch in range(c.group_in):
                for kh in range(c.kernel_h):
                    for kw in range(c.kernel_w):
                        weight[0] = acc[((<ptrdiff_t>g * c.kernel_h + kh) * cl.term_rows + kw * cl.in_pad + ch)
                                        * cl.out_lanes + o]
                        weight += 1


cdef void channels_last_weight_partials(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                                        const Conv* c, const Direct* d, const ChannelsLast* cl, bint by_output,
                                        floating[:, ::1] partials, int threads):
    """partials[k] = the weight gradient of the k-th fixed run of units, by channels-last micro-kernel blocks
    with vectors over input channels (channels_last_weight_unit) or, `by_output`, over output channels
    (output_vector_weight_unit): each run sums into its thread's accumulator, then copies it out in the
    weight's layout."""
    cdef int chunks = partials.shape[0], units = c.batch * d.bands, chunk, unit
    cdef Py_ssize_t grads_size = <Py_ssize_t>d.band_rows * c.out_w * (cl.out_lanes if by_output else cl.mr)
    cdef Py_ssize_t acc_size = (<Py_ssize_t>c.groups * c.kernel_h * cl.term_rows * cl.out_lanes if by_output
                                else <Py_ssize_t>c.groups * cl.out_pad * d.taps * cl.in_pad)
    # by output channels, zeroed once: the padding channels of the transposed grad_output are read, never written
    cdef floating[:, ::1] workspace = aligned_rows(threads, cl.size + grads_size + acc_size, np.asarray(partials).dtype,
                                                   by_output)
    cdef floating* band
    cdef floating* acc
    for chunk in prange(chunks, nogil=True, schedule="dynamic", num_threads=threads):
        band = &workspace[omp_get_thread_num(), 0]
        acc = band + cl.size + grads_size
        memset(acc, 0, acc_size * sizeof(floating))
        for unit in range(chunk * units // chunks, (chunk + 1) * units // chunks):
            if by_output:
                output_vector_weight_unit(&gy[0, 0, 0, 0], &x[0, 0, 0, 0], c, d, cl, unit, acc, band, band + cl.size)
            else:
                channels_last_weight_unit(&gy[0, 0, 0, 0], &x[0, 0, 0, 0], c, d, cl, unit, acc, band, band + cl.size)
        if by_output:
            output_vector_to_weight(acc, c, cl, &partials[chunk, 0])
        else:
            channels_last_to_weight(acc, c, d, cl, &partials[chunk, 0])


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, :, :, ::1] gw,
                    p, int threads):
    """gw = the gradient of conv2d with respect to its weight, by the direct path: one partial per fixed run
    of units (never per thread), the partials then added in their order, each partial summed in the
    weight_path's blocks or tiles."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve the weight gradient of {p}")
    cdef floating[:, ::1] partials = np.empty((min(c.batch * d.bands, WEIGHT_PARTIALS),
                                               <Py_ssize_t>c.out_channels * c.k), np.asarray(gw).dtype)
    cdef ChannelsLast cl = channels_last_plan(&c, &d, sizeof(floating), True)
    cdef ChannelsLast narrow = channels_last_plan(&c, &d, sizeof(floating), False)
    cdef int path = weight_path(&c, &d, &cl, &narrow, sizeof(floating))
    if path == BY_INPUT_CHANNELS:
        channels_last_weight_partials(gy, x, &c, &d, &cl, False, partials, threads)
    elif path == BY_OUTPUT_CHANNELS:
        channels_last_weight_partials(gy, x, &c, &d, &narrow, True, partials, threads)
    else:
        direct_weight_partials(gy, x, &c, &d, partials, threads)
    cdef floating[::1] flat_gw = np.asarray(gw).reshape(-1)
    sum_partials(partials, flat_gw, threads)
