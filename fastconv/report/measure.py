"""Measuring for `fastconv report`: auto, every available algorithm and PyTorch (when installed) timed over
the suite in one process, the sides taking turns, into one JSON-able dict of results (rendered by render.py).

Each convolution's figure is compared with NumPy's float32 2048^3 GEMM, which takes its turns with the sides
(the share of the GEMM rate is a ratio of two medians measured under the same load); each pooling's with a
parallel copy's bandwidth. The ceilings (GEMM and copy at their best, before and after the cases) draw the
plots' lines.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import sys
import time

import numpy as np

import fastconv

from .. import _sysinfo, autotune, dispatch, suite
from .._measure import GEMM_SIZE, copy_bandwidth, gemm_call, gemm_rate, rel_err, time_calls
from . import training, transposed

# Freed buffers go back to the heap and are reused, instead of fresh pages faulted in on every large
# allocation: the kernels are measured, not the allocator. glibc reads this at start-up.
REUSED_BUFFERS = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
# OpenBLAS's threads spin for a while after a call before they sleep, and slow any 2-thread kernel started
# then: the GEMM reference, which takes turns with the sides, would charge the side after it. OpenBLAS
# reads this (2^4 cycles of spinning) when it loads. No side uses BLAS's own threads.
BLAS_THREAD_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")
# Set on some machines to keep old OpenBLAS builds correct, they force OpenBLAS's AVX2 kernels on CPUs with
# AVX-512: the report measures with OpenBLAS's own choice unless told to keep them (the command restarts
# itself without them).
FORCED_BLAS_KERNEL = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
GEMM_SIDE = "NumPy GEMM"  # the reference's name among the sides of a time_calls
BASELINE = "im2col:gemm"  # the classic formulation: the tables' "x im2col:gemm" speed-ups are over it
OP_TITLES = {
    "conv2d_forward": "conv2d forward",
    "conv2d_backward_input": "conv2d grad input",
    "conv2d_backward_weight": "conv2d grad weight",
    "max_pool2d_forward": "max_pool2d forward (indices included)",
    "max_pool2d_backward": "max_pool2d backward",
}


def reusing_buffers():
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return all(setting in tunables for setting in REUSED_BUFFERS.split(":"))


def _import_torch():
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def _reference(case, op, inputs, torch):
    """The float64 result that float32 results are compared with: im2col:gemm's for a convolution (a plain
    sum of products by BLAS: no algorithm's own rounding, such as Winograd's transforms, in the reference) and
    `auto`'s for a pooling (exact), both tested against the naive oracle to 1e-12; PyTorch's where fastconv
    could only run naive on a case too large for it. None when none can (or the reference itself fails: the
    rows say why)."""
    inputs64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    if case.naive_feasible() or set(fastconv.available_backends()) - {"naive"}:
        call = suite.fastconv_call(case, op, inputs64, "im2col:gemm" if isinstance(case, suite.Conv) else "auto")
    elif torch is not None:
        call = suite.torch_call(case, op, inputs64)
    else:
        return None
    try:
        result = call()
    except Exception:
        return None
    return result[0] if op == "max_pool2d_forward" else result


def _failed(error):
    """A row's fields for a side that raised instead of returning."""
    return dict(status="failed", reason=f"{type(error).__name__}: {error}")


# Calls per side and turn in the suite's runs. The first call of a turn pays for what the side before left
# behind (another library's threads still spinning on both cores, its own threads asleep); the median of
# the turn's calls is the steady state of a loop of calls.
TURN_CALLS = 3


def _measure(sides, case, op, dtype, inputs, reference, budget, min_repeats, gemm):
    """The rows of `op` of `case`, one per side ("auto", an algorithm that implements `op`, or "torch"),
    timed side by side; a convolution's with the GEMM reference `gemm` (returned by gemm_call) taking its
    turns too. auto's row says which algorithm it chose (its first call makes the choice)."""
    conv = isinstance(case, suite.Conv)
    rows, calls = {}, {}
    for side in (side for side in sides if suite.implements(side, op)):
        rows[side] = dict(case=case.name, kind="conv" if conv else "pool", op=op, dtype=np.dtype(dtype).name,
                          backend=side, flops=case.flops if conv else 0,
                          bytes=case.bytes_moved(np.dtype(dtype).itemsize), status="ok", reason=None)
        reason = suite.why_not(side, case, op, dtype)
        if reason is not None:
            rows[side].update(status="skipped", reason=reason)
        elif side == "torch":
            calls[side] = suite.torch_call(case, op, inputs)
        else:
            calls[side] = suite.fastconv_call(case, op, inputs, side)
    if conv:
        calls[GEMM_SIDE] = gemm
    outcomes = time_calls(calls, budget, min_repeats, burst=TURN_CALLS)
    gemm_gflops = None
    if conv:
        gemm_outcome = outcomes.pop(GEMM_SIDE)
        if isinstance(gemm_outcome, Exception):
            raise gemm_outcome
        gemm_gflops = gemm.flops / gemm_outcome[0].median / 1e9
    for side, outcome in outcomes.items():
        row = rows[side]
        if isinstance(outcome, Exception):  # one broken backend must not stop the report: it says what failed
            row.update(_failed(outcome))
            continue
        timing, result = outcome
        row.update(median_s=timing.median, best_s=timing.best, repeats=timing.repeats,
                   first_call_s=timing.first_call, gbs=row["bytes"] / timing.median / 1e9)
        if conv:
            row["gflops"] = row["flops"] / timing.median / 1e9
            row["gemm_gflops"] = gemm_gflops  # the reference's median, in the same turns
        if op == "max_pool2d_forward":
            result, indices = result
            row["indices_equal"] = bool(np.array_equal(indices, inputs["indices"]))
        if reference is not None:
            row["error"] = rel_err(result, reference)
        if side == "auto":
            row["chose"] = suite.fastconv_explain(case, op, inputs).algorithm
    return list(rows.values())


SCALING_BURST = 10  # calls in a row per thread count and turn in the thread-scaling runs


def thread_scaling(case, sides, threads, budget, min_repeats):
    """Rows of `case`'s float32 forward with 1 thread and with `threads`, per side (naive excluded). Each side
    is measured on its own, its two thread counts taking turns SCALING_BURST calls at a time: a loop of calls
    keeps a side's threads awake, while waking threads that went idle (slow in a virtual machine) would
    land on every call of the side with more threads."""
    inputs, rows = suite.make_inputs(case, np.float32), []
    for side in sides:
        if side == "naive" or not suite.implements(side, "conv2d_forward") or suite.why_not(
                side, case, "conv2d_forward", np.float32) is not None:
            continue
        call = (suite.torch_call(case, "conv2d_forward", inputs) if side == "torch" else
                suite.fastconv_call(case, "conv2d_forward", inputs, side))
        calls = {n: _on_threads(call, n, torch_side=side == "torch") for n in (1, threads)}
        for n, outcome in time_calls(calls, budget, min_repeats, burst=SCALING_BURST).items():
            row = dict(case=case.name, backend=side, threads=n, status="ok")
            if isinstance(outcome, Exception):
                row.update(_failed(outcome))
            else:
                row.update(median_s=outcome[0].median, gflops=case.flops / outcome[0].median / 1e9)
            rows.append(row)
    return rows


def _on_threads(call, n, torch_side):
    def on_n_threads():
        if torch_side:
            import torch

            torch.set_num_threads(n)
        with fastconv.threads(n):
            return call()
    return on_n_threads


def _ceilings(threads, budget):
    return {"gemm_gflops": gemm_rate(threads, budget=budget), "copy_gbs": copy_bandwidth(threads, budget=budget)}


def _runs(convs, pools):
    """(case, dtype, ops, sides) in the order they are measured (sides None: every side): the suite in
    float32, then in float64 the quoted case's forward on every side and, in the full suite, every
    convolution's ops on auto and PyTorch."""
    runs = [(case, np.float32, case.ops, None) for case in convs + pools]
    if suite.FLOAT64_CASE in convs:
        runs.append((suite.FLOAT64_CASE, np.float64, ("conv2d_forward",), None))
    if tuple(convs) == suite.CONVS:
        quoted = (suite.FLOAT64_CASE, "conv2d_forward")
        runs += [(case, np.float64, tuple(op for op in case.ops if (case, op) != quoted), ("auto", "torch"))
                 for case in convs]
    return runs


def collect(convs, pools, threads, budget=0.3, min_repeats=3, with_torch=True, progress=True,
            command="fastconv report", gemm_size=GEMM_SIZE):
    """Measure `auto`, every available algorithm (and PyTorch) on the given cases; returns the JSON-able
    results."""
    from tqdm import tqdm

    started = time.perf_counter()
    torch = _import_torch() if with_torch else None
    torch_threads = torch.get_num_threads() if torch is not None else None
    sides = ["auto", *fastconv.algorithms()] + (["torch"] if torch is not None else [])
    runs = _runs(list(convs), list(pools))
    rows = []
    with fastconv.threads(threads), tqdm(total=sum(len(ops) for _, _, ops, _ in runs), unit="op",
                                         disable=not progress, file=sys.stderr) as bar:
        if torch is not None:
            torch.set_num_threads(threads)
        before = _ceilings(threads, budget)
        gemm = gemm_call(threads, gemm_size)
        for case, dtype, ops, only in runs:
            inputs = suite.make_inputs(case, dtype)
            for op in ops:
                bar.set_description(f"{case.name} {OP_TITLES[op].split(' (')[0]}"
                                    + (" float64" if dtype == np.float64 else ""))
                reference = _reference(case, op, inputs, torch)
                rows += _measure([side for side in sides if only is None or side in only], case, op, dtype, inputs,
                                 reference, budget, min_repeats, gemm)
                bar.update(1)
        scaling = (thread_scaling(suite.SCALING_CASE, sides, threads, budget, min_repeats)
                   if threads > 1 and suite.SCALING_CASE in convs else [])
        steps = training.measure(torch, budget, min_repeats) if torch is not None else []
        transposed_rows = transposed.measure(torch, budget, min_repeats, TURN_CALLS)
        # Measured again at the end, the higher kept: load from elsewhere only ever lowers a ceiling.
        after = _ceilings(threads, budget)
        if torch is not None:
            torch.set_num_threads(torch_threads)
    ceilings = {key: max(before[key], after[key]) for key in before}
    names = {tuple(suite.CONVS): "full", tuple(suite.QUICK_CONVS): "quick"}
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "threads": threads, "budget_s": budget, "min_repeats": min_repeats, "turn_calls": TURN_CALLS,
            "gemm_size": gemm_size,
            "allocator": "reused" if reusing_buffers() else "default",
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "naive_max_flops": suite.NAIVE_MAX_FLOPS,
            "suite": names.get(tuple(convs), "custom"),
            "auto_cache": str(autotune.cache_dir()),
            "seconds": time.perf_counter() - started,
        },
        "machine": machine(threads),
        "ceilings": ceilings,
        "ceilings_measured": {"before": before, "after": after},
        "sides": sides,
        "rows": rows,
        "scaling": scaling,
        "training": steps,
        "transposed": transposed_rows,
    }



def machine(threads):
    """What the figures were measured on: the machine (_sysinfo.describe), the threads, each backend's
    state and the environment that steers the kernels."""
    backends = {}
    for name, error in fastconv.backend_status().items():
        describe = getattr(dispatch.load(name), "describe", None) if error is None else None
        backends[name] = ("available" + (f": {describe()}" if describe else "")) if error is None else \
            f"unavailable: {error}"
    env_prefixes = ("OMP_", "OPENBLAS_", "MKL_", "NUMBA_", "FASTCONV_", "GLIBC_TUNABLES")
    return dict(_sysinfo.describe(), threads=threads, backends=backends, algorithms=list(fastconv.algorithms()),
                environment={k: v for k, v in sorted(os.environ.items()) if k.startswith(env_prefixes)})
