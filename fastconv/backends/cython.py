"""The Cython backend: compiled kernels from kernels/*.pyx (built by setup.py into fastconv/backends/_*.so).

Algorithms: `direct` (any convolution, strides split into their phases; with AVX-512 or AVX2 register tiles
picked from the CPU at run time), `gemm` (any convolution: im2col of a block of work, a few images or a band
of rows of one image, into a per-thread buffer, then single-threaded GEMMs on the project's own AVX-512 or
AVX2 micro-kernels, kernels/blocked_gemm.h, or scipy.linalg.cython_blas's on CPUs without AVX2; blocks in
parallel under OpenMP), `winograd` and `winograd2` (3x3 stride-1 convolutions by Winograd's F(4x4, 3x3) and
F(2x2, 3x3), on the same micro-kernels) and `pool` (max-pooling, parallel over the N*C planes; the 2x2/2
and 3x3/2 window rows in AVX-512 where the CPU has it).
Results are bitwise identical with any thread count.

BLAS is kept single-threaded inside the parallel regions: a call of the GEMM algorithm on BLAS (a CPU
without AVX2) limits every loaded BLAS (NumPy's and SciPy's OpenBLAS alike) to one thread and restores the
previous limits when it returns. The other calls never reach BLAS and leave its limits alone: setting them
costs microseconds and can wake OpenBLAS's threads, which then spin beside the kernel's.
"""
import contextlib
import math

import numpy as np

from ..ops import POOL_OPS, Algorithm
from ..params import index_out_of_plane
from ..threads import is_tiny, single_threaded_blas, threads_for

try:
    from . import _conv_direct, _conv_gemm, _conv_winograd, _pool
except ImportError as error:
    raise ImportError(
        f"the compiled Cython kernels are not built ({error}); build them with `pip install -e .` "
        "(or `python setup.py build_ext --inplace`), which needs a C compiler"
    ) from error


def describe():
    openmp = (f"OpenMP on ({_conv_gemm.openmp_max_threads()} threads max)" if _conv_gemm.OPENMP
              else "OpenMP off (serial build)")
    return (f"{openmp}, direct tiles {_conv_direct.vector_isa()}, Winograd micro-kernels "
            f"{_conv_winograd.vector_isa()}, GEMM micro-kernels {_conv_gemm.vector_isa()}, pooling window rows "
            f"{_pool.vector_isa()}, BLAS scipy.linalg.cython_blas")


def _convolve(kernel, p, calls_blas, *arrays):
    """Run a convolution kernel; where it calls BLAS, with BLAS single-threaded inside it (the thread setting
    is applied by the kernel's own parallel region: BLAS must not add threads of its own, even on one
    thread)."""
    if is_tiny(p.work):  # no parallel region, and GEMMs below OpenBLAS's own threading threshold
        kernel(*arrays, p, 1)
        return
    with single_threaded_blas() if calls_blas else contextlib.nullcontext():
        kernel(*arrays, p, threads_for(p.work))


def _filling(kernel, shape, calls_blas):
    """An op's function: a new array of the params' `shape` ("output_shape", ...), filled by the compiled
    kernel from the op's arrays; calls_blas() tells whether the kernel's GEMMs run on BLAS."""
    def op(*arrays_and_params):
        *arrays, p = arrays_and_params
        out = np.empty(getattr(p, shape), arrays[0].dtype)
        _convolve(kernel, p, calls_blas(), *arrays, out)
        return out

    return op


def max_pool2d_forward(x, p):
    y = np.empty(p.output_shape, x.dtype)
    indices = np.empty(p.output_shape, np.int64) if p.with_indices else None
    _pool.max_pool2d_forward(x, y, indices, p, threads_for(p.work))
    return y, indices


def max_pool2d_backward(gy, indices, p):
    gx = np.empty(p.input_shape, gy.dtype)
    bad_index = _pool.max_pool2d_backward(gy, indices, gx, threads_for(p.work))
    if bad_index is not None:
        raise index_out_of_plane(bad_index, p.input_shape)
    return gx


# The compiled kernels index within a plane, a column matrix's row and a GEMM with C ints (BLAS takes
# nothing wider); offsets across planes are Py_ssize_t.
INT_MAX = 2**31 - 1


def _indexable(op, p, dtype):
    """None where every plane, every image x channel count and every GEMM dimension fits a C int."""
    if op in POOL_OPS:  # PoolParams or PoolBackwardParams: both have the shapes
        sizes = (math.prod(p.input_shape[2:]), math.prod(p.output_shape[2:]), math.prod(p.input_shape[:2]))
    else:
        k = p.in_channels // p.groups * p.kernel_height * p.kernel_width
        sizes = (p.padded_height * p.padded_width, p.out_height * p.out_width, p.batch * p.in_channels,
                 p.batch * p.out_channels, p.out_channels * k)
    if max(sizes) > INT_MAX:
        return f"planes, image x channel counts and weight sizes of at most 2^31 - 1 elements only (here {max(sizes)})"
    return None


def _direct_applicable(op, p, dtype):
    reason = _indexable(op, p, dtype)
    if reason is not None:
        return reason
    if _conv_direct.vector_isa() == "none":
        return "needs AVX2 or AVX-512, which this CPU lacks"
    return None


def _convolutions(kernels, calls_blas):
    """The three convolution ops of a compiled module (its forward, backward_input and backward_weight)."""
    return {"conv2d_forward": _filling(kernels.forward, "output_shape", calls_blas),
            "conv2d_backward_input": _filling(kernels.backward_input, "input_shape", calls_blas),
            "conv2d_backward_weight": _filling(kernels.backward_weight, "weight_shape", calls_blas)}


def _winograd_applicable(op, p, dtype):
    reason = _indexable(op, p, dtype)
    if reason is not None:
        return reason
    if _conv_winograd.vector_isa() == "none":
        return "needs AVX2 or AVX-512, which this CPU lacks"
    if (p.kernel_height, p.kernel_width, p.stride, p.dilation) != (3, 3, (1, 1), (1, 1)):
        return "3x3 kernels, stride 1, dilation 1 only"
    if p.groups > 1 and p.in_channels == p.groups:
        return "not depthwise: one channel per group leaves no product over channels to save multiplications on"
    return None


def _winograd(m):
    """The three convolution ops of Winograd F(m x m, 3 x 3). Where a value is not finite (a transform spreads
    one inf or NaN over a whole tile), the call gives the direct algorithm's result instead (the GEMM's where
    the direct one does not serve), as PyTorch would."""
    def op(name, kernel, shape):
        def run(*arrays_and_params):
            *arrays, p = arrays_and_params
            out = np.empty(getattr(p, shape), arrays[0].dtype)
            if kernel(*arrays, out, p, m, threads_for(p.work)):
                return out
            exact = "direct" if _direct_applicable(name, p, out.dtype) is None else "gemm"
            return _EXACT[exact][name](*arrays, p)
        return run

    return {"conv2d_forward": op("conv2d_forward", _conv_winograd.forward, "output_shape"),
            "conv2d_backward_input": op("conv2d_backward_input", _conv_winograd.backward_input, "input_shape"),
            "conv2d_backward_weight": op("conv2d_backward_weight", _conv_winograd.backward_weight, "weight_shape")}


_EXACT = {"direct": _convolutions(_conv_direct, lambda: False),
          "gemm": _convolutions(_conv_gemm, lambda: _conv_gemm.vector_isa() == "none")}

ALGORITHMS = (
    Algorithm("direct", _EXACT["direct"], _direct_applicable),
    Algorithm("gemm", _EXACT["gemm"], _indexable),
    Algorithm("winograd", _winograd(4), _winograd_applicable),
    Algorithm("winograd2", _winograd(2), _winograd_applicable),
    Algorithm("pool", {"max_pool2d_forward": max_pool2d_forward, "max_pool2d_backward": max_pool2d_backward},
              _indexable),
)


def preferred(op, p, dtype):
    """The default order of this backend's algorithms for a call (measuring off): direct, but GEMM first for
    1x1 unpadded convolutions, which are one GEMM."""
    if op in POOL_OPS:
        return ("pool",)
    if (p.kernel_height, p.kernel_width, p.padding) == (1, 1, (0, 0, 0, 0)):
        return ("gemm", "direct")
    return ("direct", "gemm")
