"""The reference backend: the seed note's formulas, loop for loop, in plain Python and NumPy.

Forward, per output pixel (i, j):     O[i, j] = sum over the window of X[i*s + kh*d, j*s + kw*d] * F[kh, kw]
Weight gradient (chain rule):         dL/dF += dL/dO[i, j] * (the window of X that made O[i, j])
Input gradient (chain rule):          dL/dX[window of O[i, j]] += dL/dO[i, j] * F
The reduction over one window (input channels x kernel) is a NumPy dot; everything else is a Python loop.
It is the oracle the other backends are tested against: readable first, fast enough for tests.
"""
import math

import numpy as np

from ..ops import Algorithm
from ..params import index_out_of_plane


def _padded(x, p):
    top, bottom, left, right = p.padding
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def _windows(p):
    """Yield (group, in-channel slice, out-channel slice, i, j, row slice, col slice) for every output
    pixel of every group: the window of the padded input that produces it."""
    (sh, sw), (dh, dw) = p.stride, p.dilation
    c_in, c_out = p.in_channels // p.groups, p.out_channels // p.groups
    for g in range(p.groups):
        ci, co = slice(g * c_in, (g + 1) * c_in), slice(g * c_out, (g + 1) * c_out)
        for i in range(p.out_height):
            rows = slice(i * sh, i * sh + dh * (p.kernel_height - 1) + 1, dh)
            for j in range(p.out_width):
                cols = slice(j * sw, j * sw + dw * (p.kernel_width - 1) + 1, dw)
                yield g, ci, co, i, j, rows, cols


def conv2d_forward(x, w, b, p):
    xp = _padded(x, p)
    y = np.empty(p.output_shape, x.dtype)
    filters = w.reshape(p.groups, p.out_channels // p.groups, -1)  # per group: (C_out/g, C_in/g*KH*KW)
    for n in range(p.batch):
        for g, ci, co, i, j, rows, cols in _windows(p):
            y[n, co, i, j] = filters[g] @ xp[n, ci, rows, cols].ravel()
    if b is not None:
        y += b[:, None, None]
    return y


def conv2d_backward_input(gy, w, p):
    gxp = np.zeros((p.batch, p.in_channels, p.padded_height, p.padded_width), gy.dtype)
    for n in range(p.batch):
        for _, ci, co, i, j, rows, cols in _windows(p):
            gxp[n, ci, rows, cols] += np.tensordot(gy[n, co, i, j], w[co], axes=1)
    top, _, left, _ = p.padding
    return np.ascontiguousarray(gxp[:, :, top:top + p.in_height, left:left + p.in_width])


def conv2d_backward_weight(gy, x, p):
    xp = _padded(x, p)
    gw = np.zeros(p.weight_shape, gy.dtype)
    for n in range(p.batch):
        for _, ci, co, i, j, rows, cols in _windows(p):
            gw[co] += np.multiply.outer(gy[n, co, i, j], xp[n, ci, rows, cols])
    return gw


def max_pool2d_forward(x, p):
    """PyTorch's rule: padded cells never win; a later element wins if it is greater or NaN, so the
    first maximum wins a tie and the last NaN wins a window with NaNs."""
    y = np.empty(p.output_shape, x.dtype)
    indices = np.empty(p.output_shape, np.int64)
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    for n in range(p.batch):
        for c in range(p.channels):
            plane = x[n, c]
            for i in range(p.out_height):
                for j in range(p.out_width):
                    best, best_index = None, -1
                    for r in range(i * sh - ph, i * sh - ph + dh * p.kernel_height, dh):
                        for s in range(j * sw - pw, j * sw - pw + dw * p.kernel_width, dw):
                            if 0 <= r < p.in_height and 0 <= s < p.in_width:
                                value = plane[r, s]
                                if best_index < 0 or value > best or math.isnan(value):
                                    best, best_index = value, r * p.in_width + s
                    y[n, c, i, j], indices[n, c, i, j] = best, best_index
    return y, indices if p.with_indices else None


def max_pool2d_backward(gy, indices, p):
    input_shape = p.input_shape
    n_planes, plane = input_shape[0] * input_shape[1], input_shape[2] * input_shape[3]
    gx = np.zeros((n_planes, plane), gy.dtype)
    flat_gy, flat_indices = gy.reshape(n_planes, -1), indices.reshape(n_planes, -1)
    for k in range(n_planes):
        for grad, index in zip(flat_gy[k], flat_indices[k]):
            if not 0 <= index < plane:
                raise index_out_of_plane(index, input_shape)
            gx[k, index] += grad
    return gx.reshape(input_shape)


# One algorithm, named as the backend.
ALGORITHMS = (Algorithm("naive", {
    "conv2d_forward": conv2d_forward, "conv2d_backward_input": conv2d_backward_input,
    "conv2d_backward_weight": conv2d_backward_weight,
    "max_pool2d_forward": max_pool2d_forward, "max_pool2d_backward": max_pool2d_backward,
}),)
