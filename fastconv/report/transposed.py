"""conv_transpose2d and its two gradients on the suite's transposed convolutions (suite.TRANSPOSED): auto
and each fast backend against PyTorch, side by side in the same turns."""
from __future__ import annotations

import numpy as np

import fastconv

from .. import suite
from .._measure import time_calls

OPS = ("forward", "grad input", "grad weight")


def _calls(x, w, gy, conv, backend):
    return {
        "forward": lambda: fastconv.conv_transpose2d(x, w, **conv, backend=backend),
        "grad input": lambda: fastconv.conv_transpose2d_backward(gy, x, w, **conv, output_mask=(True, False, False),
                                                                 backend=backend),
        "grad weight": lambda: fastconv.conv_transpose2d_backward(gy, x, w, **conv, output_mask=(False, True, False),
                                                                  backend=backend),
    }


def _torch_calls(torch, x, w, gy, conv):
    tx, tw, tgy = (torch.from_numpy(a) for a in (x, w, gy))
    args = (conv["stride"], conv["padding"], conv["output_padding"], 1, conv["dilation"])

    def backward(mask):
        tx.requires_grad_(mask[0]), tw.requires_grad_(mask[1])
        out = torch.nn.functional.conv_transpose2d(tx, tw, None, *args)
        return torch.autograd.grad(out, [t for t, m in zip((tx, tw), mask) if m], tgy)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv_transpose2d(tx, tw, None, *args)

    return {"forward": forward, "grad input": lambda: backward((True, False)),
            "grad weight": lambda: backward((False, True))}


def measure(torch, budget, min_repeats, turn_calls):
    """Rows per (case, op, side): the median time and the effective GFLOP/s (the FLOPs of the convolution
    whose input gradient it is)."""
    sides = ["auto"] + [name for name in ("cython", "numba", "im2col") if name in fastconv.available_backends()]
    rows = []
    for name, (shape, out_channels, kernel, stride, padding, output_padding) in suite.TRANSPOSED.items():
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.standard_normal((shape[1], out_channels, kernel, kernel)).astype(np.float32)
        conv = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=1)
        out = fastconv.conv_transpose2d(x, w, **conv)
        gy = rng.standard_normal(out.shape).astype(np.float32)
        flops = 2 * x.size * out_channels * kernel * kernel
        per_side = {side: _calls(x, w, gy, conv, side) for side in sides}
        if torch is not None:
            per_side["torch"] = _torch_calls(torch, x, w, gy, conv)
        for op in OPS:
            outcomes = time_calls({side: calls[op] for side, calls in per_side.items()}, budget, min_repeats,
                                  burst=turn_calls)
            for side, outcome in outcomes.items():
                median = outcome[0].median
                rows.append(dict(case=name, op=op, side=side, median_s=median, gflops=flops / median / 1e9))
    return rows
