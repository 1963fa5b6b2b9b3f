"""Every algorithm ('backend:algorithm') on its own: against the naive oracle on every case it claims to
support, refusing the rest with its reason (UnsupportedError); deterministic; thread-invariant where its
backend promises it; accurate on long float32 sums; non-finite values where PyTorch puts them."""
import functools
import re

import numpy as np
import pytest
from cases import (
    TOLERANCE,
    case_id,
    case_params,
    conv_arrays,
    conv_cases,
    conv_kwargs,
    deep_conv_cases,
    pointwise_cases,
    pool_cases,
    pool_input,
    pool_kwargs,
    rel_err,
    wide_conv_cases,
    wide_pool_cases,
    wide_strided_conv_cases,
)

import fastconv
from fastconv import dispatch
from fastconv.ops import CONV_OPS, OPS
from fastconv.params import PoolBackwardParams, pool_params

CONV_CASES = (conv_cases(150, seed=12) + wide_conv_cases(60, seed=14) + wide_strided_conv_cases(40, seed=16)
              + deep_conv_cases(20, seed=17) + pointwise_cases(30, seed=15))
POOL_CASES = pool_cases(100, seed=13) + wide_pool_cases(30, seed=18)
DTYPES = [np.float32, np.float64]


def _conv_calls(case, dtype, name, arrays=None):
    """The three convolution ops of `case` through the API with backend=name, as {op: no-argument call}."""
    x, w, b, gy = conv_arrays(case, dtype) if arrays is None else arrays
    kw = conv_kwargs(case)
    return {
        "conv2d_forward": lambda: fastconv.conv2d(x, w, b, **kw, backend=name),
        "conv2d_backward_input":
            lambda: fastconv.conv2d_backward(gy, x, w, **kw, output_mask=(True, False, False), backend=name)[0],
        "conv2d_backward_weight":
            lambda: fastconv.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False), backend=name)[1],
    }


@functools.lru_cache(maxsize=None)
def _conv_oracle(index, dtype):
    """The oracle's three results for CONV_CASES[index], in float64 from the dtype's rounded inputs."""
    arrays = [None if a is None else a.astype(np.float64) for a in conv_arrays(CONV_CASES[index], dtype)]
    return {op: call() for op, call in _conv_calls(CONV_CASES[index], dtype, "naive", arrays).items()}


def test_registry_names_every_path():
    names = fastconv.algorithms()
    assert len([n for n in names if ":" in n]) >= 6
    assert all(n == "naive" or re.fullmatch(r"[a-z0-9]+:[a-z0-9]+", n) for n in names)
    for expected in ("im2col:gemm", "im2col:rowshift", "im2col:pointwise", "numba:direct", "cython:direct",
                     "cython:gemm", "cython:pool", "numba:pool", "im2col:pool"):
        assert expected in names
    for op in OPS:
        assert set(fastconv.algorithms(op)) <= set(names) and "naive" in fastconv.algorithms(op)
        assert all(op in dispatch.get_algorithm(n).ops for n in fastconv.algorithms(op))
    assert "cython:pool" not in fastconv.algorithms("conv2d_forward")
    with pytest.raises(ValueError, match="unknown op 'conv3d'"):
        fastconv.algorithms("conv3d")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(CONV_CASES)), ids=[case_id(c) for c in CONV_CASES])
def test_conv_algorithm_against_oracle(conv_algorithm, index, dtype):
    case = CONV_CASES[index]
    p, algorithm = case_params(case), dispatch.get_algorithm(conv_algorithm)
    for op, call in _conv_calls(case, dtype, conv_algorithm).items():
        reason = algorithm.supports(op, p, np.dtype(dtype))
        if reason is None:
            got = call()
            assert got.dtype == dtype and got.flags.c_contiguous
            assert rel_err(got, _conv_oracle(index, dtype)[op]) <= TOLERANCE[dtype], op
        else:
            assert isinstance(reason, str) and reason
            with pytest.raises(fastconv.UnsupportedError, match=re.escape(reason)):
                call()


def test_every_conv_algorithm_serves_some_case(conv_algorithm):
    """An algorithm that refused everything would pass the conformance test without computing a thing."""
    algorithm = dispatch.get_algorithm(conv_algorithm)
    for op in CONV_OPS:
        served = [c for c in CONV_CASES if algorithm.supports(op, case_params(c), np.dtype(np.float32)) is None]
        assert len(served) >= 5, f"{conv_algorithm} serves {op} on only {len(served)} cases"


def p_args(x, case):
    return (x.shape, *(case[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_algorithm_against_oracle(pool_algorithm, case, dtype):
    x = pool_input(case, dtype)
    p = pool_params(*p_args(x, case))
    algorithm = dispatch.get_algorithm(pool_algorithm)
    assert algorithm.supports("max_pool2d_forward", p, np.dtype(dtype)) is None
    y, idx = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=True, backend=pool_algorithm)
    y_ref, idx_ref = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=True, backend="naive")
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(y, y_ref)
    # Without indices: the same values, and none computed for the caller.
    values_only = pool_params(*p_args(x, case), False)
    assert algorithm.supports("max_pool2d_forward", values_only, np.dtype(dtype)) is None
    values, no_indices = algorithm.ops["max_pool2d_forward"](np.ascontiguousarray(x), values_only)
    assert no_indices is None
    np.testing.assert_array_equal(values, y_ref)
    np.testing.assert_array_equal(fastconv.max_pool2d(x, **pool_kwargs(case), backend=pool_algorithm), y_ref)
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    assert algorithm.supports("max_pool2d_backward", PoolBackwardParams(x.shape, y.shape), np.dtype(dtype)) is None
    gx = fastconv.max_pool2d_backward(gy, idx, x.shape, backend=pool_algorithm)
    gx_ref = fastconv.max_pool2d_backward(gy.astype(np.float64), idx, x.shape, backend="naive")
    assert gx.dtype == dtype and rel_err(gx, gx_ref) <= TOLERANCE[dtype]


def test_conv_algorithms_refuse_pooling_and_pool_algorithms_convolution(conv_algorithm, pool_algorithm):
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    with pytest.raises(fastconv.UnsupportedError, match="does not implement max_pool2d_forward"):
        fastconv.max_pool2d(x, 2, backend=conv_algorithm)
    with pytest.raises(fastconv.UnsupportedError, match="does not implement conv2d_forward"):
        fastconv.conv2d(x, np.ones((2, 2, 3, 3)), backend=pool_algorithm)


# Algorithms of backends whose results must not depend on the thread count, bitwise. im2col's GEMMs run on
# BLAS's own threads, which block differently with 1 and 2 threads: it matches within tolerance only.
THREAD_INVARIANT_BACKENDS = {"numba", "cython"}
THREAD_CASES = [
    dict(x_shape=(3, 8, 14, 14), w_shape=(12, 4, 3, 3), bias=True, stride=1, padding=1, dilation=1, groups=2),
    dict(x_shape=(2, 6, 17, 15), w_shape=(8, 6, 3, 3), bias=True, stride=2, padding=1, dilation=1, groups=1),
    dict(x_shape=(4, 16, 12, 12), w_shape=(24, 16, 1, 1), bias=False, stride=1, padding=0, dilation=1, groups=1),
    dict(x_shape=(2, 3, 40, 40), w_shape=(64, 3, 5, 5), bias=True, stride=1, padding=2, dilation=1, groups=1),
    dict(x_shape=(1, 3, 45, 46), w_shape=(20, 3, 7, 7), bias=True, stride=2, padding=3, dilation=1, groups=1),
    dict(x_shape=(9, 24, 30, 29), w_shape=(20, 24, 3, 3), bias=False, stride=(2, 3), padding=1, dilation=1,
         groups=1),
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=case_id)
def test_conv_algorithm_repeatable_and_thread_invariant(conv_algorithm, case):
    algorithm, p = dispatch.get_algorithm(conv_algorithm), case_params(case)
    ops = [op for op in CONV_OPS if algorithm.supports(op, p, np.dtype(np.float32)) is None]
    results = {}
    for n in (1, 2, 2):
        with fastconv.threads(n):
            results.setdefault(n, []).append([_conv_calls(case, np.float32, conv_algorithm)[op]() for op in ops])
    for first, again in zip(*results[2]):
        np.testing.assert_array_equal(first, again)
    for one, two in zip(results[1][0], results[2][0]):
        if conv_algorithm.split(":")[0] in THREAD_INVARIANT_BACKENDS:
            np.testing.assert_array_equal(one, two)
        else:
            assert rel_err(one, two) <= TOLERANCE[np.float32]


# Long sums: the weight gradient of the 3x3 layer sums 65,536 terms per weight, the 1x1 one's 6,272.
LARGE_LAYERS = {
    "64x64x32x32->64-3x3": dict(x_shape=(64, 64, 32, 32), w_shape=(64, 64, 3, 3), stride=1, padding=1, dilation=1,
                                groups=1),
    "32x256x14x14->256-1x1": dict(x_shape=(32, 256, 14, 14), w_shape=(256, 256, 1, 1), stride=1, padding=0,
                                  dilation=1, groups=1),
}


@functools.lru_cache(maxsize=None)
def _large_layer(name, dtype):
    case = LARGE_LAYERS[name]
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal(case["x_shape"]), rng.standard_normal(case["w_shape"])
    gy = rng.standard_normal(case_params(case).output_shape)
    return tuple(a.astype(dtype) for a in (x, w, gy))


@functools.lru_cache(maxsize=None)
def _large_layer_reference(name, op):
    x, w, gy = _large_layer(name, np.float64)
    return _conv_calls(LARGE_LAYERS[name], np.float64, "im2col:gemm", (x, w, None, gy))[op]()


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("layer", LARGE_LAYERS)
def test_float32_accuracy_on_large_layers(conv_algorithm, layer, op):
    """float32 against im2col:gemm in float64 (itself checked against the oracle above) on long sums; an
    algorithm that does not serve the layer refuses it."""
    case, (x, w, gy) = LARGE_LAYERS[layer], _large_layer(layer, np.float32)
    call = _conv_calls(case, np.float32, conv_algorithm, (x, w, None, gy))[op]
    if dispatch.get_algorithm(conv_algorithm).supports(op, case_params(case), np.dtype(np.float32)) is not None:
        with pytest.raises(fastconv.UnsupportedError):
            call()
        return
    assert rel_err(call(), _large_layer_reference(layer, op)) <= TOLERANCE[np.float32]


@pytest.mark.parametrize("channels", [3, 8], ids=["3-channels", "8-channels"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("stride", [1, 2])
def test_non_finite_inputs_propagate_as_in_the_oracle(conv_algorithm, value, channels, stride):
    """An inf or NaN in the input reaches exactly the outputs and gradients whose sums include it, as in
    PyTorch: no extra NaN from a computed-and-dropped column multiplying it by zero."""
    case = dict(x_shape=(2, channels, 9, 8), w_shape=(4, channels, 3, 3), bias=True, stride=stride, padding=1,
                dilation=1, groups=1)
    algorithm, p = dispatch.get_algorithm(conv_algorithm), case_params(case)
    x, w, b, gy = conv_arrays(case, np.float64)
    x[0, 1, 4, 7] = x[1, 2, 0, 0] = x[1, channels - 1, 8, 6] = value
    got, ref = (_conv_calls(case, np.float64, name, (x, w, b, gy)) for name in (conv_algorithm, "naive"))
    for op in CONV_OPS:
        if algorithm.supports(op, p, np.dtype(np.float64)) is None:
            g, r = got[op](), ref[op]()
            np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
            np.testing.assert_array_equal(np.isinf(g), np.isinf(r))


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_non_finite_weight_reaches_only_what_its_tap_reaches(conv_algorithm, value, stride):
    """A NaN or inf weight puts NaN/inf in the input gradient only at the cells its tap reaches from a
    real output (PyTorch's and the loop definition's answer), never over the padding; forward and weight
    gradient as the oracle too."""
    case = dict(x_shape=(2, 4, 9, 8), w_shape=(6, 2, 3, 3), bias=True, stride=stride, padding=1, dilation=1,
                groups=2)
    x, w, b, gy = conv_arrays(case, np.float64)
    w[1, 0, 0, 2] = w[4, 1, 2, 0] = value
    algorithm, p = dispatch.get_algorithm(conv_algorithm), case_params(case)
    got, ref = (_conv_calls(case, np.float64, name, (x, w, b, gy)) for name in (conv_algorithm, "naive"))
    served = [op for op in CONV_OPS if algorithm.supports(op, p, np.dtype(np.float64)) is None]
    for op in served:
        g, r = got[op](), ref[op]()
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=op)
        np.testing.assert_array_equal(np.isinf(g), np.isinf(r), err_msg=op)
        finite = np.isfinite(r)
        assert rel_err(g[finite], r[finite]) <= TOLERANCE[np.float64], op
