"""Side-by-side speed of auto, every available algorithm and PyTorch (when installed) on the benchmark suite
(fastconv.suite), float32, with the same thread count on every side. Run, with freed buffers reused:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \\
    pytest -m perf tests/perf/test_compare.py --benchmark-enable --benchmark-group-by=param:shape

(OpenBLAS then runs its own kernel choice; `fastconv info` says which.)

(-k "reference or (forward and 3x3)" and the like pick a part; the GEMM reference, when selected, runs
first.) A summary at the end gives each convolution's GFLOP/s and its share of NumPy's float32 2048^3 GEMM
measured in the same run. `fastconv report` measures the same cases with the sides taking turns, ceilings and
errors; this is the quick look from pytest."""
import functools
import importlib.util
import time

import numpy as np
import pytest

import fastconv
from fastconv import suite
from fastconv._measure import gemm_call

pytestmark = pytest.mark.perf

SIDES = ["auto", *fastconv.algorithms()] + (["torch"] if importlib.util.find_spec("torch") else [])
CASES = [(case.name, op) for case in suite.CONVS + suite.POOLS for op in case.ops]


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """PyTorch on fastconv's thread count, restored afterwards."""
    if "torch" not in SIDES:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(fastconv.get_num_threads())
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=2)  # cases run in order: keep the current one's arrays, not the whole suite's
def inputs(shape):
    return suite.make_inputs(suite.by_name(shape), np.float32)


def test_gemm_reference(benchmark, record_rate):
    """NumPy's float32 2048^3 matmul on fastconv's thread count: the rate the convolutions are shared of."""
    call = gemm_call(fastconv.get_num_threads())
    benchmark.group = "reference: NumPy float32 matmul 2048^3"
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    record_rate(benchmark, "reference", call.flops / 1e9)
    time.sleep(0.3)  # OpenBLAS's threads spin ~0.1 s after a call: not into the next benchmark


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape, op", CASES)
def test_compare(benchmark, record_rate, shape, op, side):
    case = suite.by_name(shape)
    if not suite.implements(side, op):
        pytest.skip(f"{side} does not implement {op}")
    reason = suite.why_not(side, case, op, np.float32)
    if reason is not None:
        pytest.skip(reason)
    if side == "torch":
        call = suite.torch_call(case, op, inputs(shape))
    else:
        call = suite.fastconv_call(case, op, inputs(shape), side)
    benchmark.group = f"{shape} {op}"  # the default grouping; --benchmark-group-by=param:shape overrides it
    benchmark.extra_info["gflops"] = case.flops / 1e9 if isinstance(case, suite.Conv) else None
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)  # warm-up: JIT compilation, caches
    if isinstance(case, suite.Conv):
        record_rate(benchmark, f"{shape} {op} {side}", case.flops / 1e9)
