"""The cython backend's own promises: built with OpenMP here, bitwise identical with 1 and 2 threads, every
way of cutting the work into blocks (several images per block, row bands of one image) right, the direct
path right with every set of register tiles the CPU runs, and long float32 weight-gradient sums accurate."""
import threading

import numpy as np
import pytest
from cases import (
    TOLERANCE,
    case_params,
    conv_arrays,
    conv_kwargs,
    deep_conv_cases,
    pool_input,
    pool_kwargs,
    rel_err,
    wide_conv_cases,
    wide_pool_cases,
    wide_strided_conv_cases,
)

import fastconv
from fastconv import dispatch


def _cython():
    """The extension is built by `pip install -e .` on the project's machines: failing to load is a failure."""
    assert "cython" in fastconv.available_backends(), fastconv.backend_status()["cython"]
    return dispatch.load("cython")


def test_built_with_openmp():
    backend = _cython()
    assert backend._conv_gemm.OPENMP
    assert backend.describe().startswith("OpenMP on")


def _conv_all(x, w, b, **kw):
    y = fastconv.conv2d(x, w, b, **kw, backend="cython")
    gx, gw, _ = fastconv.conv2d_backward(np.ones_like(y) + y, x, w, **kw, backend="cython")
    return y, gx, gw


# Batch 1 (row bands), batch 3 (bands), batch 40 of small images (several images per block), 1x1 pointwise.
SHAPES = [
    ((1, 8, 30, 30), (8, 8, 3, 3), dict(padding=1)),
    ((3, 6, 17, 13), (4, 3, 3, 2), dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)),
    ((40, 4, 6, 6), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2)),
    ((5, 16, 9, 9), (12, 16, 1, 1), dict()),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, kw", SHAPES)
def test_bitwise_identical_with_1_and_2_threads(x_shape, w_shape, kw, dtype):
    _cython()
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    with fastconv.threads(1):
        one = _conv_all(x, w, b, **kw)
        pool_one = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, backend="cython")
    with fastconv.threads(2):
        two = _conv_all(x, w, b, **kw)
        pool_two = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, backend="cython")
    for a, c in zip(one + pool_one, two + pool_two):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("x_shape, w_shape, kw", SHAPES)
def test_blocks_against_oracle(x_shape, w_shape, kw):
    _cython()
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    y, gx, gw = _conv_all(x, w, b, **kw)
    y_ref = fastconv.conv2d(x, w, b, **kw, backend="naive")
    gx_ref, gw_ref, _ = fastconv.conv2d_backward(np.ones_like(y) + y_ref, x, w, **kw, backend="naive")
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert rel_err(got, ref) <= 1e-12


# Forwards of the GEMM algorithm whose blocks hold several images of at least STRAIGHT_COLUMNS output pixels
# each (batch 16: two images per block), multiplied image by image straight into the output: bias, groups, a
# last block of one image (batch 17).
@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((16, 3, 16, 16), (5, 3, 3, 3), dict(padding=1)),
    ((17, 4, 18, 17), (6, 2, 3, 3), dict(padding=(1, 0), groups=2)),
])
def test_gemm_forward_of_blocks_of_wide_images_against_oracle(x_shape, w_shape, kw):
    _cython()
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    ref = fastconv.conv2d(x, w, b, **kw, backend="naive")
    for threads in (1, 2):
        with fastconv.threads(threads):
            assert rel_err(fastconv.conv2d(x, w, b, **kw, backend="cython:gemm"), ref) <= 1e-12
            got32 = fastconv.conv2d(*(a.astype(np.float32) for a in (x, w, b)), **kw, backend="cython:gemm")
            assert rel_err(got32, ref) <= 1e-5


def test_float32_weight_gradient_of_a_large_layer():
    """64x64x32x32 -> 64, 3x3, pad 1: 65,536 terms per weight, in float32 within 1e-5 of float64."""
    _cython()
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((64, 64, 32, 32)), rng.standard_normal((64, 64, 3, 3))
    gy = rng.standard_normal((64, 64, 32, 32))
    args = dict(padding=1, output_mask=(False, True, False), backend="cython")
    gw32 = fastconv.conv2d_backward(gy.astype(np.float32), x.astype(np.float32), w.astype(np.float32), **args)[1]
    gw64 = fastconv.conv2d_backward(gy, x, w, **args)[1]
    assert rel_err(gw32, gw64) <= 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector_isa", ["avx512", "none"])
def test_pool_window_rows_against_oracle(vector_isa, dtype):
    """The 2- and 3-cell stride-2 window rows, with each set of window rows ("none": pool.pyx's own loops),
    on rows long enough for their vector loops and tails, ties, NaNs and -inf in the data."""
    pool = _cython()._pool
    default = pool.vector_isa()
    if not pool.use_vector_isa(vector_isa):
        pytest.skip(f"this CPU cannot run the {vector_isa} window rows")
    try:
        for case in wide_pool_cases(25, seed=9):
            x = pool_input(case, dtype)
            for indices in (True, False):
                got = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=indices, backend="cython")
                want = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=indices, backend="naive")
                for g, w in zip(got if indices else (got,), want if indices else (want,)):
                    np.testing.assert_array_equal(g, w)
    finally:
        assert pool.use_vector_isa(default)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector_isa", ["avx512", "none"])
def test_pool_first_window_in_the_padding(vector_isa, dtype):
    """Windows of 2 or 3 columns at stride 2, padding 1: the window rows also take the first window, whose
    first column is padding; its other cells -inf, NaN or ties there must give PyTorch's value and index."""
    pool = _cython()._pool
    default = pool.vector_isa()
    if not pool.use_vector_isa(vector_isa):
        pytest.skip(f"this CPU cannot run the {vector_isa} window rows")
    rng = np.random.default_rng(21)
    x = np.round(rng.standard_normal((2, 3, 9, 37)) * 2) / 2
    x[0, :, :, :2] = -np.inf  # the first window's real cells all -inf on one plane
    x[1, 0, 3, 0] = x[1, 1, 4, 1] = np.nan
    x[1, 2, :, 0] = x[1, 2, :, 1] = 7.0  # ties
    x = x.astype(dtype)
    try:
        for kernel in (2, 3):
            window = dict(kernel_size=(3, kernel), stride=2, padding=(1, 1))
            for indices in (True, False):
                got = fastconv.max_pool2d(x, **window, return_indices=indices, backend="cython")
                want = fastconv.max_pool2d(x, **window, return_indices=indices, backend="naive")
                for g, w in zip(got if indices else (got,), want if indices else (want,)):
                    np.testing.assert_array_equal(g, w)
    finally:
        assert pool.use_vector_isa(default)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector_isa", ["avx512", "none"])
def test_pool_ties_of_signed_zeros(vector_isa, dtype):
    """0.0 and -0.0 compare equal, so the first of them in a window wins, values-only path included: the sign
    of each maximum must be PyTorch's (assert_array_equal alone does not see it)."""
    pool = _cython()._pool
    default = pool.vector_isa()
    if not pool.use_vector_isa(vector_isa):
        pytest.skip(f"this CPU cannot run the {vector_isa} window rows")
    rng = np.random.default_rng(3)
    x = rng.choice(np.array([0.0, -0.0, np.nan, -1.0], dtype), size=(2, 3, 21, 70), p=[0.45, 0.45, 0.02, 0.08])
    try:
        for window in (dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1),
                       dict(kernel_size=3, stride=2)):
            want = fastconv.max_pool2d(x, **window, backend="naive")
            for indices in (True, False):
                got = fastconv.max_pool2d(x, **window, return_indices=indices, backend="cython")
                got = got[0] if indices else got
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    finally:
        assert pool.use_vector_isa(default)


def test_bad_pool_index_raises_without_writing_out_of_bounds():
    _cython()
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4))
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True, backend="cython")
    idx[1, 2, 1, 0] = 16
    with pytest.raises(ValueError, match="16"):
        fastconv.max_pool2d_backward(y, idx, x.shape, backend="cython")


@pytest.fixture(params=["avx512", "avx2", "none"])
def vector_isa(request):
    """Each set of register tiles in turn ("none": the im2col + GEMM path only), then the default again."""
    conv = _cython()._conv_direct
    default = conv.vector_isa()
    if not conv.use_vector_isa(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} register tiles")
    dispatch._chosen.clear()  # the choices made with other tiles: whether direct serves depends on them
    yield request.param
    assert conv.use_vector_isa(default)
    dispatch._chosen.clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_path_against_oracle(vector_isa, dtype):
    conv = _cython()._conv_direct
    for case in wide_conv_cases(25, seed=4) + wide_strided_conv_cases(15, seed=7) + deep_conv_cases(8, seed=8):
        p = case_params(case)
        direct = vector_isa != "none"
        assert conv.direct_serves(p, np.dtype(dtype).itemsize) == direct
        x, w, b, gy = conv_arrays(case, np.float64, seed=5)
        kw = conv_kwargs(case)
        ref = [fastconv.conv2d(x, w, b, **kw, backend="naive"),
               *fastconv.conv2d_backward(gy, x, w, **kw, output_mask=(True, True, False), backend="naive")[:2]]
        cast = [None if a is None else a.astype(dtype) for a in (x, w, b, gy)]
        name = "cython:direct"
        if not direct:
            with pytest.raises(fastconv.UnsupportedError, match="needs AVX2 or AVX-512"):
                fastconv.conv2d(*cast[:3], **kw, backend=name)
            name = "cython:gemm"
        got = [fastconv.conv2d(*cast[:3], **kw, backend=name),
               fastconv.conv2d_backward(cast[3], *cast[:2], **kw, output_mask=(False, True, False), backend=name)[1],
               fastconv.conv2d_backward(cast[3], *cast[:2], **kw, output_mask=(True, False, False), backend=name)[0]]
        for g, r in zip(got, [ref[0], ref[2], ref[1]]):
            assert rel_err(g, r) <= TOLERANCE[dtype], case


# Narrow output rows with many output channels, where the forward's vectors run over output channels: ragged
# last pixel runs (rows ending in a short block of half the micro-kernel's rows: 12, 10 and 9 pixels), channels
# past a block of micro-kernel width, groups, dilation, row strides and bias.
CHANNEL_VECTOR_CASES = [
    dict(x_shape=(2, 8, 14, 14), w_shape=(24, 8, 3, 3), stride=1, padding=0, dilation=1, groups=1, bias=False),
    dict(x_shape=(2, 16, 11, 20), w_shape=(48, 16, 3, 3), stride=2, padding=1, dilation=1, groups=1, bias=True),
    dict(x_shape=(1, 12, 9, 11), w_shape=(20, 12, 3, 3), stride=1, padding=0, dilation=1, groups=1, bias=False),
    dict(x_shape=(5, 6, 12, 12), w_shape=(16, 6, 5, 5), stride=1, padding=0, dilation=1, groups=1, bias=True),
    dict(x_shape=(3, 8, 10, 7), w_shape=(53, 8, 3, 3), stride=1, padding=1, dilation=1, groups=1, bias=False),
    dict(x_shape=(2, 16, 11, 6), w_shape=(40, 8, 3, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2,
         bias=True),
    dict(x_shape=(2, 30, 9, 15), w_shape=(100, 30, 2, 3), stride=(1, 2), padding=(0, 1), dilation=(2, 1), groups=1,
         bias=True),
    dict(x_shape=(1, 64, 9, 13), w_shape=(64, 64, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=False),
    # one run over every pixel of a band (1x1 and k x 1 layers, no padding columns): bands of several rows
    # (batch 1), runs ending in a short block or a partial one, rows of padding, groups, input channels past
    # whole blocks of 8
    dict(x_shape=(1, 72, 23, 19), w_shape=(40, 72, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=True),
    dict(x_shape=(3, 130, 7, 5), w_shape=(34, 65, 1, 1), stride=1, padding=0, dilation=1, groups=2, bias=True),
    dict(x_shape=(2, 37, 10, 16), w_shape=(48, 37, 3, 1), stride=1, padding=(1, 0), dilation=1, groups=1,
         bias=False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_by_output_channels_against_oracle(vector_isa, dtype):
    conv = _cython()._conv_direct
    for case in CHANNEL_VECTOR_CASES:
        p = case_params(case)
        if vector_isa == "none":  # no register tiles: the direct path serves nothing
            with pytest.raises(ValueError, match="does not serve"):
                conv.forward_vectors(p, np.dtype(dtype).itemsize)
            continue
        assert conv.forward_vectors(p, np.dtype(dtype).itemsize) == "channels", case
        x, w, b, _ = conv_arrays(case, np.float64, seed=12)
        kw = conv_kwargs(case)
        ref = fastconv.conv2d(x, w, b, **kw, backend="naive")
        cast = [None if a is None else a.astype(dtype) for a in (x, w, b)]
        results = []
        for threads in (1, 2):
            with fastconv.threads(threads):
                results.append(fastconv.conv2d(*cast, **kw, backend="cython:direct"))
        assert rel_err(results[0], ref) <= TOLERANCE[dtype], case
        np.testing.assert_array_equal(results[0], results[1])


# Weight gradients whose vectors run over input channels, on bands of whole input rows transposed at once
# (1x1 and k x 1 layers, no padding columns): several bands per image, input channels padded to whole vectors,
# rows of padding.
INPUT_VECTOR_WEIGHT_CASES = [
    dict(x_shape=(1, 40, 31, 17), w_shape=(24, 40, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=False),
    dict(x_shape=(2, 20, 9, 11), w_shape=(13, 20, 3, 1), stride=1, padding=(1, 0), dilation=1, groups=1,
         bias=False),
]


# Weight gradients of narrow groups with many output channels, whose vectors run over output channels: terms
# of a kernel row past a block of micro-kernel rows, channels past a vector, groups, strides, row dilation,
# padding, bands of several rows.
OUTPUT_VECTOR_WEIGHT_CASES = [
    dict(x_shape=(5, 3, 12, 12), w_shape=(16, 3, 5, 5), stride=1, padding=0, dilation=1, groups=1, bias=False),
    dict(x_shape=(2, 3, 30, 29), w_shape=(46, 3, 7, 7), stride=2, padding=3, dilation=1, groups=1, bias=False),
    dict(x_shape=(3, 6, 9, 11), w_shape=(64, 3, 2, 5), stride=(1, 2), padding=(2, 2), dilation=(2, 1), groups=2,
         bias=False),
    dict(x_shape=(1, 2, 40, 33), w_shape=(32, 2, 1, 7), stride=(3, 1), padding=(0, 3), dilation=1, groups=1,
         bias=False),
]


# Weight gradients whose vectors run over output columns, in tiles of taps: rows in several pieces of a tile
# call with a shorter last one (rows of 1026 columns), rows ending in a partial vector, a last block of fewer
# output channels, taps past a group of three, strides, dilation across, groups; and a wide 7x7 layer whose
# blocks over output channels would be full but whose grad_output, transposed, would not stay in L2.
COLUMN_WEIGHT_CASES = [
    dict(x_shape=(2, 1, 150, 123), w_shape=(11, 1, 3, 5), stride=1, padding=(1, 0), dilation=1, groups=1,
         bias=False),
    dict(x_shape=(2, 1, 64, 1030), w_shape=(11, 1, 3, 5), stride=1, padding=(1, 0), dilation=1, groups=1,
         bias=False),
    dict(x_shape=(3, 4, 21, 37), w_shape=(10, 2, 4, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
         bias=False),
    dict(x_shape=(2, 6, 19, 50), w_shape=(15, 2, 3, 3), stride=1, padding=0, dilation=1, groups=3, bias=False),
    dict(x_shape=(8, 3, 66, 64), w_shape=(64, 3, 7, 7), stride=1, padding=3, dilation=1, groups=1, bias=False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vectors, cases", [("input channels", INPUT_VECTOR_WEIGHT_CASES),
                                            ("output channels", OUTPUT_VECTOR_WEIGHT_CASES),
                                            ("columns", COLUMN_WEIGHT_CASES)])
def test_weight_gradient_paths_against_oracle(vector_isa, dtype, vectors, cases):
    conv = _cython()._conv_direct
    for case in cases:
        p = case_params(case)
        if vector_isa == "none":
            with pytest.raises(ValueError, match="does not serve"):
                conv.weight_vectors(p, np.dtype(dtype).itemsize)
            continue
        assert conv.weight_vectors(p, np.dtype(dtype).itemsize) == vectors, case
        x, w, _, gy = conv_arrays(case, np.float64, seed=13)
        kw = conv_kwargs(case)
        ref = fastconv.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False), backend="naive")[1]
        cast = [a.astype(dtype) for a in (gy, x, w)]
        results = []
        for threads in (1, 2):
            with fastconv.threads(threads):
                results.append(fastconv.conv2d_backward(*cast, **kw, output_mask=(False, True, False),
                                                        backend="cython:direct")[1])
        assert rel_err(results[0], ref) <= TOLERANCE[dtype], case
        np.testing.assert_array_equal(results[0], results[1])


def test_direct_path_bitwise_identical_with_1_and_2_threads(vector_isa):
    _cython()
    rng = np.random.default_rng(6)
    x, w = (rng.standard_normal(shape).astype(np.float32) for shape in ((3, 12, 23, 19), (20, 12, 3, 3)))
    results = []
    for threads in (1, 2):
        with fastconv.threads(threads):
            y = fastconv.conv2d(x, w, padding=1, backend="cython")
            grads = fastconv.conv2d_backward(y, x, w, padding=1, output_mask=(1, 1, 0), backend="cython")
            results.append((y, *grads[:2]))
    for a, c in zip(*results):
        np.testing.assert_array_equal(a, c)


# GEMMs past each edge of blocked_gemm.h's blocking: rows not a multiple of a micro-kernel's (8 or 4), columns
# past a block (480) with a ragged last panel, depths past a block (256), and weight gradients whose B is
# stored by columns and much wider than A (the transposed product). Then pointwise blocks of several images,
# one GEMM over the images side by side: panels across images' edges, packed (more than 128 rows, or runs
# that leave many lanes empty) or each image in place (few rows, whole vectors), a last block of fewer images.
GEMM_CASES = [
    dict(x_shape=(26, 5, 7, 7), w_shape=(136, 5, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=True),
    dict(x_shape=(18, 6, 4, 8), w_shape=(10, 3, 1, 1), stride=1, padding=0, dilation=1, groups=2, bias=True),
    dict(x_shape=(17, 130, 5, 5), w_shape=(7, 130, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=False),
    dict(x_shape=(2, 300, 9, 7), w_shape=(21, 300, 1, 1), stride=1, padding=0, dilation=1, groups=1, bias=True),
    dict(x_shape=(3, 5, 37, 41), w_shape=(13, 5, 3, 3), stride=1, padding=1, dilation=1, groups=1, bias=False),
    dict(x_shape=(2, 24, 11, 10), w_shape=(6, 12, 3, 3), stride=2, padding=(1, 0), dilation=1, groups=2,
         bias=True),
    dict(x_shape=(4, 30, 6, 6), w_shape=(9, 30, 3, 3), stride=1, padding=0, dilation=(1, 2), groups=1,
         bias=False),
]


@pytest.fixture(params=["avx512", "avx2", "none"])
def gemm_micro_kernels(request):
    """Each set of the GEMM's micro-kernels in turn ("none": BLAS's GEMM), then the default again."""
    gemm = _cython()._conv_gemm
    default = gemm.vector_isa()
    if not gemm.use_vector_isa(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} micro-kernels")
    yield request.param
    assert gemm.use_vector_isa(default)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_on_each_set_of_micro_kernels_against_oracle(gemm_micro_kernels, dtype):
    for case in GEMM_CASES + wide_conv_cases(6, seed=9) + deep_conv_cases(4, seed=10):
        x, w, b, gy = conv_arrays(case, np.float64, seed=11)
        kw = conv_kwargs(case)
        ref = [fastconv.conv2d(x, w, b, **kw, backend="naive"),
               *fastconv.conv2d_backward(gy, x, w, **kw, backend="naive")]
        cast = [None if a is None else a.astype(dtype) for a in (x, w, b, gy)]
        results = []
        for threads in (1, 2):
            with fastconv.threads(threads):
                results.append([fastconv.conv2d(*cast[:3], **kw, backend="cython:gemm"),
                                *fastconv.conv2d_backward(cast[3], *cast[:2], **kw, backend="cython:gemm")])
        for one, two, r in zip(*results, ref):
            assert rel_err(one, r) <= TOLERANCE[dtype], case
            np.testing.assert_array_equal(one, two)


def test_unknown_gemm_micro_kernels_are_refused():
    gemm = _cython()._conv_gemm
    default = gemm.vector_isa()
    assert not gemm.use_vector_isa("avx9000")
    assert gemm.vector_isa() == default


def test_unknown_register_tiles_are_refused():
    conv = _cython()._conv_direct
    default = conv.vector_isa()
    assert not conv.use_vector_isa("avx9000")
    assert conv.vector_isa() == default


@pytest.mark.parametrize("algorithm", ["direct", "gemm"])
def test_blas_runs_on_the_kernels_threads_only(monkeypatch, algorithm):
    """Inside a kernel that calls BLAS (the GEMM algorithm on BLAS: a CPU without AVX2), BLAS is
    single-threaded whatever the thread setting (with 1 thread too): the kernel's own parallel region is what
    applies the setting. The kernels that never call it leave BLAS's limits as the user set them."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    backend, seen = _cython(), []
    convolve = backend._convolve
    gemm_isa = backend._conv_gemm.vector_isa()

    def spying(kernel, p, calls_blas, *arrays):  # records BLAS's thread count as each kernel starts
        def call(*args):
            seen.append(max(pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                            if pool["user_api"] == "blas"))
            return kernel(*args)
        return convolve(call, p, calls_blas, *arrays)

    monkeypatch.setattr(backend, "_convolve", spying)
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((4, 16, 20, 20)), rng.standard_normal((16, 16, 3, 3))  # above the serial cut
    try:
        if algorithm == "gemm":
            backend._conv_gemm.use_vector_isa("none")
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            for threads in (1, 2):
                with fastconv.threads(threads):
                    y = fastconv.conv2d(x, w, stride=2, backend=f"cython:{algorithm}")
                    fastconv.conv2d_backward(y, x, w, stride=2, backend=f"cython:{algorithm}")
    finally:
        backend._conv_gemm.use_vector_isa(gemm_isa)
    assert seen == [1 if algorithm == "gemm" else 2] * 6, seen


def test_shapes_past_c_int_indexing_are_refused_with_the_reason():
    """A plane past 2^31 - 1 elements would overflow the kernels' int index math (and BLAS's int sizes):
    the compiled algorithms refuse it (no array is allocated here), and auto still has algorithms for it."""
    from fastconv.ops import CONV_OPS
    from fastconv.params import PoolBackwardParams, conv_params, pool_params

    f32 = np.dtype(np.float32)
    huge_plane = conv_params((1, 1, 50_000, 50_000), (4, 1, 3, 3), 1, 1, 1, 1)
    for op in CONV_OPS:
        for name in ("cython:direct", "cython:gemm"):
            assert "2^31 - 1" in dispatch.get_algorithm(name).supports(op, huge_plane, f32), (name, op)
        names = dispatch.candidates(op, huge_plane, f32, "auto",
                                    {b: dispatch._probe(b).algorithms for b in fastconv.available_backends()},
                                    lambda b: dispatch.default_order(b, op, huge_plane, f32))
        assert names and not any(name.startswith("cython") for name in names)
    pool = pool_params((1, 1, 50_000, 50_000), 2, None, 0, 1, False)
    assert "2^31 - 1" in dispatch.get_algorithm("cython:pool").supports("max_pool2d_forward", pool, f32)
    back = PoolBackwardParams(pool.input_shape, pool.output_shape)
    assert "2^31 - 1" in dispatch.get_algorithm("cython:pool").supports("max_pool2d_backward", back, f32)
    # Channels x plane past 2^31 (256 x 3000 x 3000) is indexed in Py_ssize_t: served.
    many = conv_params((1, 256, 3000, 3000), (256, 256, 1, 1), 1, 0, 1, 1)
    assert dispatch.get_algorithm("cython:gemm").supports("conv2d_forward", many, f32) is None


def test_a_switch_of_register_tiles_never_reaches_a_running_call():
    """Each call copies the tile table when it plans its buffers: switching tiles from another thread
    (a test hook) while calls run gives results as right as ever, never a tile of one size in a buffer
    sized for the other."""
    conv = _cython()._conv_direct
    default = conv.vector_isa()
    if not (conv.use_vector_isa("avx2") and conv.use_vector_isa(default)) or default == "avx2":
        pytest.skip("needs two sets of register tiles")
    rng = np.random.default_rng(8)
    x, w = (rng.standard_normal(shape).astype(np.float32) for shape in ((4, 16, 40, 40), (24, 16, 3, 3)))
    ref = fastconv.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, backend="cython:gemm")
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            for isa in ("avx2", default):
                conv.use_vector_isa(isa)

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        for _ in range(30):
            assert rel_err(fastconv.conv2d(x, w, padding=1, backend="cython:direct"), ref) <= 1e-5
    finally:
        stop.set()
        toggler.join()
        conv.use_vector_isa(default)


def test_a_tap_with_no_valid_column_reads_nothing():
    """'same' padding keeps the output as wide as the input, so im2col copies rows as one run; a tap that lies
    in the padding for every column (dilation 4 on a 4-wide input) once read past the plane (found by the fuzz
    under AddressSanitizer: this test fails under FASTCONV_SANITIZE=1 without the fix)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 1, 11, 4)), rng.standard_normal((1, 1, 3, 5))
    kw = dict(padding="same", dilation=(1, 4))
    y = fastconv.conv2d(x, w, **kw, backend="cython:gemm")
    assert rel_err(y, fastconv.conv2d(x, w, **kw, backend="naive")) <= 1e-12
    gy = rng.standard_normal(y.shape)
    got, ref = (fastconv.conv2d_backward(gy, x, w, **kw, backend=name) for name in ("cython:gemm", "naive"))
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-12
