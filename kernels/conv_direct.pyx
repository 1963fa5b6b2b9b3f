# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The direct algorithm (on CPUs with AVX2 or AVX-512): each unit of work (an image, or a band of its output
rows) copies its input rows, zero-padded, into a per-thread buffer, a strided convolution's split into the
stride's phases (see direct_plan); every output pixel is then a fixed set of taps of that buffer at fixed
offsets, and the register tiles of direct_conv.h (channels x pixels) accumulate them without any column
matrix. The stride-1 input gradient is a forward convolution with the flipped kernel; the weight gradient
sums tiles of channels x taps over each unit's rows, in WEIGHT_PARTIALS fixed partials added in a fixed
order. The units depend on the shape only: results are bitwise identical whatever the number of threads.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stddef cimport ptrdiff_t
from libc.string cimport memcpy, memset

from conv_common cimport MIN_UNITS, WEIGHT_PARTIALS, Conv, bias_pointer, ceil_div, geometry, sum_partials
from openmp_shim cimport omp_get_thread_num

cdef extern from "direct_conv.h" nogil:
    ctypedef void (*direct_tile_float_fn)(const float* x, ptrdiff_t channel_stride, int channels,
                                          const ptrdiff_t* taps, int n_taps, const float* w, float* out)
    ctypedef void (*direct_tile_double_fn)(const double* x, ptrdiff_t channel_stride, int channels,
                                           const ptrdiff_t* taps, int n_taps, const double* w, double* out)
    ctypedef void (*direct_weight_float_fn)(const float* gy, ptrdiff_t gy_channel_stride, const float* band,
                                            ptrdiff_t band_row, const ptrdiff_t* taps, int rows, int width, float* out)
    ctypedef void (*direct_weight_double_fn)(const double* gy, ptrdiff_t gy_channel_stride, const double* band,
                                             ptrdiff_t band_row, const ptrdiff_t* taps, int rows, int width,
                                             double* out)
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
    ctypedef void (*evens_float_fn)(float* dst, const float* src, int n)
    ctypedef void (*evens_double_fn)(double* dst, const double* src, int n)
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
    int MICRO_NV
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


# A direct unit's padded input rows are cut to stay in a core's L2 cache beside the weights.
cdef Py_ssize_t BAND_BYTES = 1 << 19


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
    cdef int rows = ceil_div(c.out_h, ceil_div(MIN_UNITS, c.batch)) if c.batch < MIN_UNITS else c.out_h
    rows = <int>max(1, min(rows, BAND_BYTES // row_bytes - d.halo))
    d.band_rows = ceil_div(c.out_h, ceil_div(c.out_h, rows))  # bands of even height
    d.bands = ceil_div(c.out_h, d.band_rows)
    d.blocks = ceil_div(c.group_out, d.channels)
    d.taps = c.kernel_h * c.kernel_w
    d.plane = <ptrdiff_t>(d.band_rows + d.halo) * d.row_width
    d.channel_stride = d.phases_h * d.phases_w * d.plane
    d.buffer = c.group_in * d.channel_stride + d.width + (c.kernel_w - 1) * c.dilation_w // c.stride_w
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


cdef void direct_unit(const floating* x, const floating* packed, const floating* bias, const Conv* c,
                      const Direct* d, const ptrdiff_t* taps, int unit, floating* y, floating* band,
                      floating* tile) noexcept nogil:
    """Output rows [row, row + rows) of one image, every channel: pad the band's input once per group, then
    for each block of d.channels channels sweep the tiles across it."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row), pixels = rows * d.row_width
    cdef int g, block, start, channels
    cdef floating* y_block
    cdef const floating* w_block
    for g in range(c.groups):
        pad_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, row, rows, band)
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


cdef tap_offsets(const Conv* c, const Direct* d, int length):
    """Where each kernel tap (kh, kw) reads in a band (its phase plane, then its row and column there),
    relative to the output pixel; `length` long, the taps past the real ones reading at offset 0 (their
    results are dropped)."""
    offsets = np.zeros(length, np.intp)
    cdef int kh, kw, t = 0, down, across
    for kh in range(c.kernel_h):
        for kw in range(c.kernel_w):
            down, across = kh * c.dilation_h, kw * c.dilation_w
            offsets[t] = (((down % c.stride_h) * d.phases_w + across % c.stride_w) * d.plane
                          + (down // c.stride_h) * d.row_width + across // c.stride_w)
            t += 1
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



def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
                   floating[:, :, :, ::1] y, p, int threads):
    """y = conv2d(x, w) + bias (bias may be None), by the direct path."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve {p}")
    direct(x, w, bias_pointer(bias), y, &c, &d, False, threads)



def backward_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w,
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
        pad_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, d, row, rows, band)
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
                        d.tiles.weight_float(grads, stride, band + ch * d.channel_stride, d.row_width,
                                            taps + group, rows, c.out_w, sums)
                    else:
                        d.tiles.weight_double(grads, stride, band + ch * d.channel_stride, d.row_width,
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


cdef ChannelsLast channels_last_plan(const Conv* c, const Direct* d, Py_ssize_t itemsize):
    cdef ChannelsLast cl
    cl.mr = d.tiles.micro.mr
    cl.lanes = d.tiles.micro.lanes_double if itemsize == 8 else d.tiles.micro.lanes_float
    cl.in_pad = ceil_div(c.group_in, cl.lanes) * cl.lanes
    cl.out_pad = ceil_div(c.group_out, cl.mr) * cl.mr
    cl.band_w = (c.out_w - 1) * c.stride_w + (c.kernel_w - 1) * c.dilation_w + 1
    cl.band_h = (d.band_rows - 1) * c.stride_h + (c.kernel_h - 1) * c.dilation_h + 1
    cl.merged = c.stride_h * cl.band_w == c.stride_w * c.out_w
    cl.step = <ptrdiff_t>c.stride_w * cl.in_pad
    cl.row_step = <ptrdiff_t>c.stride_h * cl.band_w * cl.in_pad
    return cl


cdef void channels_last_band(const floating* x, const Conv* c, const ChannelsLast* cl, int row, int rows,
                             floating* band) noexcept nogil:
    """band[i, j, ch] = the zero-padded input of one image and group at row row * stride_h + i, column j (of
    the padding's coordinates), channel ch (zeros past group_in): the input the output rows [row, row + rows)
    read, channels last, so that each pixel's channels are one vector run."""
    cdef int in_rows = (rows - 1) * c.stride_h + (c.kernel_h - 1) * c.dilation_h + 1
    cdef int first = min(cl.band_w, c.pad_left), end = max(first, min(cl.band_w, c.pad_left + c.width))
    cdef int i, ih, ch, j
    cdef ptrdiff_t row_size = <ptrdiff_t>cl.band_w * cl.in_pad
    cdef floating* dst
    cdef const floating* src
    for i in range(in_rows):
        ih = row * c.stride_h - c.pad_top + i
        dst = band + i * row_size
        if ih < 0 or ih >= c.height:
            memset(dst, 0, row_size * sizeof(floating))
            continue
        memset(dst, 0, first * cl.in_pad * sizeof(floating))
        memset(dst + <ptrdiff_t>end * cl.in_pad, 0, (cl.band_w - end) * cl.in_pad * sizeof(floating))
        for ch in range(c.group_in):
            src = x + (<Py_ssize_t>ch * c.height + ih) * c.width - c.pad_left
            for j in range(first, end):
                dst[<ptrdiff_t>j * cl.in_pad + ch] = src[j]
        if cl.in_pad > c.group_in:
            for j in range(first, end):
                memset(dst + <ptrdiff_t>j * cl.in_pad + c.group_in, 0, (cl.in_pad - c.group_in) * sizeof(floating))


cdef void channels_last_weight_unit(const floating* gy, const floating* x, const Conv* c, const Direct* d,
                                    const ChannelsLast* cl, int unit, floating* acc, floating* band,
                                    floating* gy_block) noexcept nogil:
    """acc[g, o, tap, ch] += the weight gradient of one unit (output rows [row, row + rows) of one image), as
    micro-kernel blocks of mr output channels x input channels summed over the unit's output pixels (a run
    per output row, or one run where they are all evenly spaced), one kernel tap at a time. A block short of mr
    channels is read from a copy padded with zero channels, so no block reads past grad_output."""
    cdef int image = unit // d.bands, row = (unit % d.bands) * d.band_rows
    cdef int rows = min(d.band_rows, c.out_h - row)
    cdef int runs = 1 if cl.merged else rows, depth = rows * c.out_w if cl.merged else c.out_w
    cdef int g, block, channels, j, kh, kw, ch, vectors
    cdef Py_ssize_t plane = <Py_ssize_t>c.out_h * c.out_w, a_row
    cdef ptrdiff_t c_row = <ptrdiff_t>d.taps * cl.in_pad
    cdef const floating* grads
    cdef const floating* b
    cdef floating* dst
    for g in range(c.groups):
        channels_last_band(x + (<Py_ssize_t>image * c.channels + g * c.group_in) * c.height * c.width, c, cl, row,
                           rows, band)
        for block in range(cl.out_pad // cl.mr):
            channels = min(cl.mr, c.group_out - block * cl.mr)
            grads = gy + ((<Py_ssize_t>image * c.out_channels + g * c.group_out + block * cl.mr) * c.out_h
                          + row) * c.out_w
            a_row = plane
            if channels < cl.mr:
                a_row = <Py_ssize_t>rows * c.out_w
                for j in range(cl.mr):
                    if j < channels:
                        memcpy(gy_block + j * a_row, grads + j * plane, a_row * sizeof(floating))
                    else:
                        memset(gy_block + j * a_row, 0, a_row * sizeof(floating))
                grads = gy_block
            for kh in range(c.kernel_h):
                for kw in range(c.kernel_w):
                    b = band + (<ptrdiff_t>kh * c.dilation_h * cl.band_w + kw * c.dilation_w) * cl.in_pad
                    dst = acc + ((<ptrdiff_t>g * cl.out_pad + block * cl.mr) * d.taps + kh * c.kernel_w + kw) * cl.in_pad
                    ch = 0
                    while ch < cl.in_pad:
                        vectors = min(MICRO_NV, (cl.in_pad - ch) // cl.lanes)
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


cdef void channels_last_weight_partials(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                                        const Conv* c, const Direct* d, floating[:, ::1] partials, int threads):
    """partials[k] = the weight gradient of the k-th fixed run of units, by channels-last micro-kernel blocks:
    each run sums into its thread's accumulator (channels last), then copies it out in the weight's layout."""
    cdef ChannelsLast cl = channels_last_plan(c, d, sizeof(floating))
    cdef int chunks = partials.shape[0], units = c.batch * d.bands, chunk, unit
    cdef Py_ssize_t band_size = <Py_ssize_t>cl.band_h * cl.band_w * cl.in_pad
    cdef Py_ssize_t block_size = <Py_ssize_t>cl.mr * d.band_rows * c.out_w
    cdef Py_ssize_t acc_size = <Py_ssize_t>c.groups * cl.out_pad * d.taps * cl.in_pad
    cdef floating[:, ::1] workspace = np.empty((threads, band_size + block_size + acc_size),
                                               np.asarray(partials).dtype)
    cdef floating* band
    cdef floating* acc
    for chunk in prange(chunks, nogil=True, schedule="dynamic", num_threads=threads):
        band = &workspace[omp_get_thread_num(), 0]
        acc = band + band_size + block_size
        memset(acc, 0, acc_size * sizeof(floating))
        for unit in range(chunk * units // chunks, (chunk + 1) * units // chunks):
            channels_last_weight_unit(&gy[0, 0, 0, 0], &x[0, 0, 0, 0], c, d, &cl, unit, acc, band,
                                      band + band_size)
        channels_last_to_weight(acc, c, d, &cl, &partials[chunk, 0])


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, :, :, ::1] gw,
                    p, int threads):
    """gw = the gradient of conv2d with respect to its weight, by the direct path: one partial per fixed run
    of units (never per thread), the partials then added in their order. Groups of at least a vector of input
    channels are summed in channels-last micro-kernel blocks, narrower ones in weight tiles of taps."""
    cdef Conv c = geometry(p)
    cdef Direct d
    if not direct_plan(&c, sizeof(floating), &d):
        raise ValueError(f"the direct path does not serve the weight gradient of {p}")
    cdef floating[:, ::1] partials = np.empty((min(c.batch * d.bands, WEIGHT_PARTIALS),
                                               <Py_ssize_t>c.out_channels * c.k), np.asarray(gw).dtype)
    cdef int lanes = d.tiles.micro.lanes_double if sizeof(floating) == 8 else d.tiles.micro.lanes_float
    if c.group_in >= lanes:
        channels_last_weight_partials(gy, x, &c, &d, partials, threads)
    else:
        direct_weight_partials(gy, x, &c, &d, partials, threads)
    cdef floating[::1] flat_gw = np.asarray(gw).reshape(-1)
    sum_partials(partials, flat_gw, threads)
