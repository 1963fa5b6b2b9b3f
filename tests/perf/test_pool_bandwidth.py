"""Max-pooling against the memory's speed: the suite's two poolings, forward with and without indices and
backward, on every pooling algorithm, with the copy bandwidth measured in the same run (2-way parallel copy
of 256 MiB; bytes read + written). extra_info: GB/s (every array read or written once, int64 indices
included where computed) and its share of the copy bandwidth.
Run: flock /tmp/fastconv-bench.lock env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:\\
glibc.malloc.trim_threshold=4294967296 pytest -m perf tests/perf/test_pool_bandwidth.py --benchmark-enable \\
--benchmark-columns=min,median,max
"""
import math
from dataclasses import replace

import numpy as np
import pytest

import fastconv
from fastconv import suite
from fastconv._measure import copy_bandwidth

pytestmark = pytest.mark.perf

POOLS = {case.name: case for case in suite.POOLS}
ALGORITHMS = [name for name in fastconv.algorithms("max_pool2d_forward") if name != "naive"]


@pytest.fixture(scope="module")
def copy_gbs():
    return copy_bandwidth(fastconv.get_num_threads())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["forward with indices", "forward without indices", "backward"])
@pytest.mark.parametrize("pool", POOLS)
def test_pool_bandwidth(benchmark, copy_gbs, pool, op, algorithm):
    case = POOLS[pool]
    p = case.params
    inputs = suite.make_inputs(case, np.float32)
    x, gy, indices = inputs["x"], inputs["gy"], inputs["indices"]
    window = dict(kernel_size=case.kernel, stride=case.stride, padding=case.padding, backend=algorithm)
    if op == "backward":
        call = lambda: fastconv.max_pool2d_backward(gy, indices, x.shape, backend=algorithm)  # noqa: E731
        moved = (math.prod(p.output_shape) * (4 + 8) + math.prod(p.input_shape) * 4)
    else:
        with_indices = op == "forward with indices"
        call = lambda: fastconv.max_pool2d(x, **window, return_indices=with_indices)  # noqa: E731
        moved = replace(p, with_indices=with_indices).bytes_moved(4)
    benchmark.group = f"max_pool2d {pool} {op}"
    benchmark.pedantic(call, rounds=20, warmup_rounds=2)
    if benchmark.stats is not None:
        rate = moved / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(gbs=round(rate, 1), copy_gbs=round(copy_gbs, 1), share=round(rate / copy_gbs, 3))
