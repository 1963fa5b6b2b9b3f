"""im2col's own mechanics: every unit size (row bands of one image, chunks of images with a smaller
last chunk) gives the oracle's results, on both stride-1 paths (im2col and row-shifted), and the
workspace does not grow with the batch."""
import threading
import tracemalloc

import numpy as np
import pytest
from cases import (
    TOLERANCE,
    case_id,
    case_params,
    conv_arrays,
    conv_cases,
    conv_kwargs,
    pointwise_cases,
    rel_err,
    wide_conv_cases,
)

import fastconv
from fastconv import dispatch

if "im2col" not in fastconv.available_backends():
    pytest.skip("im2col is not available", allow_module_level=True)

from fastconv.backends import _im2col_units, im2col  # noqa: E402


@pytest.fixture(params=[1, 3000, 40_000], ids=["one-row-bands", "small-chunks", "image-chunks"])
def workspace_limit(request):
    before = im2col._workspace["limit"]
    im2col.set_workspace_limit(request.param)
    yield request.param
    im2col.set_workspace_limit(before)


# The shared random cases rarely run row-shifted (too few taps per kernel row): add wider ones that do.
ROW_SHIFTED = [case for case in wide_conv_cases(120, seed=32) if im2col._row_shifted_wins(case_params(case))]


def test_row_shifted_cases_are_drawn():
    assert len(ROW_SHIFTED) >= 15


# Paddings beyond the kernel's reach: a band of output rows can lie wholly in the padding.
PADDED_BEYOND_REACH = [
    dict(x_shape=(4, 5, 4, 12), w_shape=(2, 5, 2, 3), stride=(1, 1), padding=(4, 2), dilation=(2, 1), groups=1,
         bias=True),
    dict(x_shape=(2, 8, 3, 10), w_shape=(4, 8, 2, 3), stride=(1, 1), padding=(3, 1), dilation=(1, 1), groups=1,
         bias=False),  # row-shifted
]


POINTWISE = pointwise_cases(10, seed=33)


@pytest.mark.parametrize("algorithm", ["im2col:gemm", "im2col:rowshift", "im2col:pointwise"])
@pytest.mark.parametrize("case", conv_cases(40, seed=31) + ROW_SHIFTED + PADDED_BEYOND_REACH + POINTWISE, ids=case_id)
def test_every_unit_size_matches_oracle(workspace_limit, case, algorithm):
    x, w, b, gy = conv_arrays(case, np.float64)
    kw = conv_kwargs(case)
    p = case_params(case)
    ops = [("conv2d_forward", lambda name: fastconv.conv2d(x, w, b, **kw, backend=name)),
           ("conv2d_backward_input", lambda name: fastconv.conv2d_backward(
               gy, x, w, **kw, output_mask=(True, False, False), backend=name)[0]),
           ("conv2d_backward_weight", lambda name: fastconv.conv2d_backward(
               gy, x, w, **kw, output_mask=(False, True, False), backend=name)[1])]
    for op, call in ops:
        if dispatch.get_algorithm(algorithm).supports(op, p, x.dtype) is None:
            assert rel_err(call(algorithm), call("naive")) <= TOLERANCE[np.float64], op


@pytest.mark.parametrize("stride", [1, 2])
def test_forward_workspace_does_not_grow_with_batch(stride):
    """Peak memory traced beyond the output stays under the column cap plus one padded chunk per worker,
    for a batch of 32 and of 96 alike (the input alone grows by 2.2 MiB between them). The two peaks are
    not compared with each other: whether both workers' workspaces are alive at once is a matter of timing."""
    limit = 1 << 20
    before = im2col._workspace["limit"]
    im2col.set_workspace_limit(limit)
    try:
        # once first: the worker threads' and NumPy's one-time allocations are not the workspace
        fastconv.conv2d(np.ones((4, 16, 24, 24), np.float32), np.ones((16, 16, 3, 3), np.float32), padding=1,
                        stride=stride, backend="im2col")
        for batch in (32, 96):
            x, w = np.ones((batch, 16, 24, 24), np.float32), np.ones((16, 16, 3, 3), np.float32)
            tracemalloc.start()
            y = fastconv.conv2d(x, w, padding=1, stride=stride, backend="im2col")
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            padded_chunk = limit // 9  # the input rows behind one unit of columns, padded
            assert peak - y.nbytes <= limit + 2 * padded_chunk + 64 * 1024, batch
    finally:
        im2col.set_workspace_limit(before)


@pytest.mark.parametrize("x_shape, w_shape, stride", [
    ((4, 32, 12, 12), (32, 32, 1, 1), 1),  # pointwise: a plain GEMM per unit
    ((1, 64, 16, 16), (64, 64, 1, 1), 1),  # ... batch 1: bands of rows
    ((4, 16, 20, 20), (16, 16, 3, 3), 1),  # row-shifted
    ((1, 16, 20, 20), (16, 16, 3, 3), 1),  # ... batch 1
    ((4, 16, 20, 20), (16, 16, 3, 3), 2),  # im2col, strided (its input gradient folds)
])
def test_blas_never_runs_on_its_own_threads(monkeypatch, x_shape, w_shape, stride):
    """Above the serial cut, with 2 threads, every unit's GEMM runs on a worker with a single-threaded BLAS:
    OpenBLAS's own threads keep spinning after a call and would slow whatever runs next."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []

    def spy(function):
        def call(*args):
            seen.append(max(pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                            if pool["user_api"] == "blas"))
            return function(*args)
        return call

    # each unit starts with one of these, just before its GEMM
    monkeypatch.setattr(im2col, "_pointwise_matrices", spy(im2col._pointwise_matrices))
    for name in ("unfold", "unfold_kernel_row", "columns"):
        monkeypatch.setattr(_im2col_units._Unfolding, name, spy(getattr(_im2col_units._Unfolding, name)))
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    with fastconv.threads(2):
        y = fastconv.conv2d(x, w, stride=stride, padding=w_shape[2] // 2, backend="im2col")
        fastconv.conv2d_backward(y, x, w, stride=stride, padding=w_shape[2] // 2, backend="im2col")
    assert seen and max(seen) == 1, seen


# Where each algorithm's units start: a unit that fails there fails before its partial is added.
UNIT_STEPS = {"im2col:gemm": (_im2col_units._Unfolding, "unfold"),
              "im2col:rowshift": (_im2col_units._Unfolding, "unfold_kernel_row"),
              "im2col:pointwise": (im2col, "_pointwise_matrices")}


@pytest.mark.parametrize("algorithm", list(UNIT_STEPS))
def test_a_failing_unit_makes_the_call_raise_and_the_next_call_works(monkeypatch, workspace_limit, algorithm):
    """A worker that raises stops the others (none is left waiting for the partial that never comes) and
    the call raises that error; the pool is as good as new afterwards."""
    rng = np.random.default_rng(5)
    kernel = 1 if algorithm.endswith("pointwise") else 3
    x, w = rng.standard_normal((16, 16, 24, 24)), rng.standard_normal((16, 16, kernel, kernel))
    gy = rng.standard_normal((16, 16, 24 - kernel + 1, 24 - kernel + 1))
    owner, name = UNIT_STEPS[algorithm]
    real, count, lock = getattr(owner, name), [], threading.Lock()

    def failing(*args):
        with lock:
            count.append(1)
            third = len(count) == 3
        if third:
            raise MemoryError("a unit's workspace")
        return real(*args)

    def weight_gradient():
        with fastconv.threads(2):
            return fastconv.conv2d_backward(gy, x, w, output_mask=(False, True, False), backend=algorithm)[1]

    outcome = {}

    def call():
        try:
            weight_gradient()
        except MemoryError as error:
            outcome["raised"] = error

    monkeypatch.setattr(owner, name, failing)
    caller = threading.Thread(target=call)
    caller.start()
    caller.join(timeout=120)
    assert not caller.is_alive(), "the call hung"
    assert "raised" in outcome and len(count) >= 3
    monkeypatch.undo()
    ref = fastconv.conv2d_backward(gy, x, w, output_mask=(False, True, False), backend="cython:gemm")[1]
    assert rel_err(weight_gradient(), ref) <= TOLERANCE[np.float64]
