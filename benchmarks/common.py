"""What the benchmark modules share: the backends to try, the skip rule and the inputs."""
import numpy as np

try:
    import fastconv
except ImportError:  # asv discovers benchmarks even where the package failed to build
    fastconv = None

# The backends known today, plus any registered later: a new backend module is benchmarked without
# touching these files. Backends a commit does not have are skipped there.
KNOWN_BACKENDS = ("naive", "im2col", "numba", "cython")


def _available():
    return tuple(getattr(fastconv, "available_backends", tuple)()) if fastconv is not None else ()


BACKENDS = list(KNOWN_BACKENDS) + [name for name in _available() if name not in KNOWN_BACKENDS]


def require(backend):
    """Skip (NotImplementedError, as asv expects) when this version of fastconv cannot run `backend`."""
    if backend not in _available():
        raise NotImplementedError(f"backend {backend!r} is not available in this version")


def normal(shape, dtype, seed=0):
    """Filled inputs (never np.empty: untouched pages would be timed as page faults)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
