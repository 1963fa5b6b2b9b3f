"""The backend registry and the choice of a backend for each call.

Registering a backend records only its name, its module path and the packages it needs: nothing is
imported until the backend is first asked for, so `import fastconv` stays fast and never imports Numba.
A backend whose module fails to import is unavailable, with the reason kept for `backend_status()`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass

import numpy as np

from .threads import get_num_threads

# `auto` without a measured choice (FASTCONV_AUTO=fixed, tiny problems, a single candidate): the first of
# these that is available and supports the call. With one, the fastest of them but naive (autotune.py).
PREFERENCE = ("cython", "numba", "im2col", "naive")


@dataclass
class _Entry:
    module_path: str
    requires: tuple
    module: object = None
    error: str | None = None
    probed: bool = False


_registry: dict[str, _Entry] = {}
_choices: dict = {}  # (op, params, dtype, requested, threads) -> backend name: a repeated call skips the choice
_MAX_CHOICES = 4096
_lock = threading.Lock()


def register_backend(name: str, module_path: str, requires: tuple = ()) -> None:
    """Make a backend known by name; `requires` lists packages whose absence makes it unavailable."""
    _registry[name] = _Entry(module_path, tuple(requires))
    _choices.clear()


def _probe(name: str) -> _Entry:
    entry = _registry[name]
    if not entry.probed:
        with _lock:
            if not entry.probed:
                missing = [pkg for pkg in entry.requires if importlib.util.find_spec(pkg) is None]
                if missing:
                    entry.error = f"requires {', '.join(missing)}, not installed"
                else:
                    try:
                        entry.module = importlib.import_module(entry.module_path)
                    except ImportError as error:
                        entry.error = f"failed to import {entry.module_path}: {error}"
                entry.probed = True
    return entry


def backend_status() -> dict:
    """Every registered backend mapped to None if usable here, else the reason it is not."""
    return {name: _probe(name).error for name in _registry}


def available_backends() -> tuple:
    """Names of the backends usable on this machine, in registration order."""
    return tuple(name for name, error in backend_status().items() if error is None)


def _unknown(name):
    return ValueError(f"unknown backend {name!r}; available: {', '.join(('auto',) + available_backends())}")


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {name!r}")
    if name != "auto" and (name not in _registry or _probe(name).error is not None):
        raise _unknown(name)
    return name


def load(name: str):
    """The module of an available backend."""
    if name not in _registry or _probe(name).error is not None:
        raise _unknown(name)
    return _registry[name].module


def select_backend(op, params, dtype, requested, supports) -> str:
    """The backend that serves one call: a pure function of its arguments.

    requested: a backend name or "auto"; supports: a mapping from each available backend's name to its
    `supports(op, params, dtype)` function (None = yes, else the reason). An explicit name that cannot
    serve the call raises ValueError saying why; "auto" takes the first of PREFERENCE that can serve it.
    """
    if requested != "auto":
        if requested not in supports:
            raise ValueError(f"unknown backend {requested!r}; available: {', '.join(('auto',) + tuple(supports))}")
        reason = supports[requested](op, params, dtype)
        if reason is not None:
            raise ValueError(f"backend {requested!r} cannot run {op} here: {reason}")
        return requested
    for name in PREFERENCE:
        if name in supports and supports[name](op, params, dtype) is None:
            return name
    raise ValueError(f"no available backend supports {op} with {params} and dtype {dtype}")


_default = {"name": None}
_scoped = threading.local()


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto" unless set; env FASTCONV_BACKEND)."""
    _default["name"] = _check_name(name)


def get_backend() -> str:
    """The default backend in force for the calling Python thread."""
    scoped = getattr(_scoped, "name", None)
    if scoped is not None:
        return scoped
    if _default["name"] is None:
        _default["name"] = _check_name(os.environ.get("FASTCONV_BACKEND") or "auto")
    return _default["name"]


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend `name` by default inside the block, in the calling Python thread."""
    previous = getattr(_scoped, "name", None)
    _scoped.name = _check_name(name)
    try:
        yield
    finally:
        _scoped.name = previous




def _measured_choice(op, params, dtype, supports, trial):
    """autotune's choice among the fast backends that can serve the call, or None where `auto` keeps the
    fixed order (measuring off, a tiny problem, fewer than two candidates)."""
    from . import autotune  # imported on the first choice, not with fastconv

    if not autotune.measuring() or not autotune.worth_measuring(params):
        return None
    candidates = [name for name in PREFERENCE
                  if name != "naive" and name in supports and supports[name](op, params, dtype) is None]
    if len(candidates) < 2:
        return None
    return autotune.choose(op, params, np.dtype(dtype).name, candidates, lambda name: trial(_registry[name].module))


def backend_for(op, params, dtype, backend=None, trial=None):
    """The backend module that runs `op` for this call (`backend`: a name, or None for the default).
    trial(module) runs the same call with another backend: with it, `auto` can measure which is fastest."""
    requested = get_backend() if backend is None else backend
    key = (op, params, dtype, requested, get_num_threads())
    name = _choices.get(key)
    if name is None:
        if requested != "auto":
            _check_name(requested)
        supports = {n: load(n).supports for n in available_backends()}
        name = select_backend(op, params, dtype, requested, supports)
        if requested == "auto" and trial is not None:
            name = _measured_choice(op, params, dtype, supports, trial) or name
        if len(_choices) >= _MAX_CHOICES:
            _choices.clear()
        _choices[key] = name
    return _registry[name].module


register_backend("naive", "fastconv.backends.naive")
register_backend("im2col", "fastconv.backends.im2col")
register_backend("numba", "fastconv.backends.numba", requires=("numba",))
register_backend("cython", "fastconv.backends.cython")
