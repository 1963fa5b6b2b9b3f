"""The public API's own cost (validation, normalization, dispatch) over a direct backend call, on the
seed's 3x3 example. A no-op backend takes the kernels out, so the API call's time is its overhead.
Run: pytest -m perf tests/perf/test_api_overhead.py"""

import numpy as np
import pytest

import fastconv
from fastconv import dispatch
from fastconv.ops import Algorithm
from fastconv.params import conv_params, pool_params

pytestmark = pytest.mark.perf

X = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
F = np.array([[[[2.0, -1.0], [3.0, 5.0]]]])
P = conv_params(X.shape, F.shape, 1, 0, 1, 1)
OUT = np.zeros(P.output_shape)
POOL = pool_params(X.shape, 2, 1, 0, 1, False)
POOL_OUT = (np.zeros(POOL.output_shape), np.zeros(POOL.output_shape, np.int64))


# The no-op backend: this module itself, with one algorithm.
def conv2d_forward(x, w, b, p):
    return OUT


def max_pool2d_forward(x, p):
    return POOL_OUT


ALGORITHMS = (Algorithm("null", {"conv2d_forward": conv2d_forward, "max_pool2d_forward": max_pool2d_forward}),)


@pytest.fixture(scope="module", autouse=True)
def null_backend():
    dispatch.register_backend("null", __name__)
    yield
    del dispatch._registry["null"]


@pytest.mark.benchmark(group="api overhead: conv2d on the seed's 3x3 example")
def test_conv2d_direct_backend_call(benchmark):
    benchmark(conv2d_forward, X, F, None, P)


@pytest.mark.benchmark(group="api overhead: conv2d on the seed's 3x3 example")
def test_conv2d_through_api(benchmark):
    benchmark(fastconv.conv2d, X, F, backend="null")


@pytest.mark.benchmark(group="api overhead: conv2d on the seed's 3x3 example")
def test_conv2d_through_api_default_backend(benchmark):
    with fastconv.use_backend("null"):
        benchmark(fastconv.conv2d, X, F)


@pytest.mark.benchmark(group="api overhead: max_pool2d on the seed's 3x3 example")
def test_max_pool2d_through_api(benchmark):
    benchmark(fastconv.max_pool2d, X, 2, 1, backend="null")
