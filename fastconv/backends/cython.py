"""The Cython backend: compiled kernels from kernels/*.pyx (built by setup.py into fastconv/backends/_*.so).

Convolutions: stride 1 (forward, input gradient, and the weight gradient of narrow layers) as a direct
convolution with AVX-512 or AVX2 register tiles picked from the CPU at run time; the rest as im2col of a block
of work (a few images, or a band of rows of one image) into a per-thread buffer, then single-threaded BLAS
GEMMs (scipy.linalg.cython_blas); the blocks run in parallel under OpenMP.
Max-pooling: parallel over the N*C planes. Results are bitwise identical with any thread count.

BLAS is kept single-threaded inside the parallel regions: a convolution call limits every loaded BLAS
(NumPy's and SciPy's OpenBLAS alike) to one thread and restores the previous limits when it returns.
"""
import numpy as np

from ..params import index_out_of_plane
from ..threads import SERIAL_WORK, blas_threads, threads_for

try:
    from . import _conv, _pool
except ImportError as error:
    raise ImportError(
        f"the compiled Cython kernels are not built ({error}); build them with `pip install -e .` "
        "(or `python setup.py build_ext --inplace`), which needs a C compiler"
    ) from error


def supports(op, p, dtype):
    return None


def describe():
    openmp = f"OpenMP on ({_conv.openmp_max_threads()} threads max)" if _conv.OPENMP else "OpenMP off (serial build)"
    return f"{openmp}, direct tiles {_conv.vector_isa()}, BLAS scipy.linalg.cython_blas"


def _convolve(kernel, p, *arrays):
    """Run a convolution kernel, with BLAS single-threaded inside it (the thread setting is applied by the
    kernel's own parallel region: BLAS must not add threads of its own, even on one thread)."""
    if p.flops // 2 < SERIAL_WORK:  # no parallel region, and GEMMs below OpenBLAS's own threading threshold
        kernel(*arrays, p, 1)
        return
    with blas_threads(1):
        kernel(*arrays, p, threads_for(p.flops // 2))


def conv2d_forward(x, w, b, p):
    y = np.empty(p.output_shape, x.dtype)
    _convolve(_conv.forward, p, x, w, b, y)
    return y


def conv2d_backward_input(gy, w, p):
    gx = np.empty(p.input_shape, gy.dtype)
    _convolve(_conv.backward_input, p, gy, w, gx)
    return gx


def conv2d_backward_weight(gy, x, p):
    gw = np.empty(p.weight_shape, gy.dtype)
    _convolve(_conv.backward_weight, p, gy, x, gw)
    return gw


def max_pool2d_forward(x, p):
    y = np.empty(p.output_shape, x.dtype)
    indices = np.empty(p.output_shape, np.int64)
    _pool.max_pool2d_forward(x, y, indices, p, threads_for(x.size))
    return y, indices


def max_pool2d_backward(gy, indices, input_shape):
    gx = np.empty(input_shape, gy.dtype)
    bad_index = _pool.max_pool2d_backward(gy, indices, gx, threads_for(gx.size))
    if bad_index is not None:
        raise index_out_of_plane(bad_index, input_shape)
    return gx
