"""What this machine is, as far as the speed of the kernels goes: the CPU and its flags, its cores, every
loaded BLAS with its kernel, the variables that force a kernel, the OpenMP runtimes, Numba's threading
layer and the versions. describe() is the one description: `fastconv info` prints it, the report stores it,
and auto's fingerprint is its FINGERPRINT part."""
from __future__ import annotations

import os
import platform
import sys

# Variables that change which kernels a BLAS or NumPy runs (OpenBLAS, MKL, BLIS, NumPy's dispatch).
KERNEL_VARIABLES = (
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "GOTOBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
    "MKL_CBWR", "BLIS_ARCH_TYPE", "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES",
)


# What of describe() decides speed: the keys of auto's fingerprint (thread counts and paths do not).
FINGERPRINT = ("cpu", "cpu_flags", "logical_cpus", "blas", "kernel_variables", "versions")


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as info:
            return info.read().splitlines()
    except OSError:
        return []


def _cpuinfo_field(name):
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith(name)), None)


def physical_cores():
    """(package, core) pairs of /proc/cpuinfo, or None where it does not say."""
    cores, package = set(), None
    for line in _cpuinfo():
        if line.startswith("physical id"):
            package = line.split(":")[1].strip()
        elif line.startswith("core id"):
            cores.add((package, line.split(":")[1].strip()))
    return len(cores) or None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags, sorted and space-separated ('' where the system does not say)."""
    flags = _cpuinfo_field("flags") or _cpuinfo_field("Features") or ""
    return " ".join(sorted(flags.split()))


def blas_libraries() -> list:
    """Every BLAS loaded in the process (NumPy's and SciPy's included: both are imported first), each with
    its implementation, version, kernel (threadpoolctl's `architecture`), threading layer and file name."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)
    import scipy.linalg  # noqa: F401  (loads SciPy's)
    from threadpoolctl import threadpool_info

    libraries = [dict({key: pool.get(key) for key in ("internal_api", "version", "architecture", "threading_layer")},
                      library=os.path.basename(pool.get("filepath") or ""))
                 for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return sorted(libraries, key=lambda lib: lib["library"])  # in a fixed order, not the order of loading


def thread_pools() -> list:
    """Every BLAS and OpenMP runtime loaded in the process (threadpoolctl), with its thread count now."""
    from threadpoolctl import threadpool_info

    return [f"{p['user_api']}: {p['internal_api']} {p.get('version') or ''} kernel {p.get('architecture')} "
            f"({p['num_threads']} threads) {p['filepath']}" for p in threadpool_info()]


def numba_threading_layer():
    """Numba's threading layer where a parallel region has run, what was asked for before, or None where
    Numba is not loaded."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return f"{numba.config.THREADING_LAYER} (requested)"


def kernel_variables() -> dict:
    """The KERNEL_VARIABLES that are set, with their values."""
    return {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ}


def versions() -> dict:
    """fastconv's version and those of the libraries its kernels run on."""
    from . import __version__

    return {"fastconv": __version__, "python": platform.python_version(),
            **{package: _version(package) for package in ("numpy", "scipy", "numba", "threadpoolctl")}}


def _version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe() -> dict:
    """The machine, as one JSON-able dict (see the module's docstring)."""
    return {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(), "blas": blas_libraries(), "thread_pools": thread_pools(),
        "kernel_variables": kernel_variables(), "numba_threading_layer": numba_threading_layer(),
        "versions": versions(), "torch": _version("torch"),
    }
