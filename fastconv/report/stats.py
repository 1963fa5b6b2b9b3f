"""Statistics over a report's rows: geometric means, speed-ups, and auto against the fastest algorithm."""
from __future__ import annotations

import math

from ..ops import CONV_OPS, POOL_OPS


def _ok(rows, **where):
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in where.items())]


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _speedups(rows, side, over, op, dtype="float32"):
    """median(over) / median(side) for each case both ran, by case name."""
    base = {r["case"]: r["median_s"] for r in _ok(rows, backend=over, op=op, dtype=dtype)}
    return {r["case"]: base[r["case"]] / r["median_s"]
            for r in _ok(rows, backend=side, op=op, dtype=dtype) if r["case"] in base}


def geomeans(results):
    """Per side and op (float32): the geometric mean of GFLOP/s (GB/s for pooling) and of the speed-up over
    PyTorch, over the cases the side ran, with their count."""
    rows, table = results["rows"], {}
    ops = [op for op in CONV_OPS + POOL_OPS if _ok(rows, op=op)]
    for side in results["sides"]:
        for op in ops:
            done = _ok(rows, backend=side, op=op, dtype="float32")
            rate = "gflops" if op in CONV_OPS else "gbs"
            table[side, op] = {
                "rate": _geomean([r[rate] for r in done]),
                "vs_torch": _geomean(list(_speedups(rows, side, "torch", op).values())),
                "cases": len(done),
                "of": len({r["case"] for r in rows if r["op"] == op and r["dtype"] == "float32"}),
            }
    return ops, table




def float64_against_torch(results):
    """Per convolution op measured in float64: auto's speed-up over PyTorch's float64, its geometric mean
    over the cases both ran, their count and the slowest case."""
    found = {}
    for op in CONV_OPS:
        speedups = _speedups(results["rows"], "auto", "torch", op, "float64")
        if speedups:
            slowest = min(speedups, key=speedups.get)
            found[op] = {"geomean": _geomean(list(speedups.values())), "cases": len(speedups),
                         "slowest": slowest, "slowest_speedup": speedups[slowest]}
    return found


def _algorithm_rows(results, op, dtype="float32"):
    """Per case of `op`: every algorithm's median time, the fastest, auto's time and choice, PyTorch's."""
    by_case = {}
    for r in _ok(results["rows"], op=op, dtype=dtype):
        by_case.setdefault(r["case"], {})[r["backend"]] = r
    found = []
    for case, sides in by_case.items():
        algorithms = {side: r["median_s"] for side, r in sides.items() if side not in ("auto", "torch")}
        if not algorithms or "auto" not in sides:
            continue
        best = min(algorithms, key=algorithms.get)
        found.append(dict(case=case, op=op, times=algorithms, best=best, best_s=algorithms[best],
                          auto_s=sides["auto"]["median_s"], chose=sides["auto"].get("chose"),
                          torch_s=sides["torch"]["median_s"] if "torch" in sides else None))
    return found


def auto_against_best(results):
    """How close `auto` came to the fastest algorithm of the same run, per (case, op), as the fastest
    algorithm's time over auto's (1: as fast; 0.8: 20% slower), two ways: "measured", auto's own row (its
    noise included: two rows of the same algorithm differ by that much too), and "choice", the row of the
    algorithm auto chose (what auto runs, without a second sample of the noise). Each: the geometric mean
    over the pairs and the worst pair."""
    found = [r for op in CONV_OPS + POOL_OPS for r in _algorithm_rows(results, op)]
    if not found:
        return None
    closeness = {"pairs": len(found)}
    for way, time_of in (("measured", lambda r: r["auto_s"]), ("choice", lambda r: r["times"][r["chose"]])):
        ratios = [dict(r, ratio=r["best_s"] / time_of(r)) for r in found]
        worst = min(ratios, key=lambda r: r["ratio"])
        closeness[way] = {"geomean": _geomean([r["ratio"] for r in ratios]),
                          "worst": {k: worst[k] for k in ("case", "op", "ratio", "best", "chose")}}
    return closeness


