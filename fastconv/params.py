"""Normalized, validated parameters of each operation: the one place for shape math and validation.

The seed's output size O = 1 + (N - F + 2P) / S is generalized here to dilation D and uneven padding
(P_begin, P_end): O = 1 + (N + P_begin + P_end - D*(F - 1) - 1) // S.  Every check raises ValueError
(shapes, values) or TypeError (dtypes, types) with a message naming the argument and the shapes.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _pair(value, name):
    """An int or a pair of ints, as a pair of Python ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _at_least(pair, minimum, name):
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {pair}")
    return pair


def _output_size(size, pad_begin, pad_end, kernel, stride, dilation):
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def tap_range(out_start, out_stop, size, stride, pad, offset):
    """Along one axis, the output positions [lo, hi) (relative to out_start) at which the tap at
    `offset` (= kernel index * dilation) lands inside the input, and the input slice it reads there."""
    lo = max(out_start, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(out_stop, (size - 1 + pad - offset) // stride + 1)
    if hi <= lo:
        return 0, 0, slice(0, 0)
    first = lo * stride - pad + offset
    return lo - out_start, hi - out_start, slice(first, first + (hi - lo - 1) * stride + 1, stride)


def taps(kernel, size, stride, pad, dilation, out_start, out_stop):
    """tap_range for every kernel index along one axis."""
    return [tap_range(out_start, out_stop, size, stride, pad, k * dilation) for k in range(kernel)]


def check_float_arrays(**arrays):
    """All arrays float32 or float64 and of one dtype; returns that dtype."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"arrays must share one dtype, got {found}")
    return next(iter(dtypes.values()))


def check_4d(array, name, layout):
    if array.ndim != 4:
        hint = " (unbatched 3-D input is not supported: add a batch axis, x[None])" if array.ndim == 3 else ""
        raise ValueError(f"{name} must be 4-D {layout}, got shape {array.shape}{hint}")


@dataclass(frozen=True)
class ConvParams:
    """A 2-D convolution, fully normalized: shapes, stride, dilation, groups and four padding values."""

    batch: int
    in_channels: int
    in_height: int
    in_width: int
    out_channels: int
    kernel_height: int
    kernel_width: int
    stride: tuple  # (sh, sw)
    padding: tuple  # (top, bottom, left, right)
    dilation: tuple  # (dh, dw)
    groups: int
    out_height: int
    out_width: int

    @property
    def input_shape(self):
        return (self.batch, self.in_channels, self.in_height, self.in_width)

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, self.kernel_height, self.kernel_width)

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def padded_height(self):
        return self.in_height + self.padding[0] + self.padding[1]

    @property
    def padded_width(self):
        return self.in_width + self.padding[2] + self.padding[3]

    @property
    def flops(self):
        """2 * N * Cout * Hout * Wout * (Cin / groups) * KH * KW: one multiply and one add per term."""
        terms_per_output = (self.in_channels // self.groups) * self.kernel_height * self.kernel_width
        return 2 * math.prod(self.output_shape) * terms_per_output

    def __str__(self):
        return (f"input {self.input_shape}, weight {self.weight_shape}, stride {self.stride}, padding "
                f"{self.padding}, dilation {self.dilation}, groups {self.groups}")

    @property
    def work(self):
        """Multiply-adds: what decides whether a call is worth threads (threads.threads_for) or a measurement."""
        return self.flops // 2

    def input_gradient_as_forward(self, allow_cropping=False):
        """For stride 1, the input gradient is a forward convolution of grad_output with the weight flipped
        and its channel axes swapped per group, padded by the kernel span less the original padding.
        Returns that convolution's params, or None when it does not exist (stride > 1, or padding larger
        than the kernel span, which needs negative padding: a cropped grad_output, allowed on request)."""
        spans = (self.dilation[0] * (self.kernel_height - 1),) * 2 + (self.dilation[1] * (self.kernel_width - 1),) * 2
        padding = tuple(span - pad for span, pad in zip(spans, self.padding))
        if self.stride != (1, 1) or (min(padding) < 0 and not allow_cropping):
            return None
        return replace(
            self, in_channels=self.out_channels, in_height=self.out_height, in_width=self.out_width,
            out_channels=self.in_channels, padding=padding, out_height=self.in_height, out_width=self.in_width,
        )

    def bytes_moved(self, itemsize):
        """Bytes of input, weight and output, each touched once: the minimum traffic of a forward pass."""
        return (math.prod(self.input_shape) + math.prod(self.weight_shape) + math.prod(self.output_shape)) * itemsize


@functools.lru_cache(maxsize=4096)
def conv_params(input_shape, weight_shape, stride, padding, dilation, groups) -> ConvParams:
    """Validate a convolution's shapes and arguments (all hashable: ints, pairs, strings) and normalize them."""
    stride = _at_least(_pair(stride, "stride"), 1, "stride")
    dilation = _at_least(_pair(dilation, "dilation"), 1, "dilation")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n, c_in, h, w = input_shape
    c_out, c_in_per_group, kh, kw = weight_shape
    if min(c_in, h, w) < 1 or min(c_out, c_in_per_group, kh, kw) < 1:
        raise ValueError(f"input {input_shape} and weight {weight_shape} must have no empty axis but the batch")
    if c_in != c_in_per_group * groups:
        raise ValueError(
            f"input has {c_in} channels but weight {weight_shape} with groups={groups} expects "
            f"{c_in_per_group * groups} (weight.shape[1] * groups)"
        )
    if c_out % groups:
        raise ValueError(f"weight {weight_shape}: out_channels {c_out} is not divisible by groups={groups}")

    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            # Odd totals put the extra row/column at the bottom/right, as PyTorch does.
            pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _at_least(_pair(padding, "padding"), 0, "padding")
        pads = (ph, ph, pw, pw)

    padded_h, padded_w = h + pads[0] + pads[1], w + pads[2] + pads[3]
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if span_h > padded_h or span_w > padded_w:
        raise ValueError(
            f"kernel {(kh, kw)} with dilation {dilation} spans {(span_h, span_w)}, larger than the padded "
            f"input {(padded_h, padded_w)} (input {input_shape}, padding {pads[::2]})"
        )
    return ConvParams(
        batch=n, in_channels=c_in, in_height=h, in_width=w, out_channels=c_out,
        kernel_height=kh, kernel_width=kw, stride=stride, padding=pads, dilation=dilation, groups=groups,
        out_height=_output_size(h, pads[0], pads[1], kh, stride[0], dilation[0]),
        out_width=_output_size(w, pads[2], pads[3], kw, stride[1], dilation[1]),
    )


@functools.lru_cache(maxsize=4096)
def conv_transpose_params(input_shape, weight_shape, stride, padding, output_padding, dilation, groups) -> ConvParams:
    """Validate a transposed convolution (torch.nn.functional.conv_transpose2d: weight (C_in, C_out/groups, KH,
    KW)) and return the convolution whose input gradient it is: that convolution's input is the transposed
    one's output, its output the transposed one's input, except where output_padding >= stride (allowed when
    it is below the dilation), whose output then has rows or columns more, beyond the transposed one's input."""
    stride = _at_least(_pair(stride, "stride"), 1, "stride")
    dilation = _at_least(_pair(dilation, "dilation"), 1, "dilation")
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair for a transposed convolution, got {padding!r}")
    padding = _at_least(_pair(padding, "padding"), 0, "padding")
    output_padding = _at_least(_pair(output_padding, "output_padding"), 0, "output_padding")
    for op, s, d in zip(output_padding, stride, dilation):
        if op >= s and op >= d:
            raise ValueError(f"output_padding {output_padding} must be smaller than either the stride {stride} "
                             f"or the dilation {dilation}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n, c_in, h, w = input_shape
    if weight_shape[0] != c_in:
        raise ValueError(f"input {input_shape} has {c_in} channels but weight {weight_shape} (C_in, C_out/groups, "
                         f"KH, KW) expects {weight_shape[0]}")
    if c_in % groups:
        raise ValueError(f"input channels {c_in} are not divisible by groups={groups}")
    size = tuple((i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, s, p, d, k, op in
                 zip((h, w), stride, padding, dilation, weight_shape[2:], output_padding))
    if min(size) < 1 and min(h, w) >= 1:
        raise ValueError(f"input {input_shape} with weight {weight_shape}, stride {stride}, padding {padding}, "
                         f"dilation {dilation} and output_padding {output_padding} gives an output of {size}: "
                         f"too small")
    return conv_params((n, weight_shape[1] * groups, *size), weight_shape, stride, padding, dilation, groups)


@dataclass(frozen=True)
class PoolParams:
    """A 2-D max-pooling, fully normalized. Pool padding is symmetric: (ph, pw)."""

    batch: int
    channels: int
    in_height: int
    in_width: int
    kernel_height: int
    kernel_width: int
    stride: tuple
    padding: tuple  # (ph, pw)
    dilation: tuple
    ceil_mode: bool
    out_height: int
    out_width: int
    with_indices: bool = True  # False: the forward computes the values only (inference)

    @property
    def input_shape(self):
        return (self.batch, self.channels, self.in_height, self.in_width)

    @property
    def output_shape(self):
        return (self.batch, self.channels, self.out_height, self.out_width)

    def __str__(self):
        return (f"input {self.input_shape}, kernel {(self.kernel_height, self.kernel_width)}, stride {self.stride}, "
                f"padding {self.padding}, dilation {self.dilation}, ceil_mode {self.ceil_mode}"
                f"{'' if self.with_indices else ', values only'}")

    @property
    def work(self):
        """Elements of the input."""
        return math.prod(self.input_shape)

    def bytes_moved(self, itemsize):
        """Bytes of input and output read or written once, int64 indices included where computed."""
        out = math.prod(self.output_shape)
        return math.prod(self.input_shape) * itemsize + out * (itemsize + (8 if self.with_indices else 0))


def _pool_output_size(size, kernel, pad, stride, dilation, ceil_mode):
    """PyTorch's pooling_output_shape: with ceil_mode the last window must start inside the input or
    its left padding."""
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@functools.lru_cache(maxsize=4096)
def pool_params(input_shape, kernel_size, stride, padding, dilation, ceil_mode, with_indices=True) -> PoolParams:
    """Validate a max-pooling's shape and arguments (all hashable) and normalize them; with_indices False
    for a forward whose indices are not asked for."""
    kernel = _at_least(_pair(kernel_size, "kernel_size"), 1, "kernel_size")
    stride = kernel if stride is None else _at_least(_pair(stride, "stride"), 1, "stride")
    dilation = _at_least(_pair(dilation, "dilation"), 1, "dilation")
    pad = _at_least(_pair(padding, "padding"), 0, "padding")
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise ValueError(f"padding {pad} must be at most half of kernel_size {kernel}")
    n, c, h, w = input_shape
    if min(c, h, w) < 1:
        raise ValueError(f"input {input_shape} must have no empty axis but the batch")
    out_h = _pool_output_size(h, kernel[0], pad[0], stride[0], dilation[0], ceil_mode)
    out_w = _pool_output_size(w, kernel[1], pad[1], stride[1], dilation[1], ceil_mode)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"max_pool2d of input {input_shape} with kernel_size {kernel}, stride {stride}, padding {pad}, "
            f"dilation {dilation} gives an empty output {(out_h, out_w)}"
        )
    for axis, size, out in ((0, h, out_h), (1, w, out_w)):
        _check_windows_touch_input(axis, size, out, kernel[axis], stride[axis], pad[axis], dilation[axis])
    return PoolParams(
        batch=n, channels=c, in_height=h, in_width=w, kernel_height=kernel[0], kernel_width=kernel[1],
        stride=stride, padding=pad, dilation=dilation, ceil_mode=bool(ceil_mode), out_height=out_h, out_width=out_w,
        with_indices=bool(with_indices),
    )


def _check_windows_touch_input(axis, size, out, kernel, stride, pad, dilation):
    """Reject a window lying wholly in padding. Windows starting at or after 0 start inside the input
    (the output-size rule guarantees it), so only those starting in the leading padding need a look."""
    for o in range(min(out, -(-pad // stride))):
        start = o * stride - pad
        taps = range(start, start + dilation * kernel, dilation)
        if not any(0 <= t < size for t in taps):
            raise ValueError(
                f"max_pool2d window {o} along {'HW'[axis]} covers only padding (positions {list(taps)}, "
                f"input size {size}): lower the padding or the dilation"
            )


@dataclass(frozen=True)
class PoolBackwardParams:
    """A max-pooling's backward: grad_output and indices of output_shape scattered into input_shape."""

    input_shape: tuple
    output_shape: tuple

    def __str__(self):
        return f"grad_output {self.output_shape} into input {self.input_shape}"

    @property
    def batch(self):
        return self.input_shape[0]

    @property
    def work(self):
        """Elements of the input gradient."""
        return math.prod(self.input_shape)


def check_pool_backward(grad_output, indices, input_shape) -> PoolBackwardParams:
    """Shapes and dtypes of max_pool2d_backward's arguments, as normalized params."""
    try:
        input_shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a sequence of 4 ints, got {input_shape!r}") from None
    if len(input_shape) != 4 or min(input_shape[1:]) < 1 or input_shape[0] < 0:
        raise ValueError(f"input_shape must be (N, C, H, W) with C, H, W >= 1, got {input_shape}")
    check_4d(grad_output, "grad_output", "(N, C, H_out, W_out)")
    if indices.shape != grad_output.shape:
        raise ValueError(f"indices shape {indices.shape} must equal grad_output shape {grad_output.shape}")
    if grad_output.shape[:2] != input_shape[:2]:
        raise ValueError(
            f"grad_output {grad_output.shape} and input_shape {input_shape} must agree on (N, C)"
        )
    if indices.dtype.kind not in "iu":
        raise TypeError(f"indices must be an integer array (int64), got {indices.dtype}")
    check_float_arrays(grad_output=grad_output)
    return PoolBackwardParams(input_shape, tuple(grad_output.shape))


def index_out_of_plane(index, input_shape):
    """The error a backend raises when max_pool2d_backward meets an index outside its H*W plane."""
    plane = input_shape[2] * input_shape[3]
    return ValueError(
        f"indices holds {index}, outside the input plane [0, {plane}) of input_shape {tuple(input_shape)}"
    )
