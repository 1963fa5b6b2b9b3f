"""The canonical benchmark shapes, used by `fastconv report` and the pytest-benchmark comparisons, and how
to call each operation on them through fastconv (any backend) or PyTorch.

"The geometric mean over the suite" is over the ten convolutions of CONVS. The asv suite (benchmarks/)
keeps its own shape lists on purpose: it must import with old versions of this package.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import fastconv

from . import dispatch
from .ops import CONV_OPS, POOL_OPS
from .params import PoolBackwardParams, conv_params, pool_params

# `naive` is a Python loop per output pixel: it runs only on convolutions under this many FLOPs, and never
# on the suite's poolings (a Python loop per window cell: minutes per call).
NAIVE_MAX_FLOPS = 5e7


@dataclass(frozen=True)
class Conv:
    """A convolution of the suite: square kernel, groups 1, dilation 1, symmetric padding."""

    input_shape: tuple
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0

    ops = CONV_OPS

    @property
    def weight_shape(self):
        return (self.out_channels, self.input_shape[1], self.kernel, self.kernel)

    @property
    def params(self):
        return conv_params(self.input_shape, self.weight_shape, self.stride, self.padding, 1, 1)

    @property
    def name(self):
        stride = f" s{self.stride}" if self.stride != 1 else ""
        padding = f" p{self.padding}" if self.padding else ""
        shape = "x".join(map(str, self.input_shape))
        return f"{shape}->{self.out_channels} {self.kernel}x{self.kernel}{stride}{padding}"

    @property
    def flops(self):
        return self.params.flops

    def bytes_moved(self, itemsize):
        return self.params.bytes_moved(itemsize)

    def naive_feasible(self):
        return self.flops < NAIVE_MAX_FLOPS


@dataclass(frozen=True)
class Pool:
    """A max-pooling of the suite: square window, dilation 1, no ceil_mode."""

    input_shape: tuple
    kernel: int
    stride: int
    padding: int = 0

    ops = POOL_OPS

    @property
    def params(self):
        return pool_params(self.input_shape, self.kernel, self.stride, self.padding, 1, False)

    @property
    def name(self):
        padding = f"/p{self.padding}" if self.padding else ""
        return f"{'x'.join(map(str, self.input_shape))} {self.kernel}x{self.kernel}/{self.stride}{padding}"

    def bytes_moved(self, itemsize):
        return self.params.bytes_moved(itemsize)

    def naive_feasible(self):
        return False


CONVS = (
    Conv((64, 3, 32, 32), 64, 3, padding=1),
    Conv((64, 64, 32, 32), 64, 3, padding=1),
    Conv((64, 128, 16, 16), 128, 3, padding=1),
    Conv((64, 256, 8, 8), 256, 3, padding=1),
    Conv((8, 3, 224, 224), 64, 7, stride=2, padding=3),
    Conv((32, 64, 56, 56), 128, 3, stride=2, padding=1),
    Conv((32, 256, 14, 14), 256, 1),
    Conv((128, 1, 28, 28), 6, 5),
    Conv((128, 6, 12, 12), 16, 5),
    Conv((1, 64, 56, 56), 64, 3, padding=1),
)
POOLS = (
    Pool((64, 64, 32, 32), 2, 2),
    Pool((32, 64, 112, 112), 3, 2, padding=1),
)
# The case the issues quote, also measured in float64 (forward only).
FLOAT64_CASE = CONVS[1]
# The batch-1 case: its forward is also measured with 1 thread, for the speed-up of more threads.
SCALING_CASE = CONVS[9]
# Transposed convolutions, as a decoder's 2x upsampling: name -> (input shape, output channels, kernel, stride,
# padding, output_padding).
TRANSPOSED = {
    "32x64x16x16->32 3x3 s2 p1 op1": ((32, 64, 16, 16), 32, 3, 2, 1, 1),
    "8x128x8x8->64 4x4 s2 p1": ((8, 128, 8, 8), 64, 4, 2, 1, 0),
}

# `--quick`: the quoted case, batch 1, a small LeNet layer (naive runs on it) and the small pooling.
QUICK_CONVS = (CONVS[1], CONVS[9], CONVS[8])
QUICK_POOLS = (POOLS[0],)


def cases(quick=False):
    """The suite's convolutions and poolings (the `quick` subset if asked)."""
    return (QUICK_CONVS, QUICK_POOLS) if quick else (CONVS, POOLS)


def by_name(name):
    """A case of the suite from its name, e.g. '64x64x32x32->64 3x3 p1'."""
    for case in CONVS + POOLS:
        if case.name == name:
            return case
    raise KeyError(f"no case {name!r} in the suite; cases: {', '.join(c.name for c in CONVS + POOLS)}")


def make_inputs(case, dtype, seed=0):
    """Standard normal arrays for every op of `case` (convolution: x, w, gy; pooling: x, gy, indices)."""
    rng = np.random.default_rng(seed)
    p = case.params

    def normal(shape):
        return rng.standard_normal(shape).astype(dtype)

    if isinstance(case, Conv):
        return {"x": normal(p.input_shape), "w": normal(p.weight_shape), "gy": normal(p.output_shape)}
    x = normal(p.input_shape)
    return {"x": x, "gy": normal(p.output_shape), "indices": _argmax_indices(x, p)}


def _argmax_indices(x, p):
    """max_pool2d's indices for tie-free, NaN-free data, in NumPy: backward's input must not depend on
    the backends being measured (nor wait for naive when nothing else is built)."""
    (kh, kw), (sh, sw), (ph, pw) = (p.kernel_height, p.kernel_width), p.stride, p.padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    best = np.full(p.output_shape, -np.inf, x.dtype)
    best_cell = np.zeros(p.output_shape, np.int64)
    for r in range(kh):
        for c in range(kw):
            cell = padded[:, :, r:r + sh * (p.out_height - 1) + 1:sh, c:c + sw * (p.out_width - 1) + 1:sw]
            better = cell > best  # strict: the first maximum in row-major window order wins
            best = np.where(better, cell, best)
            best_cell = np.where(better, r * kw + c, best_cell)
    rows = np.arange(p.out_height)[:, None] * sh - ph + best_cell // kw
    cols = np.arange(p.out_width)[None, :] * sw - pw + best_cell % kw
    return rows * p.in_width + cols


def fastconv_call(case, op, inputs, backend):
    """A no-argument function running `op` of `case` on `inputs` through fastconv's public API."""
    x, gy = inputs["x"], inputs["gy"]
    if isinstance(case, Conv):
        w, conv = inputs["w"], dict(stride=case.stride, padding=case.padding, backend=backend)
        return {
            "conv2d_forward": lambda: fastconv.conv2d(x, w, **conv),
            "conv2d_backward_input":
                lambda: fastconv.conv2d_backward(gy, x, w, output_mask=(True, False, False), **conv)[0],
            "conv2d_backward_weight":
                lambda: fastconv.conv2d_backward(gy, x, w, output_mask=(False, True, False), **conv)[1],
        }[op]
    indices = inputs["indices"]
    return {
        "max_pool2d_forward":
            lambda: fastconv.max_pool2d(x, case.kernel, case.stride, case.padding, return_indices=True,
                                        backend=backend),
        "max_pool2d_backward": lambda: fastconv.max_pool2d_backward(gy, indices, x.shape, backend=backend),
    }[op]


def implements(side, op):
    """Whether `side` ("auto", "torch" or a fastconv algorithm) has `op` at all."""
    return side in ("auto", "torch") or op in dispatch.get_algorithm(side).ops


def why_not(side, case, op, dtype):
    """Why `side` does not run `op` of `case` in `dtype` (naive's size cap, or the algorithm's own reason),
    or None."""
    if side in ("auto", "torch"):
        return None
    if side == "naive" and not case.naive_feasible():
        return f"over naive's size cap ({NAIVE_MAX_FLOPS:.0e} FLOPs)"
    p = case.params
    if op == "max_pool2d_backward":
        p = PoolBackwardParams(p.input_shape, p.output_shape)
    return dispatch.get_algorithm(side).supports(op, p, np.dtype(dtype))


def fastconv_explain(case, op, inputs, backend="auto"):
    """fastconv.explain for `op` of `case` on `inputs`: the algorithm `backend` runs there, and why."""
    if isinstance(case, Conv):
        return fastconv.explain(op, inputs["x"], inputs["w"], stride=case.stride, padding=case.padding,
                                backend=backend)
    return fastconv.explain(op, inputs["x"], case.kernel, case.stride, case.padding, backend=backend)


def torch_call(case, op, inputs):
    """The same as fastconv_call, through PyTorch: gradients one at a time through aten's backward ops
    (never autograd, which adds the forward and the other gradient). Results come back as NumPy."""
    import torch

    x, gy = torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["gy"])
    aten = torch.ops.aten
    if isinstance(case, Conv):
        w = torch.from_numpy(inputs["w"])
        geometry = ([case.stride] * 2, [case.padding] * 2, [1, 1])

        def gradient(mask, which):
            return lambda: aten.convolution_backward(gy, x, w, None, *geometry, False, [0, 0], 1, mask)[which]

        call = {
            "conv2d_forward": lambda: torch.nn.functional.conv2d(x, w, None, case.stride, case.padding),
            "conv2d_backward_input": gradient([True, False, False], 0),
            "conv2d_backward_weight": gradient([False, True, False], 1),
        }[op]
        return lambda: call().numpy()
    window = ([case.kernel] * 2, [case.stride] * 2, [case.padding] * 2)
    if op == "max_pool2d_forward":
        def forward():
            y, indices = torch.nn.functional.max_pool2d(x, *window, return_indices=True)
            return y.numpy(), indices.numpy()
        return forward
    indices = torch.from_numpy(inputs["indices"])
    return lambda: aten.max_pool2d_with_indices_backward(gy, x, *window, [1, 1], False, indices).numpy()
