"""What the benchmark modules share: the backends and algorithms to try, the skip rules and the inputs."""
import numpy as np

try:
    import fastconv
except ImportError:  # asv discovers benchmarks even where the package failed to build
    fastconv = None

# The backends and algorithms ('backend:algorithm') known today, plus any registered later: a new one is
# benchmarked without touching these files. Names a commit does not have are skipped there.
KNOWN_BACKENDS = ("naive", "im2col", "numba", "cython")
KNOWN_ALGORITHMS = ("im2col:gemm", "im2col:rowshift", "im2col:pointwise", "im2col:pool", "numba:direct",
                    "numba:pool", "cython:direct", "cython:gemm", "cython:winograd", "cython:winograd2",
                    "cython:pool")


def _available():
    if fastconv is None:
        return ()
    return (tuple(getattr(fastconv, "available_backends", tuple)())
            + tuple(getattr(fastconv, "algorithms", tuple)()))


def _known():
    return list(KNOWN_BACKENDS) + list(KNOWN_ALGORITHMS)


BACKENDS = ["auto"] + _known() + [name for name in _available() if name not in _known()]
# An algorithm that cannot serve a call (fastconv.UnsupportedError, a ValueError) is skipped there.
UNSUPPORTED = getattr(fastconv, "UnsupportedError", ()) if fastconv is not None else ()


def require(backend):
    """Skip (NotImplementedError, as asv expects) when this version of fastconv cannot run `backend`."""
    if backend != "auto" and backend not in _available():
        raise NotImplementedError(f"backend {backend!r} is not available in this version")


def warm_up(run):
    """The first call, outside the timing (JIT compilation, caches, auto's choice); an algorithm that does
    not serve the call is skipped."""
    try:
        run()
    except UNSUPPORTED as refusal:
        raise NotImplementedError(str(refusal)) from None


def normal(shape, dtype, seed=0):
    """Filled inputs (never np.empty: untouched pages would be timed as page faults)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
