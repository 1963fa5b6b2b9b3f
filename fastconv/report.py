"""`fastconv report`: every available algorithm, `auto` and PyTorch (when installed) timed over the suite, written as
a self-contained folder: report.html (plots embedded), report.md with the plots beside it as PNG files,
and results.json with the raw numbers.

Each convolution's figure is compared with NumPy's float32 2048^3 GEMM, which takes its turns with the sides
(the share of the GEMM rate is a ratio of two medians measured under the same load); each pooling's with a
parallel copy's bandwidth. The ceilings (GEMM and copy at their best, before and after the cases) draw the
plots' lines. Every side runs in this one process with the same thread count and, unless --default-allocator
is given, with freed buffers reused (GLIBC_TUNABLES).
"""
from __future__ import annotations

import base64
import datetime
import html
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import fastconv

from . import _sysinfo, autotune, dispatch, suite
from ._measure import GEMM_SIZE, copy_bandwidth, gemm_call, gemm_rate, time_calls
from .ops import CONV_OPS, POOL_OPS

# Freed buffers go back to the heap and are reused, instead of fresh pages (~1.4 us per 4 KiB page)
# on every large allocation: the kernels are measured, not the allocator. glibc reads this at start-up.
REUSED_BUFFERS = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
# OpenBLAS's threads spin for ~0.1 s after a call before they sleep, and slow any 2-thread kernel started
# then 2-3x: the GEMM reference, which takes turns with the sides, would charge the side after it. OpenBLAS
# reads this (2^4 cycles of spinning) when it loads. No side uses BLAS's own threads.
BLAS_THREAD_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")
# Set on some machines to keep old OpenBLAS builds correct, they force OpenBLAS's AVX2 kernels (half the
# AVX-512 ones' speed here): the report measures with OpenBLAS's own choice unless told to keep them.
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


def reexec_for_measuring(argv, reuse_buffers=True, keep_blas_kernel=False):
    """Restart this process as `python -m fastconv ARGV` with BLAS_THREAD_TIMEOUT in the environment, without
    FORCED_BLAS_KERNEL (unless keep_blas_kernel) and, with reuse_buffers, REUSED_BUFFERS in GLIBC_TUNABLES,
    unless that is so already (glibc and OpenBLAS read them only when they start). A value the user set for
    the timeout is kept."""
    name, value = BLAS_THREAD_TIMEOUT
    env = dict(os.environ)
    env.setdefault(name, value)
    if not keep_blas_kernel:
        for variable in FORCED_BLAS_KERNEL:
            env.pop(variable, None)
    if reuse_buffers and not reusing_buffers():
        current = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{current}:{REUSED_BUFFERS}" if current else REUSED_BUFFERS
    if env == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastconv", *argv], env)


def _import_torch():
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def rel_err(got, ref):
    """||got - ref|| / ||ref|| in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (scale if scale > 0 else 1.0))


# ---------------------------------------------------------------------------------------------- measuring

def _reference(case, op, inputs, torch):
    """The float64 result that float32 results are compared with: fastconv's `auto` choice in float64
    (tested against the naive oracle to 1e-12), or PyTorch's when auto could only pick naive on a case
    too large for it. None when neither can (or the reference itself fails: the rows say why)."""
    inputs64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    if case.naive_feasible() or set(fastconv.available_backends()) - {"naive"}:
        call = suite.fastconv_call(case, op, inputs64, "auto")
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
# behind (another library's threads still spinning on both cores, its own threads asleep: 2-3x on a
# millisecond-long call); the median of the turn's calls is the steady state of a loop of calls.
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
    """(case, dtype, ops) in the order they are measured: the suite in float32, then the float64 case."""
    runs = [(case, np.float32, case.ops) for case in convs + pools]
    if suite.FLOAT64_CASE in convs:
        runs.append((suite.FLOAT64_CASE, np.float64, ("conv2d_forward",)))
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
    with fastconv.threads(threads), tqdm(total=sum(len(ops) for _, _, ops in runs), unit="op",
                                         disable=not progress, file=sys.stderr) as bar:
        if torch is not None:
            torch.set_num_threads(threads)
        before = _ceilings(threads, budget)
        gemm = gemm_call(threads, gemm_size)
        for case, dtype, ops in runs:
            inputs = suite.make_inputs(case, dtype)
            for op in ops:
                bar.set_description(f"{case.name} {OP_TITLES[op].split(' (')[0]}")
                reference = _reference(case, op, inputs, torch)
                rows += _measure(sides, case, op, dtype, inputs, reference, budget, min_repeats, gemm)
                bar.update(1)
        scaling = (thread_scaling(suite.SCALING_CASE, sides, threads, budget, min_repeats)
                   if threads > 1 and suite.SCALING_CASE in convs else [])
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
    }


# ---------------------------------------------------------------------------------------------- machine

def _cpuinfo():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    # A physical core is a (package, core) pair; logical CPUs beyond that are SMT siblings.
    cores, package = set(), None
    for line in text.splitlines():
        if line.startswith("physical id"):
            package = line.split(":")[1].strip()
        elif line.startswith("core id"):
            cores.add((package, line.split(":")[1].strip()))
    return model, len(cores) or None


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(threads):
    """What the figures were measured on: CPU, cores, threads, versions, backends, BLAS and OpenMP."""
    from threadpoolctl import threadpool_info

    model, physical_cores = _cpuinfo()
    backends = {}
    for name, error in fastconv.backend_status().items():
        describe = getattr(dispatch.load(name), "describe", None) if error is None else None
        backends[name] = ("available" + (f": {describe()}" if describe else "")) if error is None else \
            f"unavailable: {error}"
    env_prefixes = ("OMP_", "OPENBLAS_", "MKL_", "NUMBA_", "FASTCONV_", "GLIBC_TUNABLES")
    return {
        "cpu": model,
        "physical_cores": physical_cores,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "fastconv": fastconv.__version__,
                     **{pkg: _version(pkg) for pkg in ("numpy", "scipy", "numba", "torch", "threadpoolctl")}},
        "backends": backends,
        "threadpools": [f"{p['user_api']}: {p['internal_api']} {p.get('version') or ''} "
                        f"kernel {p.get('architecture')} ({p['num_threads']} threads) {p['filepath']}"
                        for p in threadpool_info()],
        "blas_kernel_variables": _sysinfo.kernel_variables(),
        "algorithms": list(fastconv.algorithms()),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(env_prefixes)},
    }


# ---------------------------------------------------------------------------------------------- summaries

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


# ---------------------------------------------------------------------------------------------- plots

def _colors(sides):
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    return {side: palette(i % 20) for i, side in enumerate(sides)}


def _bar_chart(results, op, colors):
    from matplotlib.figure import Figure

    rows = _ok(results["rows"], op=op, dtype="float32")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    sides = [s for s in results["sides"] if any(r["backend"] == s for r in rows)]
    conv = op in CONV_OPS
    rate, ceiling = ("gflops", "gemm_gflops") if conv else ("gbs", "copy_gbs")
    fig = Figure(figsize=(max(8.0, 1.0 * len(cases) + 3), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(sides), 1)
    for k, side in enumerate(sides):
        values = {r["case"]: r[rate] for r in rows if r["backend"] == side}
        xs = [i + (k - (len(sides) - 1) / 2) * width for i, c in enumerate(cases) if c in values]
        ax.bar(xs, [values[c] for c in cases if c in values], width, label=side, color=colors[side])
    ax.axhline(results["ceilings"][ceiling], color="black", linestyle="--", linewidth=1,
               label="NumPy float32 GEMM at its best" if conv else "parallel copy")
    ax.set_yscale("log")
    ax.set_ylim(top=2 * max([results["ceilings"][ceiling]] + [r[rate] for r in rows]))
    ax.set_ylabel("GFLOP/s" if conv else "GB/s (bytes read + written)")
    ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{OP_TITLES[op]}, float32, {results['meta']['threads']} threads: higher is better", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", which="both", alpha=0.3)
    return fig


def _roofline(results, colors):
    from matplotlib.figure import Figure

    rows = [r for r in _ok(results["rows"], kind="conv", dtype="float32")]
    gemm, bandwidth = results["ceilings"]["gemm_gflops"], results["ceilings"]["copy_gbs"]
    fig = Figure(figsize=(11, 5.5), layout="constrained")
    ax = fig.add_subplot()
    intensity = [r["flops"] / r["bytes"] for r in rows]
    xs = np.geomspace(min(intensity + [gemm / bandwidth]) / 2, max(intensity + [gemm / bandwidth]) * 2, 200)
    ax.plot(xs, np.minimum(gemm, bandwidth * xs), color="black", linewidth=1.5,
            label=f"ceiling: min(GEMM {gemm:.0f} GFLOP/s, copy {bandwidth:.0f} GB/s x intensity)")
    markers = {"conv2d_forward": "o", "conv2d_backward_input": "s", "conv2d_backward_weight": "^"}
    for side in results["sides"]:
        for op, marker in markers.items():
            mine = [r for r in rows if r["backend"] == side and r["op"] == op]
            ax.scatter([r["flops"] / r["bytes"] for r in mine], [r["gflops"] for r in mine], marker=marker,
                       color=colors[side], s=28, alpha=0.85,
                       label=side if op == "conv2d_forward" else None)
    for op, marker in markers.items():  # a legend entry per op, in grey
        ax.scatter([], [], marker=marker, color="grey", label=OP_TITLES[op])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity: FLOPs / minimal bytes moved (input + weight + output, once)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Roofline: convolutions, float32 (each point: one case, op and backend)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(which="both", alpha=0.3)
    return fig


def _plots(results, out_dir):
    """Write the plots as PNG files in out_dir; returns {file name: title}."""
    colors = _colors(results["sides"])
    figures = {f"{op}.png": (_bar_chart(results, op, colors), OP_TITLES[op])
               for op in CONV_OPS + POOL_OPS if _ok(results["rows"], op=op, dtype="float32")}
    if _ok(results["rows"], kind="conv", dtype="float32"):
        figures["roofline.png"] = (_roofline(results, colors), "Roofline")
    for name, (figure, _) in figures.items():
        figure.savefig(out_dir / name, dpi=100)
    return {name: title for name, (_, title) in figures.items()}


# ---------------------------------------------------------------------------------------------- document

def _num(value):
    """Three significant digits, no exponent."""
    if value is None:
        return ""
    digits = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:.{digits}f}"


def _op_table(results, op, dtype):
    """Headers and rows of one op's table: a row per case and side."""
    rows = [r for r in results["rows"] if r["op"] == op and r["dtype"] == dtype]
    conv = op in CONV_OPS
    rate = "gflops" if conv else "gbs"

    def share(r):  # a convolution's against the GEMM measured in its turns, a pooling's against the ceiling
        return r[rate] / (r["gemm_gflops"] if conv else results["ceilings"]["copy_gbs"])
    over_im2col = {}
    over_torch = {}
    for side in results["sides"]:
        over_im2col[side] = _speedups(results["rows"], side, BASELINE, op, dtype)
        over_torch[side] = _speedups(results["rows"], side, "torch", op, dtype)
    headers = ["case", "side", "time (ms)", "GFLOP/s" if conv else "GB/s",
               "% of GEMM" if conv else "% of copy", f"x {BASELINE}", "x PyTorch", "error vs float64", "note"]
    table, previous = [], None
    for r in rows:
        if r["backend"] == "naive" and r["status"] == "skipped":
            continue  # the size cap is stated once, above the tables
        case = r["case"] if r["case"] != previous else ""
        previous = r["case"]
        if r["status"] != "ok":
            table.append([case, r["backend"], "", "", "", "", "", "", f"{r['status']}: {r['reason']}"])
            continue
        error = f"{r['error']:.1e}" if "error" in r else ""
        note = "" if r.get("indices_equal", True) else "indices differ from the reference"
        if "chose" in r:
            note = f"chose {r['chose']}" + (f"; {note}" if note else "")
        speedup_im2col = over_im2col[r["backend"]].get(r["case"])
        speedup_torch = over_torch[r["backend"]].get(r["case"])
        table.append([
            case, r["backend"], _num(r["median_s"] * 1e3), _num(r[rate]), f"{100 * share(r):.0f}%",
            f"{speedup_im2col:.2f}" if speedup_im2col else "", f"{speedup_torch:.2f}" if speedup_torch else "",
            error, note,
        ])
    return headers, table


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


def _closeness_text(closeness):
    def way(name):
        figures, worst = closeness[name], closeness[name]["worst"]
        return (f"geometric mean {figures['geomean']:.3f}, worst {worst['ratio']:.3f} ({worst['case']}, "
                f"{OP_TITLES[worst['op']]}: fastest {worst['best']}, auto chose {worst['chose']})")

    return (f"Over {closeness['pairs']} (case, op) pairs in float32, the fastest algorithm's time over auto's "
            f"(1: as fast, 0.8: 20% slower): measured on auto's own row, {way('measured')}; on the row of the "
            f"algorithm auto chose, {way('choice')}.")


def _algorithm_table(results, op):
    """Headers and rows of one op's comparison of algorithms: a row per case."""
    found = _algorithm_rows(results, op)
    names = [name for name in results["sides"] if any(name in r["times"] for r in found)]
    headers = ["case", *names, "fastest", "auto (chose)", "fastest / auto", "PyTorch", "PyTorch / auto"]
    table = []
    for r in found:
        times = [_num(r["times"][name] * 1e3) if name in r["times"] else "" for name in names]
        torch = [_num(r["torch_s"] * 1e3), f"{r['torch_s'] / r['auto_s']:.2f}"] if r["torch_s"] else ["", ""]
        table.append([r["case"], *times, r["best"], f"{_num(r['auto_s'] * 1e3)} ({r['chose']})",
                      f"{r['best_s'] / r['auto_s']:.2f}", *torch])
    return headers, table


def _geomean_table(results):
    ops, means = geomeans(results)
    headers = ["backend"] + [OP_TITLES[op].split(" (")[0] for op in ops]
    table = []
    for side in results["sides"]:
        cells = []
        for op in ops:
            m = means[side, op]
            torch = f" / {m['vs_torch']:.2f}" if m["vs_torch"] and side != "torch" else ""
            count = "" if m["cases"] == m["of"] else f" ({m['cases']} of {m['of']} cases)"
            cells.append(f"{_num(m['rate'])}{torch}{count}" if m["cases"] else "")
        table.append([side] + cells)
    return headers, table


def _scaling_table(results):
    threads = results["meta"]["threads"]
    headers = ["backend", "1 thread (GFLOP/s)", f"{threads} threads (GFLOP/s)", "speed-up"]
    by_side = {}
    for r in results.get("scaling", []):
        by_side.setdefault(r["backend"], {})[r["threads"]] = r
    table = []
    for side, runs in by_side.items():
        if all(r["status"] == "ok" for r in runs.values()):
            table.append([side, _num(runs[1]["gflops"]), _num(runs[threads]["gflops"]),
                          f"{runs[1]['median_s'] / runs[threads]['median_s']:.2f}"])
        else:
            table.append([side, "", "", "; ".join(r["reason"] for r in runs.values() if r["status"] != "ok")])
    return headers, table


def _machine_table(results):
    m = results["machine"]
    rows = [
        ["CPU", m["cpu"]],
        ["cores", f"{m['physical_cores'] or '?'} physical, {m['logical_cpus']} logical, {m['usable_cpus']} usable"],
        ["threads used", f"{m['threads']} (fastconv.set_num_threads, torch.set_num_threads, BLAS limits)"],
        ["platform", m["platform"]],
        ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)],
    ]
    rows += [[f"backend {name}", status] for name, status in m["backends"].items()]
    rows += [["thread pool", pool] for pool in m["threadpools"]]
    rows += [["environment", f"{k}={v}"] for k, v in m["environment"].items()]
    return ["", ""], rows


def _blocks(results, plots):
    """The report as a list of blocks, rendered to both Markdown and HTML:
    ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", file name, title)."""
    meta, ceilings = results["meta"], results["ceilings"]
    allocator = (f"freed buffers reused (GLIBC_TUNABLES={REUSED_BUFFERS}) on every side"
                 if meta["allocator"] == "reused" else
                 "the default glibc allocator (--default-allocator): large outputs are fresh pages on every call, "
                 "which costs PyTorch more than NumPy")
    n_convs = len({r["case"] for r in results["rows"] if r["kind"] == "conv"})
    over = (f"the suite's {n_convs} convolutions" if meta["suite"] == "full" else
            f"a {meta['suite']} subset ({n_convs} convolutions: not comparable with the full suite's means)")
    blocks = [
        ("h1", "fastconv report"),
        ("p", f"{meta['date']}, `{meta['command']}`, {meta['threads']} threads, {meta['suite']} suite, "
              f"{meta['seconds']:.0f} s. Memory: {allocator}."),
        ("p", f"Each time is the median of repeated calls after one warm-up call (JIT compilation and caches "
              f"stay out), repeated for at least {meta['budget_s']} s and {meta['min_repeats']} calls; the sides "
              f"of a comparison take turns, {meta.get('turn_calls', 1)} calls each, so that load from elsewhere "
              f"hits them alike, and the median is a side's steady state in a loop of calls (the first call of a "
              f"turn pays for what the side before left behind: another library's threads still spinning, its "
              f"own threads asleep). "
              f"Every side is called through its public API (fastconv.conv2d / conv2d_backward / max_pool2d / "
              f"max_pool2d_backward with backend=..., PyTorch's gradients one at a time through "
              f"aten.convolution_backward and aten.max_pool2d_with_indices_backward). "
              f"`naive` (Python loops) runs only on convolutions under {meta['naive_max_flops']:.0e} FLOPs. "
              f"% of GEMM: a convolution's GFLOP/s over those of NumPy's float32 {meta['gemm_size']}^3 matmul "
              f"({meta['threads']} BLAS threads), which takes its turns with the sides of each comparison: two "
              f"medians under the same load (this machine's speed drifts by tens of percent within minutes). "
              f"Ceilings measured in this run (at their best, before and after the cases, the higher kept; the "
              f"plots' lines, and % of copy for pooling): NumPy float32 GEMM {ceilings['gemm_gflops']:.1f} "
              f"GFLOP/s, {meta['threads']}-thread copy {ceilings['copy_gbs']:.1f} GB/s (read + written)."),
        ("p", "x im2col and x PyTorch: the other side's time divided by this one's (above 1: this one is "
              "faster). Error vs float64: ||y - y64|| / ||y64||, y64 computed in float64 from the same inputs. "
              "GB/s for pooling counts every array read and written once, int64 indices included."),
    ]
    closeness = auto_against_best(results)
    if closeness:
        blocks += [("h2", "auto against the fastest algorithm"),
                   ("p", _closeness_text(closeness) + f" auto made its choices as a user's first calls do, in "
                         f"its warm-up calls (cache: {meta.get('auto_cache')}).")]
    if results["rows"]:
        blocks += [("h2", "Geometric means"),
                   ("p", f"Over {over} for the convolutions, over the poolings for pooling; float32. Each cell: "
                         f"GFLOP/s (GB/s for pooling) / speed-up over PyTorch."),
                   ("table", *_geomean_table(results))]
    for op in CONV_OPS + POOL_OPS:
        if not any(r["op"] == op and r["dtype"] == "float32" for r in results["rows"]):
            continue
        blocks += [("h2", OP_TITLES[op]),
                   ("p", "Algorithms side by side: median times in ms (a blank: the algorithm does not serve the "
                         "case, or naive's size cap), the fastest, the algorithm `auto` chose and its time, and "
                         "PyTorch's. Ratios above 1: auto is faster."),
                   ("table", *_algorithm_table(results, op)),
                   ("p", "Every side in detail:"),
                   ("table", *_op_table(results, op, "float32"))]
        if f"{op}.png" in plots:
            blocks.append(("img", f"{op}.png", plots[f"{op}.png"]))
    if any(r["dtype"] == "float64" for r in results["rows"]):
        blocks += [("h2", "conv2d forward, float64"),
                   ("table", *_op_table(results, "conv2d_forward", "float64"))]
    if results.get("scaling"):
        case = results["scaling"][0]["case"]
        blocks += [("h2", "Threads at batch 1"),
                   ("p", f"The float32 forward of {case} with 1 thread and with {meta['threads']}: each side on "
                         f"its own, the two thread counts taking turns {SCALING_BURST} calls at a time (a loop "
                         f"of calls keeps the threads awake; one call per turn would add idle threads' wake-up "
                         f"to every call)."),
                   ("table", *_scaling_table(results))]
    if "roofline.png" in plots:
        blocks += [("h2", "Roofline"),
                   ("p", "GFLOP/s against arithmetic intensity (FLOPs per byte of the minimal traffic: input, "
                         "weight and output once). Below the sloped line a case is bound by memory, below the "
                         "flat one by arithmetic; the distance to the line is what a kernel leaves on the table."),
                   ("img", "roofline.png", plots["roofline.png"])]
    blocks += [("h2", "Machine"), ("table", *_machine_table(results)),
               ("p", "Raw numbers: results.json (every row, with repeats, best and first-call times).")]
    return blocks


def _markdown(blocks):
    lines = []
    for kind, *content in blocks:
        if kind == "h1":
            lines += [f"# {content[0]}", ""]
        elif kind == "h2":
            lines += [f"## {content[0]}", ""]
        elif kind == "p":
            lines += [content[0], ""]
        elif kind == "table":
            headers, rows = content
            lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{content[1]}]({content[0]})", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, td:nth-child(2), th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _html(blocks, out_dir):
    def text(value):  # `code` spans, as in the Markdown
        parts = html.escape(value).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{text(content[0])}</{kind}>")
        elif kind == "table":
            headers, rows = content
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                            for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((out_dir / content[0]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(content[1])}" src="data:image/png;base64,{data}">')
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>fastconv report</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write(results, out_dir):
    """Write report.html, report.md, the PNG plots and results.json into out_dir; returns report.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    blocks = _blocks(results, _plots(results, out_dir))
    (out_dir / "report.md").write_text(_markdown(blocks))
    (out_dir / "report.html").write_text(_html(blocks, out_dir))
    return out_dir / "report.html"


def summary(results):
    """The geometric means and auto against the fastest algorithm, as text, for the terminal."""
    text = _markdown([("table", *_geomean_table(results))])
    closeness = auto_against_best(results)
    if closeness:
        text += "auto against the fastest algorithm: " + _closeness_text(closeness) + "\n"
    return text


def run(out_dir="fastconv-report", quick=False, threads=None, with_torch=True, progress=True,
        command="fastconv report"):
    """Measure the suite (or its quick subset) and write the report; returns the path of report.html."""
    convs, pools = suite.cases(quick)
    results = collect(convs, pools, threads or fastconv.get_num_threads(), budget=0.15 if quick else 0.4,
                      min_repeats=3 if quick else 5, with_torch=with_torch, progress=progress, command=command)
    path = write(results, out_dir)
    print(summary(results))
    print(f"report written to {path} ({results['meta']['seconds']:.0f} s)")
    return path
