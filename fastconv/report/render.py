"""Rendering a report from its results alone (measure.py writes them; `fastconv report --from results.json`
renders them again): report.md with the plots beside it as PNG files, report.html with the plots embedded,
and results.json. The prose is prose.txt, a template; the numbers come from the results."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from string import Template

from ..ops import CONV_OPS, POOL_OPS
from .measure import BASELINE, OP_TITLES, REUSED_BUFFERS, SCALING_BURST
from .plots import _plots
from .stats import _algorithm_rows, _speedups, auto_against_best, float64_against_torch, geomeans


def _load_prose():
    """prose.txt's paragraphs by name: a line `[name]` starts one; its lines are joined by spaces."""
    sections, name = {}, None
    for line in (Path(__file__).parent / "prose.txt").read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            sections[name] = []
        elif name is not None and line.strip():
            sections[name].append(line.strip())
    return {name: Template(" ".join(lines)) for name, lines in sections.items()}


PROSE = _load_prose()


def prose(name, **values):
    return PROSE[name].substitute(values)


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
        ["versions", ", ".join(f"{k} {v}" for k, v in dict(m["versions"], torch=m["torch"]).items() if v)],
        ["Numba threading layer", m["numba_threading_layer"] or "Numba not loaded"],
        ["variables forcing a kernel", ", ".join(f"{k}={v}" for k, v in m["kernel_variables"].items()) or "none"],
    ]
    rows += [[f"backend {name}", status] for name, status in m["backends"].items()]
    rows += [["thread pool", pool] for pool in m["thread_pools"]]
    rows += [["environment", f"{k}={v}"] for k, v in m["environment"].items()]
    return ["", ""], rows



def _closeness_text(closeness):
    def way(name):
        figures, worst = closeness[name], closeness[name]["worst"]
        return prose("closeness_way", geomean=f"{figures['geomean']:.3f}", ratio=f"{worst['ratio']:.3f}",
                     case=worst["case"], op=OP_TITLES[worst["op"]], best=worst["best"], chose=worst["chose"])

    return prose("closeness", pairs=closeness["pairs"], measured=way("measured"), choice=way("choice"))


def _transposed_table(results):
    rows, sides = {}, []
    for r in results["transposed"]:
        rows.setdefault((r["case"], r["op"]), {})[r["side"]] = r
        if r["side"] not in sides:
            sides.append(r["side"])
    table = []
    for (case, op), by_side in rows.items():
        torch = by_side.get("torch")
        cells = []
        for side in sides:
            r = by_side.get(side)
            ratio = f" (x{torch['median_s'] / r['median_s']:.2f})" if torch and side != "torch" and r else ""
            cells.append(f"{r['median_s'] * 1e3:.2f}, {r['gflops']:.0f}{ratio}" if r else "")
        table.append([case, op, *cells])
    return ["case", "op", *[f"{side} (ms, GFLOP/s)" for side in sides]], table


def _training_table(results):
    rows = [[r["model"], r["dtype"], r["batch"], f"{r['torch_s'] * 1e3:.2f}", f"{r['fastconv_s'] * 1e3:.2f}",
             f"{r['torch_s'] / r['fastconv_s']:.2f}"] for r in results["training"]]
    return ["model", "dtype", "batch", "PyTorch (ms/step)", "fastconv.torch (ms/step)", "speed-up"], rows


def _blocks(results, plots):
    """The report as a list of blocks, rendered to both Markdown and HTML:
    ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", file name, title)."""
    meta, ceilings = results["meta"], results["ceilings"]
    allocator = (prose("allocator_reused", tunables=REUSED_BUFFERS) if meta["allocator"] == "reused" else
                 prose("allocator_default"))
    n_convs = len({r["case"] for r in results["rows"] if r["kind"] == "conv"})
    over = (prose("over_full", convs=n_convs) if meta["suite"] == "full" else
            prose("over_subset", suite=meta["suite"], convs=n_convs))
    blocks = [
        ("h1", "fastconv report"),
        ("p", prose("header", date=meta["date"], command=meta["command"], threads=meta["threads"],
                    suite=meta["suite"], seconds=f"{meta['seconds']:.0f}", allocator=allocator)),
        ("p", prose("method", budget=meta["budget_s"], min_repeats=meta["min_repeats"],
                    turn_calls=meta["turn_calls"], naive_max_flops=f"{meta['naive_max_flops']:.0e}",
                    gemm_size=meta["gemm_size"], threads=meta["threads"],
                    gemm_gflops=f"{ceilings['gemm_gflops']:.1f}", copy_gbs=f"{ceilings['copy_gbs']:.1f}")),
        ("p", prose("legend", baseline=BASELINE)),
    ]
    closeness = auto_against_best(results)
    if closeness:
        blocks += [("h2", "auto against the fastest algorithm"),
                   ("p", _closeness_text(closeness) + " " + prose("closeness_cache", cache=meta["auto_cache"]))]
    if results["rows"]:
        blocks += [("h2", "Geometric means"), ("p", prose("geomeans", over=over)),
                   ("table", *_geomean_table(results))]
    for op in CONV_OPS + POOL_OPS:
        if not any(r["op"] == op and r["dtype"] == "float32" for r in results["rows"]):
            continue
        blocks += [("h2", OP_TITLES[op]), ("p", prose("algorithms")), ("table", *_algorithm_table(results, op)),
                   ("p", prose("detail")), ("table", *_op_table(results, op, "float32"))]
        if f"{op}.png" in plots:
            blocks.append(("img", f"{op}.png", plots[f"{op}.png"]))
    float64 = float64_against_torch(results)
    if float64:
        blocks += [("h2", "float64"), ("p", prose("float64") + " " + "; ".join(
            f"{OP_TITLES[op].split(' (')[0]} {m['geomean']:.2f}x over {m['cases']} cases (the least "
            f"{m['slowest_speedup']:.2f}x, {m['slowest']})" for op, m in float64.items()) + ".")]
    for op in CONV_OPS:
        if any(r["op"] == op and r["dtype"] == "float64" for r in results["rows"]):
            blocks += [("h2", f"{OP_TITLES[op].split(' (')[0]}, float64"),
                       ("table", *_op_table(results, op, "float64"))]
    if results.get("scaling"):
        blocks += [("h2", "Threads at batch 1"),
                   ("p", prose("scaling", case=results["scaling"][0]["case"], threads=meta["threads"],
                               burst=SCALING_BURST)),
                   ("table", *_scaling_table(results))]
    if results.get("transposed"):
        blocks += [("h2", "conv_transpose2d"), ("p", prose("transposed")), ("table", *_transposed_table(results))]
    if results.get("training"):
        blocks += [("h2", "PyTorch models: training steps"), ("p", prose("training", threads=meta["threads"])),
                   ("table", *_training_table(results))]
    if "roofline.png" in plots:
        blocks += [("h2", "Roofline"), ("p", prose("roofline")), ("img", "roofline.png", plots["roofline.png"])]
    blocks += [("h2", "Machine"), ("table", *_machine_table(results)), ("p", prose("raw"))]
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

