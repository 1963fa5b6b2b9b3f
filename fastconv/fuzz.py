"""`python -m fastconv.fuzz`: random valid calls of every op, in every layout, checked for every algorithm
that claims them against `naive` in float64 (and PyTorch, where installed, with --torch).

Each case is drawn from its own seed (printed with every failure: `--seed S --cases 1` replays it). A
convolution may have groups up to depthwise, strides and dilations up to 4, int, pair, 'same' or 'valid'
padding, kernels as large as the padded input, 3x3 stride-1 ones (Winograd's), batch 1 and single channels;
a pooling ceil_mode windows that hang over the edge. Inputs come C-ordered, Fortran-ordered, negatively
strided, read-only, as a channels-last view, as a slice with a step, or one byte off alignment. Refusals are
counted apart; `auto` must never refuse.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

import fastconv

from . import dispatch
from ._measure import rel_err
from .ops import CONV_OPS, POOL_OPS
from .params import PoolBackwardParams, conv_params, pool_params

LAYOUTS = ("c", "fortran", "negative", "readonly", "channels_last", "stepped", "misaligned")
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# Where sums cancel: the error against the norm of the same op on |inputs| (8 epsilons of the dtype).
CANCELLING_TOLERANCE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 2e-15}


def laid_out(a, layout):
    """The values of `a` in another memory layout (a view where the layout is one)."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "negative":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if layout == "readonly":
        a = a.copy()
        a.setflags(write=False)
        return a
    if layout == "channels_last" and a.ndim == 4:
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "stepped":
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if layout == "misaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)
        view = raw[1:].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    return a


def draw_conv(rng):
    """A valid convolution: (x shape, w shape, bias?, keyword arguments)."""
    while True:
        groups = int(rng.choice([1, 1, 2, 3, 4]))
        c_in = groups * int(rng.integers(1, 4))
        depthwise = rng.random() < 0.15
        c_out = c_in if depthwise else groups * int(rng.integers(1, 4))
        stride = tuple(int(s) for s in rng.choice([1, 1, 1, 2, 3, 4], size=2))
        dilation = tuple(int(d) for d in rng.integers(1, 5, size=2)) if rng.random() < 0.4 else (1, 1)
        size = tuple(int(s) for s in rng.integers(1, 13, size=2))
        kernel = tuple(int(k) for k in rng.integers(1, 6, size=2))
        kind = rng.random()
        padding = ("same" if kind < 0.15 and stride == (1, 1) else "valid" if kind < 0.25 else
                   int(rng.integers(0, 4)) if kind < 0.6 else tuple(int(p) for p in rng.integers(0, 4, size=2)))
        if rng.random() < 0.1 and isinstance(padding, tuple):  # the kernel as large as the padded input
            kernel = tuple(max(1, (s + 2 * p - 1) // d + 1) for s, p, d in zip(size, padding, dilation))
        elif rng.random() < 0.1:  # 1x1, stride 1, unpadded: a plain GEMM
            kernel, stride, padding = (1, 1), (1, 1), 0
        elif rng.random() < 0.15:  # 3x3, stride 1, undilated: Winograd's tiles, edges and all
            kernel, stride, dilation = (3, 3), (1, 1), (1, 1)
        x_shape = (int(rng.choice([1, 1, 2, 3])), c_in, *size)
        w_shape = (c_out, c_in // groups, *kernel)
        arguments = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        try:
            conv_params(x_shape, w_shape, stride, padding, dilation, groups)
        except ValueError:
            continue
        return x_shape, w_shape, bool(rng.random() < 0.7), arguments


def draw_pool(rng):
    """A valid max-pooling: (x shape, keyword arguments)."""
    while True:
        kernel = tuple(int(k) for k in rng.integers(1, 5, size=2))
        arguments = dict(kernel_size=kernel, stride=tuple(int(s) for s in rng.integers(1, 5, size=2)),
                         padding=tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel),
                         dilation=tuple(int(d) for d in rng.integers(1, 4, size=2)), ceil_mode=bool(rng.random() < 0.5))
        plane = (int(s) for s in rng.integers(1, 13, size=2))
        x_shape = (int(rng.choice([1, 1, 2, 3])), int(rng.integers(1, 4)), *plane)
        try:
            pool_params(x_shape, *(arguments[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")))
        except ValueError:
            continue
        return x_shape, arguments


def conv_case(seed, with_torch=False):
    """Every algorithm (and auto) on one random convolution: {(op, name): "ok" | "refused" | failure}."""
    rng = np.random.default_rng(seed)
    x_shape, w_shape, bias, arguments = draw_conv(rng)
    dtype = np.dtype(rng.choice([np.float32, np.float64]))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    p = conv_params(x_shape, w_shape, *(arguments[k] for k in ("stride", "padding", "dilation", "groups")))
    gy = rng.standard_normal(p.output_shape)
    b = rng.standard_normal(w_shape[0]) if bias else None
    layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    arrays = {name: laid_out(a.astype(dtype), layout) for name, a in (("x", x), ("w", w), ("gy", gy))}
    calls = {
        "conv2d_forward": lambda xs, ws, gys, name: fastconv.conv2d(xs, ws, b if b is None else b.astype(xs.dtype),
                                                                    **arguments, backend=name),
        "conv2d_backward_input": lambda xs, ws, gys, name: fastconv.conv2d_backward(
            gys, xs, ws, **arguments, output_mask=(True, False, False), backend=name)[0],
        "conv2d_backward_weight": lambda xs, ws, gys, name: fastconv.conv2d_backward(
            gys, xs, ws, **arguments, output_mask=(False, True, False), backend=name)[1],
    }
    outcome = {}
    for op, call in calls.items():
        ref = call(x, w, gy, "naive")
        if with_torch:
            outcome[op, "torch"] = _torch_check(op, x, w, gy, b, arguments, ref)
        def right(got):
            """Within TOLERANCE of the reference, or, where the sums cancel (a few outputs of long sums: no
            float32 sum is that close then), within CANCELLING_TOLERANCE of the terms' own magnitude."""
            error = np.linalg.norm(np.asarray(got, np.float64) - ref)
            if error <= TOLERANCE[dtype] * np.linalg.norm(ref):
                return True
            magnitude = np.linalg.norm(call(np.abs(x), np.abs(w), np.abs(gy), "naive"))
            return error <= CANCELLING_TOLERANCE[dtype] * magnitude

        for name in _checked(op, dtype):
            outcome[op, name] = _check(lambda: call(arrays["x"], arrays["w"], arrays["gy"], name), op, p, dtype, name,
                                       right)
    return outcome


def pool_case(seed, with_torch=False):
    """Every algorithm (and auto) on one random max-pooling: {(op, name): "ok" | "refused" | failure}."""
    rng = np.random.default_rng(seed)
    x_shape, arguments = draw_pool(rng)
    dtype = np.dtype(rng.choice([np.float32, np.float64]))
    x = np.round(rng.standard_normal(x_shape) * 2) / 2  # ties, NaN and -inf: every rule exercised
    x[rng.random(x_shape) < 0.05] = np.nan
    x[rng.random(x_shape) < 0.05] = -np.inf
    x = x.astype(dtype)
    p = pool_params(x_shape, *(arguments[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")))
    layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    y_ref, idx_ref = fastconv.max_pool2d(x, **arguments, return_indices=True, backend="naive")
    gy = rng.standard_normal(p.output_shape).astype(dtype)
    with_indices = bool(rng.random() < 0.7)  # else the forward without indices (values only)
    gx_ref = fastconv.max_pool2d_backward(gy.astype(np.float64), idx_ref, x_shape, backend="naive")
    xs, gys, idxs = laid_out(x, layout), laid_out(gy, layout), laid_out(idx_ref, layout)
    outcome = {}
    if with_torch:
        outcome["max_pool2d_forward", "torch"] = _torch_pool_check(x, arguments, y_ref, idx_ref)
    def same_as_naive(got):
        if not with_indices:
            return np.array_equal(got, y_ref, equal_nan=True)
        return np.array_equal(got[1], idx_ref) and np.array_equal(got[0], y_ref, equal_nan=True)

    forward = replace(p, with_indices=with_indices)
    for name in ["auto", *fastconv.algorithms("max_pool2d_forward")]:
        outcome["max_pool2d_forward", name] = _check(
            lambda: fastconv.max_pool2d(xs, **arguments, return_indices=with_indices, backend=name),
            "max_pool2d_forward", forward, dtype, name, same_as_naive)
    back = PoolBackwardParams(p.input_shape, p.output_shape)
    for name in ["auto", *fastconv.algorithms("max_pool2d_backward")]:
        outcome["max_pool2d_backward", name] = _check(
            lambda: fastconv.max_pool2d_backward(gys, idxs, x_shape, backend=name), "max_pool2d_backward", back,
            dtype, name, lambda got: rel_err(got, gx_ref) <= TOLERANCE[dtype])
    return outcome


def _checked(op, dtype):
    """auto and every algorithm of `op`; naive (the reference, a plain float32 sum in float32: not held to
    the fast algorithms' accuracy) in float64 only, where it is checked in the case's layout."""
    return ["auto", *(name for name in fastconv.algorithms(op) if name != "naive" or dtype == np.float64)]


def _check(call, op, p, dtype, name, right):
    refusal = None if name == "auto" else dispatch.get_algorithm(name).supports(op, p, dtype)
    if refusal is not None:
        try:
            call()
        except fastconv.UnsupportedError:
            return "refused"
        return "failure: ran what it refuses"
    try:
        got = call()
    except Exception as error:  # reported, not raised: the fuzz goes on
        return f"failure: {type(error).__name__}: {error}"
    return "ok" if right(got) else "failure: wrong result"


def _torch_check(op, x, w, gy, b, arguments, ref):
    import torch

    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    padding = arguments["padding"]
    y = torch.nn.functional.conv2d(xt, wt, None if b is None else torch.from_numpy(b), arguments["stride"],
                                   padding, arguments["dilation"], arguments["groups"])
    if op == "conv2d_forward":
        got = y.detach().numpy()
    else:
        y.backward(torch.from_numpy(gy))
        got = (xt.grad if op == "conv2d_backward_input" else wt.grad).numpy()
    return "ok" if rel_err(got, ref) <= 1e-12 else "failure: naive differs from PyTorch"


def _torch_pool_check(x, arguments, y_ref, idx_ref):
    import torch

    y, idx = torch.nn.functional.max_pool2d(torch.from_numpy(x.astype(np.float64)), **arguments, return_indices=True)
    same = np.array_equal(idx.numpy(), idx_ref) and np.array_equal(y.numpy(), y_ref, equal_nan=True)
    return "ok" if same else "failure: naive differs from PyTorch"


def run(cases, seed=0, with_torch=False, out=sys.stdout):
    """`cases` convolutions and `cases` poolings from consecutive seeds; returns the failures."""
    tally, failures, started = {}, [], time.perf_counter()
    for k in range(cases):
        for kind, case in (("conv", conv_case), ("pool", pool_case)):
            for (op, name), result in case(seed + k, with_torch).items():
                key = (op, name, "ok" if result == "ok" else "refused" if result == "refused" else "failed")
                tally[key] = tally.get(key, 0) + 1
                if result not in ("ok", "refused") or (name == "auto" and result == "refused"):
                    failures.append((kind, seed + k, op, name, result))
                    print(f"FAILED {kind} case seed {seed + k}: {op} {name}: {result}", file=out)
    for op in CONV_OPS + POOL_OPS:
        names = sorted({name for (o, name, _) in tally if o == op})
        cells = [f"{name} {tally.get((op, name, 'ok'), 0)} ok / {tally.get((op, name, 'refused'), 0)} refused"
                 + (f" / {tally[(op, name, 'failed')]} FAILED" if (op, name, "failed") in tally else "")
                 for name in names]
        print(f"{op}: " + "; ".join(cells), file=out)
    print(f"{cases} cases per op from seed {seed}, {len(failures)} failures, {time.perf_counter() - started:.0f} s",
          file=out)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastconv.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300, help="cases per op (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed (default: %(default)s)")
    parser.add_argument("--torch", action="store_true", help="also check naive against PyTorch")
    args = parser.parse_args(argv)
    return 1 if run(args.cases, args.seed, args.torch) else 0


if __name__ == "__main__":
    sys.exit(main())
