# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Winograd's algorithm for 3x3, stride-1, undilated convolutions (winograd.h): F(4x4, 3x3) (m = 4) and
F(2x2, 3x3) (m = 2), forward, input gradient (the forward of the flipped weights, as for the direct path) and
weight gradient (in the transformed domain), on the register-tiled micro-kernels of micro_gemm.h (AVX-512 or
AVX2, chosen at run time). A forward's blocks of tiles are independent units shared out among the threads, each
with its own workspace (bounded, whatever the batch); a weight gradient's blocks are shared by all threads,
which split each block's transforms and products so that every sum runs in a fixed order: results are bitwise
identical whatever the number of threads. Every function returns False, leaving its output unspecified, where a
transformed value or a result is not finite: a transform spreads an inf or a NaN over a whole tile, so the
caller then runs the direct algorithm instead.
"""
import numpy as np

from cython cimport floating
from libc.stddef cimport ptrdiff_t

from conv_common cimport MIN_UNITS, aligned_rows, bias_pointer, ceil_div

cdef extern from "winograd.h" nogil:
    ctypedef struct wino_shape:
        int m, alpha, batch, channels, height, width, out_channels, out_h, out_w, pad_top, pad_left
        int tiles_w, tiles_plane
        ptrdiff_t in_image, out_image
        int block, k_pad, c_pad
        ptrdiff_t v_point, m_point, u_point
    ctypedef struct micro_kernels:
        const char* name
        int mr, lanes_float, lanes_double
    ctypedef int (*wino_forward_float_fn)(const wino_shape*, int, const float*, ptrdiff_t, const float*, ptrdiff_t,
                                          const float*, float*, ptrdiff_t, float*, ptrdiff_t, int*, int)
    ctypedef int (*wino_forward_double_fn)(const wino_shape*, int, const double*, ptrdiff_t, const double*,
                                           ptrdiff_t, const double*, double*, ptrdiff_t, double*, ptrdiff_t, int*,
                                           int)
    ctypedef int (*wino_weight_float_fn)(const wino_shape*, int, const float*, ptrdiff_t, const float*, ptrdiff_t,
                                         float*, float*, float*, int*, int)
    ctypedef int (*wino_weight_double_fn)(const wino_shape*, int, const double*, ptrdiff_t, const double*,
                                          ptrdiff_t, double*, double*, double*, int*, int)
    ctypedef void (*wino_weights_float_fn)(const wino_shape*, int, const float*, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                           int, float*, int)
    ctypedef void (*wino_weights_double_fn)(const wino_shape*, int, const double*, ptrdiff_t, ptrdiff_t,
                                            ptrdiff_t, int, double*, int)
    ctypedef struct wino_kernels:
        micro_kernels micro
        wino_forward_float_fn forward_float
        wino_forward_double_fn forward_double
        wino_weight_float_fn weight_float
        wino_weight_double_fn weight_double
        wino_weights_float_fn weights_float
        wino_weights_double_fn weights_double
    int wino_select(const char* name)
    wino_kernels wino_current()
    int MICRO_NV

VECTOR_ISAS = ("avx512", "avx2", "none")  # the micro-kernels, best first ("none": Winograd serves nothing)


def use_vector_isa(name):
    """Use the named micro-kernels (VECTOR_ISAS; the best the CPU runs by default). Returns False, changing
    nothing, when the CPU cannot run them."""
    return bool(wino_select(name.encode()))


def vector_isa():
    return wino_current().micro.name.decode()


for _isa in VECTOR_ISAS:
    if use_vector_isa(_isa):
        break

# A forward block's transformed tiles and products (alpha^2 x block x (C + K)) are cut to stay in a core's L2
# cache; a weight gradient's block, shared by every thread, to stay in the last-level cache.
cdef Py_ssize_t FORWARD_BLOCK_BYTES = 1 << 19
cdef Py_ssize_t WEIGHT_BLOCK_BYTES = 1 << 23


cdef wino_shape shape_of(p, int m, const wino_kernels* k, Py_ssize_t itemsize, bint weight_gradient):
    """The tile geometry of one group of the convolution `p` (3x3, stride 1) and its block of tiles."""
    cdef wino_shape s
    cdef int lanes = k.micro.lanes_double if itemsize == 8 else k.micro.lanes_float
    cdef int width = MICRO_NV * lanes, n
    s.m, s.alpha = m, m + 2
    s.batch, s.channels, s.height, s.width = p.batch, p.in_channels // p.groups, p.in_height, p.in_width
    s.out_channels, s.out_h, s.out_w = p.out_channels // p.groups, p.out_height, p.out_width
    s.pad_top, s.pad_left = p.padding[0], p.padding[2]
    s.tiles_w = ceil_div(s.out_w, m)
    s.tiles_plane = ceil_div(s.out_h, m) * s.tiles_w
    s.in_image = <ptrdiff_t>p.in_channels * s.height * s.width
    s.out_image = <ptrdiff_t>p.out_channels * s.out_h * s.out_w
    s.k_pad = ceil_div(s.out_channels, k.micro.mr) * k.micro.mr
    s.c_pad = ceil_div(s.channels, lanes) * lanes
    cdef Py_ssize_t tiles = <Py_ssize_t>s.batch * s.tiles_plane
    cdef Py_ssize_t per_tile = <Py_ssize_t>s.alpha * s.alpha * itemsize
    if weight_gradient:
        n = <int>max(1, min(WEIGHT_BLOCK_BYTES // (per_tile * (s.c_pad + s.k_pad) * lanes), ceil_div(tiles, lanes)))
        s.block = n * lanes
    else:
        n = <int>max(1, min(FORWARD_BLOCK_BYTES // (per_tile * (s.channels + s.k_pad) * width), ceil_div(tiles, width)))
        while n > 1 and p.groups * ceil_div(tiles, <Py_ssize_t>n * width) < MIN_UNITS:
            n -= 1
        s.block = n * width
    if weight_gradient:  # V[p][t][c], D[p][k][t], du[p][k][c]
        s.v_point = point_stride(<ptrdiff_t>s.block * s.c_pad, lanes, itemsize)
        s.m_point = point_stride(<ptrdiff_t>s.k_pad * s.block, lanes, itemsize)
        s.u_point = point_stride(<ptrdiff_t>s.k_pad * s.c_pad, lanes, itemsize)
    else:  # V[p][c][t], M[p][k][t], U[p][k / MR][c][k % MR]
        s.v_point = point_stride(<ptrdiff_t>s.channels * s.block, lanes, itemsize)
        s.m_point = point_stride(<ptrdiff_t>s.k_pad * s.block, lanes, itemsize)
        s.u_point = point_stride(<ptrdiff_t>s.k_pad * s.channels, lanes, itemsize)
    return s


cdef ptrdiff_t point_stride(ptrdiff_t elements, int lanes, Py_ssize_t itemsize):
    """`elements` rounded up to whole vectors, and one vector more where that is a multiple of 1 KiB."""
    cdef ptrdiff_t stride = (elements + lanes - 1) // lanes * lanes
    return stride + lanes if stride * itemsize % 1024 == 0 else stride


cdef bint convolve(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating* bias,
                   floating[:, :, :, ::1] y, p, int m, bint flipped, int threads):
    """y = conv2d(x, w) + bias by Winograd F(m x m, 3 x 3); flipped: w is the weight of the convolution whose
    input gradient this is (the forward `p` is then its input_gradient_as_forward). False where a value was not
    finite."""
    cdef wino_kernels k = wino_current()
    cdef wino_shape s = shape_of(p, m, &k, sizeof(floating), False)
    cdef int groups = p.groups
    dtype = np.asarray(y).dtype
    cdef floating[::1] u = aligned_rows(1, <Py_ssize_t>groups * s.alpha * s.alpha * s.u_point, dtype, False)[0]
    cdef ptrdiff_t k_stride = s.channels * 9, c_stride = 9, g_stride = <ptrdiff_t>s.out_channels * s.channels * 9
    if flipped:  # w is (groups * channels, out_channels, 3, 3) per group: the channel axes swap
        k_stride, c_stride = 9, s.out_channels * 9
    cdef Py_ssize_t work_size = <Py_ssize_t>s.alpha * s.alpha * (s.v_point + s.m_point)
    cdef floating[:, ::1] work = aligned_rows(threads, work_size, dtype, False)
    cdef int[:, ::1] tiles = np.empty((threads, 3 * s.block), np.intc)
    cdef ptrdiff_t x_group = <ptrdiff_t>s.channels * s.height * s.width
    cdef ptrdiff_t y_group = <ptrdiff_t>s.out_channels * s.out_h * s.out_w
    cdef ptrdiff_t u_group = <ptrdiff_t>s.alpha * s.alpha * s.u_point
    cdef int bad
    with nogil:
        if floating is float:
            k.weights_float(&s, groups, &w[0, 0, 0, 0], k_stride, c_stride, g_stride, flipped, &u[0], threads)
            bad = k.forward_float(&s, groups, &x[0, 0, 0, 0], x_group, &u[0], u_group, bias, &y[0, 0, 0, 0], y_group,
                                  &work[0, 0], work.shape[1], &tiles[0, 0], threads)
        else:
            k.weights_double(&s, groups, &w[0, 0, 0, 0], k_stride, c_stride, g_stride, flipped, &u[0], threads)
            bad = k.forward_double(&s, groups, &x[0, 0, 0, 0], x_group, &u[0], u_group, bias, &y[0, 0, 0, 0],
                                   y_group, &work[0, 0], work.shape[1], &tiles[0, 0], threads)
    return not bad


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
            floating[:, :, :, ::1] y, p, int m, int threads):
    """y = conv2d(x, w) + bias (bias may be None); False where a value was not finite."""
    return convolve(x, w, bias_pointer(bias), y, p, m, False, threads)


def backward_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w, floating[:, :, :, ::1] gx,
                   p, int m, int threads):
    """gx = the gradient of conv2d with respect to its input: the forward convolution of gy with the flipped
    weights (p.input_gradient_as_forward, the input cropped where the padding exceeds 2)."""
    return convolve(gy, w, NULL, gx, p.input_gradient_as_forward(allow_cropping=True), m, True, threads)


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, :, :, ::1] gw,
                    p, int m, int threads):
    """gw = the gradient of conv2d with respect to its weight; False where a value was not finite."""
    cdef wino_kernels k = wino_current()
    cdef wino_shape s = shape_of(p, m, &k, sizeof(floating), True)
    dtype = np.asarray(gw).dtype
    cdef floating[::1] du = aligned_rows(1, <Py_ssize_t>s.alpha * s.alpha * s.u_point, dtype, False)[0]
    # zeros: the rows of D past out_channels are read by the products and never written
    cdef floating[::1] work = aligned_rows(1, <Py_ssize_t>s.alpha * s.alpha * (s.v_point + s.m_point), dtype,
                                           True)[0]
    cdef int[::1] tiles = np.empty(3 * s.block, np.intc)
    cdef ptrdiff_t x_group = <ptrdiff_t>s.channels * s.height * s.width
    cdef ptrdiff_t gy_group = <ptrdiff_t>s.out_channels * s.out_h * s.out_w
    cdef int groups = p.groups, bad
    with nogil:
        if floating is float:
            bad = k.weight_float(&s, groups, &x[0, 0, 0, 0], x_group, &gy[0, 0, 0, 0], gy_group, &du[0],
                                 &gw[0, 0, 0, 0], &work[0], &tiles[0], threads)
        else:
            bad = k.weight_double(&s, groups, &x[0, 0, 0, 0], x_group, &gy[0, 0, 0, 0], gy_group, &du[0],
                                  &gw[0, 0, 0, 0], &work[0], &tiles[0], threads)
    return not bad
