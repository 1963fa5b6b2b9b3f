"""`fastconv report`: auto, every available algorithm and PyTorch (when installed) timed over the suite
(measure.py, into results.json), and rendered from those results alone (render.py) as a self-contained
folder: report.html (plots embedded), report.md with the plots beside it as PNG files, and results.json.
`fastconv report --from results.json` renders again without measuring."""
from __future__ import annotations

import json
from pathlib import Path

import fastconv

from .. import suite
from .measure import collect
from .render import summary, write


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


def from_results(results_path, out_dir):
    """Write the report of a results.json again, into out_dir; returns the path of report.html."""
    results = json.loads(Path(results_path).read_text())
    path = write(results, out_dir)
    print(summary(results))
    print(f"report written to {path}")
    return path
