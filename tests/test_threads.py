"""Calls from other Python threads: the same bits as from the main thread, and every BLAS limit as the user
left it, however calls overlap."""
import threading

import numpy as np
import pytest
from conftest import CONV_ALGORITHMS

import fastconv

threadpoolctl = pytest.importorskip("threadpoolctl")

# Above the serial cut: the parallel regions, and BLAS pinned inside them, are what is tested.
RNG = np.random.default_rng(11)
X = RNG.standard_normal((8, 32, 32, 32)).astype(np.float32)
W = RNG.standard_normal((32, 32, 3, 3)).astype(np.float32)
GY = RNG.standard_normal((8, 32, 32, 32)).astype(np.float32)


def _results(name):
    with fastconv.threads(2):
        return [fastconv.conv2d(X, W, padding=1, backend=name),
                *fastconv.conv2d_backward(GY, X, W, padding=1, output_mask=(True, True, False), backend=name)[:2]]


def _in_a_thread(function, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=function(*args)))
    thread.start()
    thread.join()
    return out["result"]


def _blas_limits():
    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.parametrize("name", [name for name in CONV_ALGORITHMS if name != "im2col:pointwise"])
def test_a_call_from_another_python_thread_gives_the_same_bits(name):
    main = _results(name)
    for got, ref in zip(_in_a_thread(_results, name), main):
        np.testing.assert_array_equal(got, ref)


def test_concurrent_calls_give_each_call_s_own_bits_and_leave_every_blas_limit_as_it_was():
    """8 Python threads calling at once, call by call the same bits as each call made alone."""
    _results("im2col:gemm")  # every BLAS loaded
    before = _blas_limits()
    refs = {name: _results(name) for name in ("im2col:gemm", "cython:gemm", "cython:direct", "numba:direct")}
    errors, start = [], threading.Barrier(8)

    def call(k):
        name = list(refs)[k % len(refs)]
        start.wait()
        for _ in range(2):
            for got, ref in zip(_results(name), refs[name]):
                if not np.array_equal(got, ref):
                    errors.append(name)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _blas_limits() == before
