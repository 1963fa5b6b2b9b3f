"""What this machine is, as far as the speed of the kernels goes: the CPU and its flags, every loaded BLAS
with its kernel, the environment variables that force a kernel, and the versions that decide speed."""
from __future__ import annotations

import os
import platform

# Variables that change which kernels a BLAS or NumPy runs (OpenBLAS, MKL, BLIS, NumPy's dispatch).
KERNEL_VARIABLES = (
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "GOTOBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
    "MKL_CBWR", "BLIS_ARCH_TYPE", "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES",
)


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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


def kernel_variables() -> dict:
    """The KERNEL_VARIABLES that are set, with their values."""
    return {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ}


def versions() -> dict:
    """fastconv's version and those of the libraries its kernels run on."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = {"fastconv": __version__, "python": platform.python_version()}
    for package in ("numpy", "scipy", "numba", "threadpoolctl"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
