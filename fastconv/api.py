"""The public operations: validate and normalize once, pick a backend, let it compute.

Semantics are PyTorch 2.13's `torch.nn.functional.conv2d` / `max_pool2d` and their gradients. Backends
receive C-contiguous arrays of one float dtype and a normalized params object, and never validate.
"""
from __future__ import annotations

import numpy as np

from . import dispatch
from .ops import CONV_OPS
from .params import (
    PoolBackwardParams,
    check_4d,
    check_float_arrays,
    check_pool_backward,
    conv_params,
    conv_transpose_params,
    pool_params,
    tap_range,
)

_INPUT = "(N, C_in, H, W)"
_WEIGHT = "(C_out, C_in/groups, KH, KW)"
_TRANSPOSED_WEIGHT = "(C_in, C_out/groups, KH, KW)"


def _for_kernels(a, dtype=None):
    """`a` C-contiguous and aligned, copied only where it is not: the compiled kernels load whole elements
    (an array one byte off alignment is valid NumPy, but a misaligned load in C is undefined)."""
    if dtype is None and a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.require(a, dtype, ("C_CONTIGUOUS", "ALIGNED"))


def _hashable(arg):
    """Lists and arrays given as stride/padding/... become tuples, so normalized params can be cached."""
    return tuple(np.asarray(arg).tolist()) if isinstance(arg, (list, np.ndarray)) else arg


def _conv_setup(x, w, stride, padding, dilation, groups):
    check_4d(x, "input", _INPUT)
    check_4d(w, "weight", _WEIGHT)
    return conv_params(x.shape, w.shape, _hashable(stride), _hashable(padding), _hashable(dilation), groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, backend=None):
    """2-D convolution (cross-correlation) of an NCHW batch, as torch.nn.functional.conv2d."""
    x, w = np.asarray(input), np.asarray(weight)
    b = None if bias is None else np.asarray(bias)
    dtype = check_float_arrays(input=x, weight=w, bias=b)
    p = _conv_setup(x, w, stride, padding, dilation, groups)
    if b is not None and b.shape != (p.out_channels,):
        raise ValueError(f"bias must have shape ({p.out_channels},) for weight {w.shape}, got {b.shape}")
    if p.batch == 0:
        return np.zeros(p.output_shape, dtype)
    x, w = _for_kernels(x), _for_kernels(w)
    b = None if b is None else _for_kernels(b)
    return dispatch.run("conv2d_forward", p, dtype, backend, x, w, b)


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    output_mask=(True, True, True), backend=None):
    """Gradients (input, weight, bias) of conv2d given grad_output; None where output_mask is False."""
    gy, x, w = np.asarray(grad_output), np.asarray(input), np.asarray(weight)
    dtype = check_float_arrays(grad_output=gy, input=x, weight=w)
    p = _conv_setup(x, w, stride, padding, dilation, groups)
    if gy.shape != p.output_shape:
        raise ValueError(
            f"grad_output must have the output's shape {p.output_shape} (input {x.shape}, weight {w.shape}), "
            f"got {gy.shape}"
        )
    want_input, want_weight, want_bias = _output_mask(output_mask)
    gy = _for_kernels(gy)
    grad_input = grad_weight = grad_bias = None
    if want_input:
        grad_input = _input_gradient(gy, w, p, dtype, backend)
    if want_weight:
        x = _for_kernels(x)
        grad_weight = (np.zeros(p.weight_shape, dtype) if p.batch == 0 else
                       dispatch.run("conv2d_backward_weight", p, dtype, backend, gy, x))
    if want_bias:
        # Summed in float64: N*H_out*W_out terms per channel is a long float32 sum.
        grad_bias = gy.sum(axis=(0, 2, 3), dtype=np.float64).astype(dtype)
    return grad_input, grad_weight, grad_bias


def _output_mask(output_mask):
    """(input, weight, bias): which gradients a backward computes."""
    try:
        want_input, want_weight, want_bias = (bool(m) for m in output_mask)
    except (TypeError, ValueError):
        raise TypeError(f"output_mask must be three bools, got {output_mask!r}") from None
    return want_input, want_weight, want_bias


def _input_gradient(gy, w, p, dtype, backend):
    """conv2d's gradient w.r.t. its input (gy C-contiguous): the transposed convolution of gy."""
    w = _for_kernels(w)
    if p.batch == 0:
        return np.zeros(p.input_shape, dtype)
    if np.isfinite(w.sum(dtype=np.float64)):
        return dispatch.run("conv2d_backward_input", p, dtype, backend, gy, w)
    finite = np.isfinite(w)
    gx = dispatch.run("conv2d_backward_input", p, dtype, backend, gy, np.where(finite, w, 0))
    _add_non_finite_taps(gx, gy, w, ~finite, p)
    return gx


def _add_non_finite_taps(gx, gy, w, bad, p):
    """gx += the input gradient through the weights marked `bad` (inf or NaN) alone, each tap only over the
    outputs whose window puts it on an input cell. The algorithms compute the input gradient with those
    weights zeroed: several of them multiply the zero padding by the weights, which would spread the NaN
    over the whole plane where PyTorch (and the loop definition) puts it only where the tap reaches."""
    per_group_out, per_group_in = p.out_channels // p.groups, p.in_channels // p.groups
    (sh, sw), (dh, dw), (top, _, left, _) = p.stride, p.dilation, p.padding
    for co, c, kh, kw in zip(*np.nonzero(bad)):
        ci = co // per_group_out * per_group_in + c
        i_lo, i_hi, rows = tap_range(0, p.out_height, p.in_height, sh, top, kh * dh)
        j_lo, j_hi, cols = tap_range(0, p.out_width, p.in_width, sw, left, kw * dw)
        if i_hi > i_lo and j_hi > j_lo:
            gx[:, ci, rows, cols] += gy[:, co, i_lo:i_hi, j_lo:j_hi] * w[co, c, kh, kw]


def _transpose_setup(x, w, stride, padding, output_padding, dilation, groups):
    check_4d(x, "input", _INPUT)
    check_4d(w, "weight", _TRANSPOSED_WEIGHT)
    return conv_transpose_params(x.shape, w.shape, _hashable(stride), _hashable(padding), _hashable(output_padding),
                                 _hashable(dilation), groups)


def _as_grad_output(x, p):
    """The transposed convolution's input as the grad_output of the convolution `p` whose input gradient it
    is: itself, or zero-extended at the bottom and right where that convolution's output is larger."""
    if x.shape == p.output_shape:
        return _for_kernels(x)
    extended = np.zeros(p.output_shape, x.dtype)
    extended[:, :, :x.shape[2], :x.shape[3]] = x
    return extended


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     backend=None):
    """2-D transposed convolution, as torch.nn.functional.conv_transpose2d (weight (C_in, C_out/groups, KH,
    KW)): the gradient of a convolution w.r.t. its input, computed by the same algorithms."""
    x, w = np.asarray(input), np.asarray(weight)
    b = None if bias is None else np.asarray(bias)
    dtype = check_float_arrays(input=x, weight=w, bias=b)
    p = _transpose_setup(x, w, stride, padding, output_padding, dilation, groups)
    if b is not None and b.shape != (p.in_channels,):
        raise ValueError(f"bias must have shape ({p.in_channels},) for weight {w.shape} and groups={groups}, "
                         f"got {b.shape}")
    y = _input_gradient(_as_grad_output(x, p), w, p, dtype, backend)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def conv_transpose2d_backward(grad_output, input, weight, stride=1, padding=0, output_padding=0, groups=1,
                              dilation=1, *, output_mask=(True, True, True), backend=None):
    """Gradients (input, weight, bias) of conv_transpose2d given grad_output; None where output_mask is False.
    The input gradient is a forward convolution of grad_output, the weight gradient a convolution's weight
    gradient with the two roles swapped."""
    gy, x, w = np.asarray(grad_output), np.asarray(input), np.asarray(weight)
    dtype = check_float_arrays(grad_output=gy, input=x, weight=w)
    p = _transpose_setup(x, w, stride, padding, output_padding, dilation, groups)
    if gy.shape != p.input_shape:
        raise ValueError(f"grad_output must have the output's shape {p.input_shape} (input {x.shape}, weight "
                         f"{w.shape}), got {gy.shape}")
    want_input, want_weight, want_bias = _output_mask(output_mask)
    gy = _for_kernels(gy)
    grad_input = grad_weight = grad_bias = None
    if want_input:
        if p.batch == 0:
            grad_input = np.zeros(x.shape, dtype)
        else:
            grad_input = dispatch.run("conv2d_forward", p, dtype, backend, gy, _for_kernels(w), None)
            if grad_input.shape != x.shape:
                grad_input = np.ascontiguousarray(grad_input[:, :, :x.shape[2], :x.shape[3]])
    if want_weight:
        grad_weight = (np.zeros(w.shape, dtype) if p.batch == 0 else
                       dispatch.run("conv2d_backward_weight", p, dtype, backend, _as_grad_output(x, p), gy))
    if want_bias:
        grad_bias = gy.sum(axis=(0, 2, 3), dtype=np.float64).astype(dtype)
    return grad_input, grad_weight, grad_bias


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
               return_indices=False, backend=None):
    """2-D max-pooling, as torch.nn.functional.max_pool2d; with return_indices, also the int64 argmax
    indices, flat in each input H*W plane (without, the algorithms that can compute the values alone)."""
    x = np.asarray(input)
    dtype = check_float_arrays(input=x)
    check_4d(x, "input", "(N, C, H, W)")
    p = pool_params(x.shape, _hashable(kernel_size), _hashable(stride), _hashable(padding),
                    _hashable(dilation), ceil_mode, bool(return_indices))
    if p.batch == 0:
        y, indices = np.zeros(p.output_shape, dtype), np.zeros(p.output_shape, np.int64)
    else:
        x = _for_kernels(x)
        y, indices = dispatch.run("max_pool2d_forward", p, dtype, backend, x)
    return (y, indices) if return_indices else y


def max_pool2d_backward(grad_output, indices, input_shape, *, backend=None):
    """Gradient of max_pool2d w.r.t. its input: grad_output scattered (and summed) at `indices`.
    An index outside its H*W plane raises ValueError; nothing is written out of bounds."""
    gy, idx = np.asarray(grad_output), np.asarray(indices)
    p = check_pool_backward(gy, idx, input_shape)
    if p.batch == 0:
        return np.zeros(p.input_shape, gy.dtype)
    gy, idx = _for_kernels(gy), _for_kernels(idx, np.int64)
    return dispatch.run("max_pool2d_backward", p, gy.dtype, backend, gy, idx)


def _conv_arguments(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _pool_arguments(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=True):
    return input, dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode,
                       return_indices=return_indices)


def _array(value, dtype, rng):
    """An argument of explain(): an array, or a shape (a tuple of ints) to fill with normal values."""
    if isinstance(value, tuple) and all(isinstance(n, int) for n in value):
        return rng.standard_normal(value).astype(dtype)
    return _for_kernels(np.asarray(value))


def explain(op, *args, backend=None, dtype=None, **kwargs) -> dispatch.Choice:
    """Which algorithm runs `op` for a call, and why (printable; its fields say the same).

    op: one of "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight", "max_pool2d_forward",
    "max_pool2d_backward". The other arguments are those of conv2d (for the three convolution ops) or of
    max_pool2d (for the two pooling ops; return_indices=False for the forward without indices), with arrays
    or only their shapes (then `dtype`, float32 unless given). Where the choice is not made yet and `auto`
    measures, it is measured now, on normal values of those shapes, and remembered as a call's would be.
    """
    dispatch.check_op(op)
    requested = dispatch.get_backend() if backend is None else dispatch.check_name(backend)
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype or np.float32)
    if op in CONV_OPS:
        x, w, b, conv = _conv_arguments(*args, **kwargs)
        x, w = _array(x, dtype, rng), _array(w, dtype, rng)
        b = None if b is None else _array(b, dtype, rng)
        dtype = check_float_arrays(input=x, weight=w, bias=b)
        p = _conv_setup(x, w, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
        gy = rng.standard_normal(p.output_shape).astype(dtype)
        arrays = {"conv2d_forward": (x, w, b), "conv2d_backward_input": (gy, w), "conv2d_backward_weight": (gy, x)}[op]
        return dispatch.choose(op, p, dtype, requested, arrays)
    x, pool = _pool_arguments(*args, **kwargs)
    x = _array(x, dtype, rng)
    dtype = check_float_arrays(input=x)
    check_4d(x, "input", "(N, C, H, W)")
    p = pool_params(x.shape, *(_hashable(pool[k]) for k in ("kernel_size", "stride", "padding", "dilation")),
                    pool["ceil_mode"], bool(pool.pop("return_indices")))
    if op == "max_pool2d_forward":
        return dispatch.choose(op, p, dtype, requested, (x,))
    _, indices = max_pool2d(x, **pool, return_indices=True)
    gy = rng.standard_normal(p.output_shape).astype(dtype)
    return dispatch.choose(op, PoolBackwardParams(p.input_shape, p.output_shape), dtype, requested, (gy, indices))
