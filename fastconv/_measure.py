"""Timing for `fastconv report`: one helper for every call it times, and the machine's measured ceilings
(GEMM rate, copy bandwidth) that its figures are compared with."""
from __future__ import annotations

import random
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
    (with burst > 1 most calls find the threads of the previous call awake, as in a loop of the same call),
    in a new order each round (_round_order).
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
    running, order = list(times), _round_order()
    while running:
        for name in order(running):
            for _ in range(burst):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        running = [name for name in running if not _done(times[name], budget, min_repeats, max_repeats)]
    return {name: (Timing(statistics.median(times[name]), min(times[name]), len(times[name]), first_calls[name]),
                   results[name]) if name in times else results[name] for name in calls}


def _round_order(seed=0):
    """A function giving each round's order of the names left: a call pays for what the one before it left
    behind (another library's threads still spinning, caches flushed), so each round is shuffled anew and no
    function follows the same one more often than another. Seeded: a run's order is reproducible."""
    rng = random.Random(seed)
    return lambda names: rng.sample(names, len(names))


def _done(times, budget, min_repeats, max_repeats):
    spent = sum(times)
    return len(times) >= max_repeats or (spent >= budget and (len(times) >= min_repeats or spent >= 4 * budget))


def race(calls, cap=1.0, min_rounds=3, max_rounds=200, margin=1.25, tie=0.03, far_behind=4.0, turn=2):
    """Which of several no-argument functions (a dict name -> function) is fastest: each is called once to
    warm up (not timed), then all take turns in rounds, in a new order each round (_round_order), so that a
    change of load hits all of them alike. A turn is `turn` calls of which the last is timed: the first pays
    for what the function before left behind (threads asleep to wake, another library's spinning), which a
    loop of calls does not see. Each function is judged by its fastest timed call: load from elsewhere only
    ever slows a call down, and comes in bursts that a few rounds of medians do not average out (a function
    whose turns met the bursts would lose to a slower one). A function whose fastest call is `far_behind` x
    the leader's is dropped after two rounds, and after min_rounds one whose fastest call is slower than
    `margin` x the leader's. The race ends when one is left, when those left are within `tie` of each other
    after 2 x min_rounds and a quarter of `cap` (short calls look tied by chance after a few rounds), after
    max_rounds, or after `cap` seconds of the calls of the functions still racing (a slow one dropped does
    not eat the others' rounds), but not before min_rounds, unless the calls took twice that: slow calls stop
    after a few.
    Returns ({name: fastest timed call in seconds} of every function that ran, the name of the fastest among
    those left); a function that raises is left out (if all raise, the first error is raised)."""
    errors, times, spent_on = {}, {}, {}
    for name, fn in calls.items():
        try:
            fn()
        except Exception as error:  # the others go on; reported only if none of them runs
            errors[name] = error
            continue
        times[name], spent_on[name] = [], 0.0
    if not times:
        raise next(iter(errors.values()))
    left, rounds, order = list(times), 0, _round_order()
    while True:
        for name in order(left):
            for _ in range(turn):
                start = time.perf_counter()
                calls[name]()
                elapsed = time.perf_counter() - start
                spent_on[name] += elapsed
            times[name].append(elapsed)
        rounds += 1
        fastest = {name: min(times[name]) for name in left}
        leader = min(fastest, key=fastest.get)
        if rounds == 2:
            left = [name for name in left if fastest[name] <= far_behind * fastest[leader]]
        if rounds >= min_rounds:
            left = [name for name in left if fastest[name] <= margin * fastest[leader]]
        spent = sum(spent_on[name] for name in left)
        tied = (rounds >= 2 * min_rounds and spent >= cap / 4
                and max(fastest[n] for n in left) <= (1 + tie) * fastest[leader])
        out_of_time = spent >= cap and (rounds >= min_rounds or spent >= 2 * cap)
        if len(left) == 1 or tied or out_of_time or rounds >= max_rounds:
            return {name: min(t) for name, t in times.items()}, leader


def time_call(fn, budget=0.3, min_repeats=3, max_repeats=100):
    """time_calls for one function: (Timing, the warm-up call's result); its exception is raised."""
    outcome = time_calls({"fn": fn}, budget, min_repeats, max_repeats)["fn"]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def rel_err(got, ref):
    """||got - ref|| / ||ref|| in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (scale if scale > 0 else 1.0))


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
