"""Timing for `fastconv report`: one helper for every call it times, and the machine's measured ceilings
(GEMM rate, copy bandwidth) that its figures are compared with."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .threads import blas_threads


@dataclass(frozen=True)
class Timing:
    median: float  # seconds
    best: float
    repeats: int
    first_call: float  # the warm-up call: JIT compilation, caches, first touch of workspaces


def time_calls(calls, budget=0.3, min_repeats=3, max_repeats=100, burst=1):
    """Time several no-argument functions (a dict name -> function) after one warm-up call each. They take
    turns, `burst` calls each per round, so that a change of load on a shared machine hits all of them alike
    (with burst > 1 most calls find the threads of the previous call awake, as in a loop of the same call).
    Each is repeated until it has spent `budget` seconds in at least `min_repeats` calls (a call slower than
    budget / min_repeats stops at 4 x budget instead), or made `max_repeats` calls.
    Returns {name: (Timing, the warm-up call's result)}, or the exception a function raised in its place."""
    results, first_calls, times = {}, {}, {}
    for name, fn in calls.items():
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as error:  # reported by the caller; the other functions go on
            results[name] = error
            continue
        first_calls[name], times[name] = time.perf_counter() - start, []
    running = list(times)
    while running:
        for name in running:
            for _ in range(burst):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        running = [name for name in running if not _done(times[name], budget, min_repeats, max_repeats)]
    return {name: (Timing(statistics.median(times[name]), min(times[name]), len(times[name]), first_calls[name]),
                   results[name]) if name in times else results[name] for name in calls}


def _done(times, budget, min_repeats, max_repeats):
    spent = sum(times)
    return len(times) >= max_repeats or (spent >= budget and (len(times) >= min_repeats or spent >= 4 * budget))


def time_call(fn, budget=0.3, min_repeats=3, max_repeats=100):
    """time_calls for one function: (Timing, the warm-up call's result); its exception is raised."""
    outcome = time_calls({"fn": fn}, budget, min_repeats, max_repeats)["fn"]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


GEMM_SIZE = 2048


def gemm_call(threads, size=GEMM_SIZE):
    """NumPy's float32 matmul of two size x size matrices with BLAS limited to `threads`, as a no-argument
    function with its FLOPs in `.flops`: the machine's practical peak for the dense arithmetic a convolution
    is made of."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)

    def call():
        with blas_threads(threads):
            np.matmul(a, b, out=out)

    call.flops = 2 * size**3
    return call


def gemm_rate(threads, size=GEMM_SIZE, budget=0.3):
    """GFLOP/s of gemm_call, at its best."""
    call = gemm_call(threads, size)
    timing, _ = time_call(call, budget)
    return call.flops / timing.best / 1e9


def copy_bandwidth(threads, megabytes=256, budget=0.3):
    """GB/s (bytes read + bytes written) of a `threads`-way parallel copy of a buffer far larger than the
    caches: the ceiling for memory-bound work such as pooling."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.zeros_like(source)  # zeros, not empty: pages faulted in before timing
    edges = [source.size * k // threads for k in range(threads + 1)]
    bounds = list(zip(edges[:-1], edges[1:]))
    with ThreadPoolExecutor(threads) as pool:  # NumPy releases the GIL while copying

        def copy():
            list(pool.map(lambda b: np.copyto(target[b[0]:b[1]], source[b[0]:b[1]]), bounds))

        timing, _ = time_call(copy, budget)
    return 2 * source.nbytes / timing.best / 1e9
