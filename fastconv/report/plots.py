"""The report's plots: a bar chart per op and a roofline, written as PNG files."""
from __future__ import annotations

import numpy as np

from ..ops import CONV_OPS, POOL_OPS
from .measure import OP_TITLES
from .stats import _ok


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

