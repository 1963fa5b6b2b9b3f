"""One thread setting for every backend (Numba, OpenMP, BLAS), so that nothing oversubscribes the cores.

`set_num_threads(n)` sets the process default (env FASTCONV_NUM_THREADS, else every usable core);
`with threads(n):` overrides it for the calling Python thread only, so concurrent callers do not see each
other's scopes. Backends read `get_num_threads()` on every call and apply it themselves.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check(n, name):
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{name} must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def _from_env():
    value = os.environ.get("FASTCONV_NUM_THREADS")
    if not value:
        return _usable_cores()
    try:
        return _check(int(value), "FASTCONV_NUM_THREADS")
    except ValueError as error:
        raise ValueError(f"FASTCONV_NUM_THREADS must be a positive int, got {value!r}") from error


_default = _from_env()
_chosen_by_user = bool(os.environ.get("FASTCONV_NUM_THREADS"))
_scoped = threading.local()


def set_num_threads(n: int) -> None:
    """Set the process-wide number of threads used by fastconv's kernels."""
    global _default, _chosen_by_user
    _default, _chosen_by_user = _check(n, "n"), True


def is_set() -> bool:
    """Whether the thread count in force was chosen (FASTCONV_NUM_THREADS, set_num_threads or a `threads`
    block) rather than defaulted to every usable core: the PyTorch layers follow PyTorch's count otherwise."""
    return _chosen_by_user or getattr(_scoped, "n", None) is not None


def get_num_threads() -> int:
    """The thread count in force for the calling Python thread."""
    return getattr(_scoped, "n", None) or _default


@contextlib.contextmanager
def threads(n: int):
    """Use n threads inside the block, in the calling Python thread; restored afterwards."""
    _check(n, "n")
    previous = getattr(_scoped, "n", None)
    _scoped.n = n
    try:
        yield
    finally:
        _scoped.n = previous


# Below this much work (multiply-adds, or elements for pooling) a parallel region costs more than it saves:
# waking a second thread takes microseconds, milliseconds when the other core is busy. OpenBLAS itself runs
# GEMMs this small on one thread (its M*N*K threshold is the same 2**18).
SERIAL_WORK = 1 << 18


def is_tiny(work: int) -> bool:
    """Whether `work` is below the serial cut: one thread, BLAS left alone, nothing measured."""
    return work < SERIAL_WORK


def threads_for(work: int) -> int:
    """The threads a kernel should use for `work`: 1 for tiny problems, chosen by size only, so that the
    path taken never depends on the thread setting; else get_num_threads()."""
    return 1 if is_tiny(work) else get_num_threads()


_blas = {"libraries": None, "modules": 0, "setters": ()}
_blas_lock = threading.Lock()
_pinned = {"count": 0, "saved": None}
_pin_lock = threading.Lock()


def _setter(lib):
    """A function that sets the library's (global) limit from any thread and returns the previous one.
    OpenBLAS's openblas_set_num_threads (what threadpoolctl calls) is silently ignored when called from a
    thread other than the one that started OpenBLAS's pool; openblas_set_num_threads_local (OpenBLAS
    >= 0.3.27) is not."""
    if lib.internal_api == "openblas":
        from_any_thread = getattr(lib.dynlib, "openblas_set_num_threads_local", None)
        if from_any_thread is not None:
            from_any_thread.restype, from_any_thread.argtypes = ctypes.c_int, [ctypes.c_int]
            return from_any_thread

    def through_threadpoolctl(n):
        previous = lib.get_num_threads()
        lib.set_num_threads(n)
        return previous

    return through_threadpoolctl


def _blas_setters():
    """A setter (see _setter) for every BLAS loaded in the process (NumPy and SciPy ship separate OpenBLAS
    copies). Scanning the process costs more than a small convolution, so it is redone only when modules
    were imported since (one of them may have loaded another BLAS)."""
    if _blas["modules"] != len(sys.modules):
        with _blas_lock:
            from threadpoolctl import ThreadpoolController

            libraries = ThreadpoolController().select(user_api="blas").lib_controllers
            _blas["setters"] = tuple(_setter(lib) for lib in libraries)
            _blas["libraries"], _blas["modules"] = libraries, len(sys.modules)
    return _blas["setters"]


@contextlib.contextmanager
def single_threaded_blas():
    """Every loaded BLAS at one thread inside the block: inside fastconv's own parallel regions, so that BLAS
    adds no threads of its own and blocks its GEMMs the same way whatever thread calls. The limits are
    global, so the pinning is counted: the first block to enter saves the user's limits and sets 1, the last
    to leave restores them, whichever Python threads they run on and however they overlap."""
    with _pin_lock:
        if _pinned["count"] == 0:
            setters = _blas_setters()
            _pinned["saved"] = [(setter, setter(1)) for setter in setters]
        _pinned["count"] += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pinned["count"] -= 1
            if _pinned["count"] == 0:
                for setter, previous in _pinned["saved"]:
                    setter(previous)


@contextlib.contextmanager
def blas_threads(n: int):
    """Every loaded BLAS at n threads inside the block (the report's GEMM reference), the previous limits
    restored afterwards; not for use beside fastconv's own calls (single_threaded_blas)."""
    with _pin_lock:
        saved = [(setter, setter(n)) for setter in _blas_setters()]
    try:
        yield
    finally:
        with _pin_lock:
            for setter, previous in saved:
                setter(previous)
