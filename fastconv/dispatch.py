"""The registry of backends and their algorithms, the choice of an algorithm for each call, and the one call
path that runs it.

Two levels, as cuDNN and MIOpen have them: a backend is an implementation technology (`naive`, `im2col`,
`numba`, `cython`); an algorithm is one way of computing an op inside it, named `backend:algorithm`
(`cython:direct`, `im2col:rowshift`, ...; `naive` is its own single algorithm). A call asks for:
- an algorithm name: exactly that one, or UnsupportedError with its reason;
- a backend name: the fastest of its algorithms that serve the call (measured by autotune, with a choice
  that does not depend on the thread count, so a backend's results do not either), or its default order;
- "auto": the fastest algorithm of any fast backend (measured per thread count), or the fixed order: the
  backends in PREFERENCE, each in its default order, naive only when nothing else serves.

Registering a backend records only its name, its module path and the packages it needs: nothing is imported
until the backend is first asked for, so `import fastconv` stays fast and never imports Numba. A backend
whose module fails to import is unavailable, with the reason kept for `backend_status()`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass

from .ops import OPS, UnsupportedError
from .threads import get_num_threads

# `auto`'s fixed order (FASTCONV_AUTO=fixed, tiny problems, a single candidate): backends in this order.
PREFERENCE = ("cython", "numba", "im2col", "naive")


@dataclass
class _Entry:
    module_path: str
    requires: tuple
    module: object = None
    error: str | None = None
    probed: bool = False
    algorithms: dict | None = None  # qualified name -> Algorithm, once loaded


_registry: dict[str, _Entry] = {}
_chosen: dict = {}  # (op, params, dtype, requested, threads) -> the chosen algorithm's function for op
_MAX_CHOSEN = 4096
_lock = threading.Lock()


def register_backend(name: str, module_path: str, requires: tuple = ()) -> None:
    """Make a backend known by name; `requires` lists packages whose absence makes it unavailable."""
    _registry[name] = _Entry(module_path, tuple(requires))
    _chosen.clear()


def _qualified(backend, algorithm_name):
    """'backend:algorithm'; a backend's only algorithm named as the backend is named by the backend alone."""
    return backend if algorithm_name == backend else f"{backend}:{algorithm_name}"


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
                        entry.algorithms = {_qualified(name, a.name): a for a in entry.module.ALGORITHMS}
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


def check_op(op):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


def algorithms(op: str | None = None) -> tuple:
    """The 'backend:algorithm' names usable on this machine: all of them, or those that implement `op`
    (one of fastconv.ops.OPS)."""
    if op is not None:
        check_op(op)
    return tuple(name for backend in available_backends() for name, algorithm in _probe(backend).algorithms.items()
                 if op is None or op in algorithm.ops)


def _available(name):
    entry = _registry.get(name)
    return entry is not None and _probe(name).error is None


def _unknown(name):
    return ValueError(f"unknown backend or algorithm {name!r}; backends: "
                      f"{', '.join(('auto',) + available_backends())}; algorithms: {', '.join(algorithms())}")


def get_algorithm(name: str):
    """The Algorithm registered as `name` ('backend:algorithm', or 'naive')."""
    backend = name.split(":", 1)[0]
    if not _available(backend) or name not in _probe(backend).algorithms:
        raise _unknown(name)
    return _probe(backend).algorithms[name]


def check_name(name):
    """A name `backend=` accepts: "auto", an available backend or one of its algorithms."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {name!r}")
    if name != "auto" and not _available(name):
        get_algorithm(name)
    return name


def load(name: str):
    """The module of an available backend."""
    if not _available(name):
        raise _unknown(name)
    return _registry[name].module


def default_order(backend, op, p, dtype):
    """A backend's algorithms, qualified, in the order it prefers them for this call."""
    entry = _probe(backend)
    preferred = getattr(entry.module, "preferred", None)
    named = list(entry.algorithms)
    if preferred is None:
        return named
    first = [_qualified(backend, a) for a in preferred(op, p, dtype)]
    return first + [name for name in named if name not in first]


def candidates(op, p, dtype, requested, backends, order):
    """The algorithms that may serve one call, in the fixed order: a pure function of its arguments.

    requested: "auto", a backend name or an algorithm name; backends: the available backends, each mapped
    to its {qualified name: Algorithm}; order(backend) -> its qualified names in its default order for the
    call. An algorithm name yields itself or raises UnsupportedError with its reason; a backend name its
    algorithms that serve the call; "auto" every backend's in PREFERENCE order (then any other backend's),
    naive only when nothing else serves. Raises UnsupportedError when nothing serves.
    """
    if requested == "auto":
        names = [b for b in PREFERENCE if b in backends] + [b for b in backends if b not in PREFERENCE]
    elif requested in backends:
        names = [requested]
    else:
        algorithm = backends.get(requested.split(":", 1)[0], {}).get(requested)
        if algorithm is None:
            raise ValueError(f"unknown backend or algorithm {requested!r}; backends: "
                             f"{', '.join(('auto',) + tuple(backends))}")
        reason = algorithm.supports(op, p, dtype)
        if reason is not None:
            raise UnsupportedError(f"{requested} cannot run {op} for {p} ({dtype}): {reason}")
        return [requested]
    found, refusals = [], []
    for name in names:
        for qualified in order(name):
            algorithm = backends[name][qualified]
            reason = algorithm.supports(op, p, dtype)
            if reason is None:
                found.append(qualified)
            elif op in algorithm.ops:
                refusals.append(f"{qualified}: {reason}")
    fast = [name for name in found if name != "naive"]
    if requested == "auto" and fast:
        return fast
    if not found:
        raise UnsupportedError(f"no algorithm of {requested} can run {op} for {p} ({dtype}): " + "; ".join(refusals))
    return found


@dataclass(frozen=True)
class Choice:
    """Which algorithm serves a call, and why: "named" (asked for by name), "only" (the one that serves),
    "fixed" (the default order: measuring off, or too small a problem to measure), "remembered" or
    "measured" (then with each candidate's fastest timed call, in seconds)."""

    op: str
    requested: str
    algorithm: str
    how: str
    candidates: tuple
    timings: dict | None = None

    def __str__(self):
        why = {
            "named": "asked for by name",
            "only": "the only algorithm that serves this call",
            "fixed": "the fixed order (FASTCONV_AUTO=fixed, or a problem too small to measure)",
            "remembered": "measured earlier on this machine and remembered",
            "measured": "measured now",
        }[self.how]
        text = f"{self.op} with backend={self.requested!r}: {self.algorithm}, {why}"
        if len(self.candidates) > 1 and self.how != "measured":
            text += f"; candidates: {', '.join(self.candidates)}"
        if self.timings:
            text += "; fastest calls: " + ", ".join(f"{name} {seconds * 1e3:.3f} ms"
                                                  for name, seconds in sorted(self.timings.items(), key=lambda t: t[1]))
        return text


def choose(op, p, dtype, requested, arrays) -> Choice:
    """The algorithm that serves `op` on `arrays` (the algorithm's arguments but the params), and why:
    measured with the arrays themselves where there is a choice to measure."""
    from . import autotune  # imported on the first choice, not with fastconv

    measure = autotune.measuring() and autotune.worth_measuring(p)
    if requested == "auto" and not measure:  # the first backend that serves: later ones are never imported
        refusals = []
        for backend in _auto_order():
            try:
                names = candidates(op, p, dtype, backend, {backend: _probe(backend).algorithms},
                                   lambda b: default_order(b, op, p, dtype))
            except UnsupportedError as refusal:
                refusals.append(str(refusal))
                continue
            return Choice(op, requested, names[0], "fixed", tuple(names))
        raise UnsupportedError("; ".join(refusals) or "no backend is available")
    backend = requested.split(":", 1)[0]
    if requested != "auto" and not _available(backend):
        raise _unknown(requested)
    backends = {name: _probe(name).algorithms for name in (_auto_order() if requested == "auto" else [backend])}
    names = candidates(op, p, dtype, requested, backends, lambda b: default_order(b, op, p, dtype))
    if requested != "auto" and requested not in backends:
        return Choice(op, requested, names[0], "named", tuple(names))
    if len(names) == 1:
        return Choice(op, requested, names[0], "only", tuple(names))
    if not measure:
        return Choice(op, requested, names[0], "fixed", tuple(names))

    def trial(name):
        return get_algorithm(name).ops[op](*arrays, p)

    # A backend's choice is made once for every thread count: its results must not depend on the count.
    name, how, timings = autotune.choose(op, p, str(dtype), requested, names, trial,
                                         per_thread_count=requested == "auto")
    return Choice(op, requested, name, how, tuple(names), timings)


def _auto_order():
    """The available backends, PREFERENCE first, each probed (imported) only when reached."""
    for name in list(PREFERENCE) + [name for name in _registry if name not in PREFERENCE]:
        if name in _registry and _available(name):
            yield name


def run(op, p, dtype, backend, *arrays):
    """Run `op` on `arrays` with the algorithm chosen for this call (`backend`: a name, or None for the
    default). A repeated call finds its choice at once."""
    requested = get_backend() if backend is None else backend
    key = (op, p, dtype, requested, get_num_threads())
    function = _chosen.get(key)
    if function is None:
        if not isinstance(requested, str):
            raise TypeError(f"backend must be a str, got {requested!r}")
        function = get_algorithm(choose(op, p, dtype, requested, arrays).algorithm).ops[op]
        if len(_chosen) >= _MAX_CHOSEN:
            _chosen.clear()
        _chosen[key] = function
    return function(*arrays, p)


def forget_choices() -> None:
    """Drop the choices made in this process (they are made again, from autotune's memory or anew)."""
    _chosen.clear()


_default = {"name": None}
_scoped = threading.local()


def set_backend(name: str) -> None:
    """Set the process-wide default backend or algorithm ("auto" unless set; env FASTCONV_BACKEND)."""
    _default["name"] = check_name(name)


def get_backend() -> str:
    """The default backend in force for the calling Python thread."""
    scoped = getattr(_scoped, "name", None)
    if scoped is not None:
        return scoped
    if _default["name"] is None:
        _default["name"] = check_name(os.environ.get("FASTCONV_BACKEND") or "auto")
    return _default["name"]


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend (or algorithm) `name` by default inside the block, in the calling Python thread."""
    previous = getattr(_scoped, "name", None)
    _scoped.name = check_name(name)
    try:
        yield
    finally:
        _scoped.name = previous


register_backend("naive", "fastconv.backends.naive")
register_backend("im2col", "fastconv.backends.im2col")
register_backend("numba", "fastconv.backends.numba", requires=("numba",))
register_backend("cython", "fastconv.backends.cython")
