"""The cython backend's own promises: built with OpenMP here, bitwise identical with 1 and 2 threads, every
way of cutting the work into blocks (several images per block, row bands of one image) right, and long
float32 weight-gradient sums accurate."""
import numpy as np
import pytest
from cases import rel_err

import fastconv
from fastconv import dispatch


def _cython():
    """The extension is built by `pip install -e .` on the project's machines: failing to load is a failure."""
    assert "cython" in fastconv.available_backends(), fastconv.backend_status()["cython"]
    return dispatch.load("cython")


def test_built_with_openmp():
    backend = _cython()
    assert backend._conv.OPENMP
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


def test_bad_pool_index_raises_without_writing_out_of_bounds():
    _cython()
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4))
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True, backend="cython")
    idx[1, 2, 1, 0] = 16
    with pytest.raises(ValueError, match="16"):
        fastconv.max_pool2d_backward(y, idx, x.shape, backend="cython")
