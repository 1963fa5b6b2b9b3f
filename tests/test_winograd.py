"""Winograd's algorithms (cython:winograd, F(4x4, 3x3), and cython:winograd2, F(2x2, 3x3)) beyond the shared
conformance suite: the geometry of edge tiles (every padding, cropped input gradients, planes smaller than a
tile, groups), what they refuse and why, and the direct algorithm's exact result wherever a transform meets
a value that is not finite or overflows."""
import numpy as np
import pytest
from cases import TOLERANCE, rel_err

import fastconv
from fastconv import dispatch

kernels = pytest.importorskip("fastconv.backends._conv_winograd")
WINOGRAD = [name for name in fastconv.algorithms("conv2d_forward") if "winograd" in name]
pytestmark = pytest.mark.skipif(not WINOGRAD, reason="Winograd needs AVX2 or AVX-512")


def _arrays(n, c, h, w, k, groups, padding, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((k, c // groups, 3, 3)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    out = fastconv.conv2d(x, weight, padding=padding, groups=groups, backend="naive")
    gy = rng.standard_normal(out.shape).astype(dtype)
    return x, weight, bias, gy


def _three(x, w, b, gy, backend, **kw):
    y = fastconv.conv2d(x, w, b, **kw, backend=backend)
    gx, gw, _ = fastconv.conv2d_backward(gy, x, w, **kw, output_mask=(True, True, False), backend=backend)
    return y, gx, gw


GEOMETRIES = [  # (n, c, h, w, k, groups, padding)
    (2, 3, 9, 11, 5, 1, 1), (1, 4, 1, 1, 3, 1, 1), (1, 2, 3, 3, 2, 1, 0), (3, 5, 7, 4, 6, 1, 2),
    (2, 4, 6, 9, 4, 1, 3), (2, 6, 10, 10, 9, 3, 1), (1, 8, 17, 13, 16, 2, (0, 2)), (2, 3, 8, 8, 4, 1, "same"),
    (1, 17, 5, 21, 33, 1, (3, 1)), (5, 2, 4, 5, 1, 1, 1), (1, 20, 12, 12, 20, 1, 4),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("algorithm", WINOGRAD)
def test_every_edge_and_padding_against_the_oracle(algorithm, geometry, dtype):
    n, c, h, w, k, groups, padding = geometry
    x, weight, bias, gy = _arrays(n, c, h, w, k, groups, padding, dtype)
    reference = _three(*(a.astype(np.float64) for a in (x, weight, bias, gy)), "naive", padding=padding,
                       groups=groups)
    for got, ref in zip(_three(x, weight, bias, gy, algorithm, padding=padding, groups=groups), reference):
        assert got.dtype == dtype
        assert rel_err(got, ref) <= TOLERANCE[dtype]


@pytest.fixture(params=["avx512", "avx2"])
def micro_kernels(request):
    """Each set of micro-kernels (and transforms) the CPU runs in turn, then the default again."""
    default = kernels.vector_isa()
    if not kernels.use_vector_isa(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} micro-kernels")
    yield request.param
    assert kernels.use_vector_isa(default)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES[::2], ids=str)
def test_each_instruction_set_against_the_oracle(micro_kernels, geometry, dtype):
    n, c, h, w, k, groups, padding = geometry
    x, weight, bias, gy = _arrays(n, c, h, w, k, groups, padding, dtype, seed=1)
    reference = _three(*(a.astype(np.float64) for a in (x, weight, bias, gy)), "naive", padding=padding,
                       groups=groups)
    for algorithm in WINOGRAD:
        for got, ref in zip(_three(x, weight, bias, gy, algorithm, padding=padding, groups=groups), reference):
            assert rel_err(got, ref) <= TOLERANCE[dtype]


def test_without_vector_instructions_winograd_refuses_and_auto_goes_on():
    default = kernels.vector_isa()
    assert kernels.use_vector_isa("none") and not kernels.use_vector_isa("avx9000")
    try:
        dispatch._chosen.clear()
        x, w = np.ones((1, 2, 6, 6), np.float32), np.ones((2, 2, 3, 3), np.float32)
        with pytest.raises(fastconv.UnsupportedError, match="AVX2 or AVX-512"):
            fastconv.conv2d(x, w, backend="cython:winograd")
        assert fastconv.conv2d(x, w, backend="cython").shape == (1, 2, 4, 4)
    finally:
        assert kernels.use_vector_isa(default)
        dispatch._chosen.clear()


@pytest.mark.parametrize("algorithm", WINOGRAD)
@pytest.mark.parametrize("kwargs, shape, why", [
    (dict(stride=2), (4, 4, 3, 3), "stride 1"), (dict(dilation=2), (4, 4, 3, 3), "dilation 1"),
    ({}, (4, 4, 5, 5), "3x3 kernels"), ({}, (4, 4, 1, 1), "3x3 kernels"),
    (dict(groups=4), (4, 1, 3, 3), "not depthwise"),
])
def test_what_winograd_refuses_says_why(algorithm, kwargs, shape, why):
    x = np.ones((1, 4, 9, 9), np.float32)
    with pytest.raises(fastconv.UnsupportedError, match=why):
        fastconv.conv2d(x, np.ones(shape, np.float32), **kwargs, backend=algorithm)


@pytest.mark.parametrize("algorithm", WINOGRAD)
@pytest.mark.parametrize("poison", ["nan", "inf", "overflow"])
def test_values_a_transform_cannot_carry_give_the_direct_result(algorithm, poison):
    """One inf or NaN spreads over a whole tile once transformed, and finite values near the float32 limit
    overflow there: such a call gives exactly what the direct algorithm gives."""
    x, w, b, gy = _arrays(2, 8, 12, 12, 8, 1, 1, np.float32, seed=3)
    if poison == "overflow":
        x *= np.float32(3e37)
    else:
        x[1, 3, 5, 6] = float(poison)
    (y, gx, gw), (exact_y, _, exact_gw) = (_three(x, w, b, gy, name, padding=1)
                                           for name in (algorithm, "cython:direct"))
    np.testing.assert_array_equal(y, exact_y)
    np.testing.assert_array_equal(gw, exact_gw)
    assert np.isfinite(gx).all()  # grad_output and the weights are finite: Winograd's own result


@pytest.mark.parametrize("algorithm", WINOGRAD)
def test_a_gradient_beyond_the_float32_range_gives_the_direct_result(algorithm):
    """Sums that overflow in the transformed domain (inf - inf = NaN once transformed back) included."""
    x, w, b, gy = _arrays(2, 8, 12, 12, 8, 1, 1, np.float32, seed=4)
    gy *= np.float32(3e37)
    mask = (True, True, False)
    got = fastconv.conv2d_backward(gy, x, w, padding=1, output_mask=mask, backend=algorithm)
    exact = fastconv.conv2d_backward(gy, x, w, padding=1, output_mask=mask, backend="cython:direct")
    for g, e in zip(got[:2], exact[:2]):
        np.testing.assert_array_equal(g, e)


def test_f4_is_as_accurate_as_its_interpolation_points_promise():
    """F(4x4, 3x3) at 0, +-5/8, +-3/2 on a 64-channel layer: float32 within a few times the direct error."""
    x, w, b, gy = _arrays(4, 64, 16, 16, 64, 1, 1, np.float32, seed=5)
    w /= np.float32(24)
    reference = _three(*(a.astype(np.float64) for a in (x, w, b, gy)), "cython:direct", padding=1)
    for got, ref in zip(_three(x, w, b, gy, "cython:winograd", padding=1), reference):
        assert rel_err(got, ref) <= 2e-6
