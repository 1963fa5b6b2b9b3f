"""The measured choice behind `auto`: the fastest backend for one call's shape on this machine, timed once
and remembered, in memory and on disk (as FFTW keeps its wisdom).

A choice is keyed by the operation, its normalized params, the dtype and the thread count, and stored in
`auto-choices.json` in FASTCONV_CACHE_DIR (default: $XDG_CACHE_HOME/fastconv or ~/.cache/fastconv) with a
fingerprint of the machine and of the versions that decide speed: a file written elsewhere, or before an
upgrade, is ignored. Only problems above the serial cut are measured (smaller ones take the fixed order:
timing microseconds would cost more than it could save), and never `naive`. FASTCONV_AUTO=fixed turns
measuring off: `auto` is then always the fixed preference order of dispatch.PREFERENCE.
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import threading
from pathlib import Path

from . import __version__
from ._measure import time_calls
from .params import ConvParams
from .threads import SERIAL_WORK, get_num_threads

FILE_NAME = "auto-choices.json"
_state = {"choices": None, "path": None}
_lock = threading.RLock()  # a measurement calls the backends, which may ask for choices of their own


def measuring() -> bool:
    """Whether `auto` measures (FASTCONV_AUTO is not "fixed")."""
    return os.environ.get("FASTCONV_AUTO", "measure") != "fixed"


def worth_measuring(params) -> bool:
    """Above the serial cut: multiply-adds of a convolution, elements of a pooling."""
    if isinstance(params, ConvParams):
        return params.flops // 2 >= SERIAL_WORK
    shape = params if isinstance(params, tuple) else params.input_shape
    return math.prod(shape) >= SERIAL_WORK


def cache_path() -> Path:
    root = os.environ.get("FASTCONV_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastconv"
    return Path(root) / FILE_NAME


def fingerprint() -> dict:
    """What a remembered choice depends on besides the call: the machine and the deciding versions."""
    import numpy

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"fastconv": __version__, "numpy": numpy.__version__, "numba": numba_version,
            "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count()}


def _key(op, params, dtype) -> str:
    return f"{op}|{dtype}|threads={get_num_threads()}|{params!r}"


def remembered() -> dict:
    """The remembered choices of this machine (loaded once per cache path)."""
    path = cache_path()
    if _state["path"] != path:
        choices = {}
        try:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == fingerprint():
                choices = dict(stored.get("choices", {}))
        except (OSError, ValueError, AttributeError):
            pass  # no file, or not ours: start afresh
        _state["choices"], _state["path"] = choices, path
    return _state["choices"]


def _save(choices):
    """Write the choices atomically; a cache that cannot be written is only a cache."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
            json.dump({"fingerprint": fingerprint(), "choices": choices}, out, indent=1, sort_keys=True)
        os.replace(out.name, path)
    except OSError:
        pass


def choose(op, params, dtype, candidates, trial) -> str:
    """The fastest of `candidates` (backend names, in preference order) for this call: remembered, or
    measured now with trial(name), which runs the call with that backend. Each candidate runs once to
    warm up (a JIT compiles, caches fill), then they take turns for a short while; medians decide."""
    key = _key(op, params, dtype)
    with _lock:
        choices = remembered()
        name = choices.get(key)
        if name in candidates:
            return name
        timed = time_calls({name: (lambda name=name: trial(name)) for name in candidates},
                           budget=0.05, min_repeats=3, max_repeats=10)
        medians = {name: result[0].median for name, result in timed.items() if not isinstance(result, Exception)}
        name = min(medians, key=medians.get) if medians else candidates[0]
        choices[key] = name
        _save(choices)
        return name


def forget() -> None:
    """Drop every remembered choice, in memory and on disk."""
    with _lock:
        _state["choices"], _state["path"] = {}, cache_path()
        try:
            cache_path().unlink()
        except OSError:
            pass
