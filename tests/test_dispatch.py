"""The registry, the pure selection function, the default-backend and thread settings."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import EXPECTED_BACKENDS

import fastconv
from fastconv import dispatch
from fastconv.ops import Algorithm


def test_expected_backends_load():
    status = fastconv.backend_status()
    for name in EXPECTED_BACKENDS:
        assert status.get(name) is None, f"backend {name!r} failed to load: {status.get(name)}"
    assert set(EXPECTED_BACKENDS) <= set(fastconv.available_backends())


def _only_3x3(op, p, dtype):
    return None if p == "3x3" else "3x3 only"


def _fake(qualified, rule=None):
    """A fake algorithm of conv2d_forward, serving what `rule` allows (everything without one)."""
    name, ops = qualified.split(":")[-1], {"conv2d_forward": None}
    return Algorithm(name, ops) if rule is None else Algorithm(name, ops, rule)


def _select(requested, p, catalogue):
    return dispatch.candidates("conv2d_forward", p, "f4", requested, catalogue, lambda b: list(catalogue[b]))


CATALOGUE = {
    "naive": {"naive": _fake("naive")},
    "im2col": {"im2col:gemm": _fake("im2col:gemm")},
    "numba": {"numba:direct": _fake("numba:direct")},
    "cython": {"cython:direct": _fake("cython:direct", _only_3x3), "cython:gemm": _fake("cython:gemm")},
}


def test_candidates_auto_follow_preference_and_leave_naive_last():
    assert _select("auto", "3x3", CATALOGUE) == ["cython:direct", "cython:gemm", "numba:direct", "im2col:gemm"]
    assert _select("auto", "5x5", CATALOGUE) == ["cython:gemm", "numba:direct", "im2col:gemm"]
    assert _select("auto", "5x5", {"naive": CATALOGUE["naive"]}) == ["naive"]
    assert _select("cython", "5x5", CATALOGUE) == ["cython:gemm"]
    assert _select("cython:direct", "3x3", CATALOGUE) == ["cython:direct"]
    assert _select("naive", "5x5", CATALOGUE) == ["naive"]


def test_candidates_refuse_with_the_reason():
    catalogue = {"cython": {"cython:direct": Algorithm("direct", {"conv2d_forward": None}, _only_3x3)}}
    with pytest.raises(fastconv.UnsupportedError, match="cython:direct cannot run conv2d_forward .*: 3x3 only"):
        _select("cython:direct", "5x5", catalogue)
    with pytest.raises(fastconv.UnsupportedError, match="no algorithm of cython .*cython:direct: 3x3 only"):
        _select("cython", "5x5", catalogue)
    with pytest.raises(fastconv.UnsupportedError, match="no algorithm of auto"):
        _select("auto", "5x5", catalogue)
    with pytest.raises(ValueError, match="unknown backend or algorithm 'numba'"):
        _select("numba", "5x5", catalogue)
    with pytest.raises(ValueError, match="unknown backend or algorithm 'cython:winograd'"):
        _select("cython:winograd", "3x3", catalogue)
    assert issubclass(fastconv.UnsupportedError, ValueError)


def test_a_backend_name_never_refuses_what_one_of_its_algorithms_serves():
    x = np.random.default_rng(0).standard_normal((1, 2, 9, 9))
    w = np.ones((3, 2, 3, 3))
    with pytest.raises(fastconv.UnsupportedError, match="stride 1, dilation 1 only"):
        fastconv.conv2d(x, w, stride=2, backend="cython:winograd")
    fastconv.conv2d(x, w, stride=2, backend="cython")
    fastconv.conv2d(x, w, stride=2, backend="auto")


def test_choice_is_explained():
    choice = fastconv.explain("conv2d_forward", (8, 16, 20, 20), (16, 16, 3, 3), padding=1)
    assert choice.how == "fixed" and choice.algorithm == choice.candidates[0]  # the tests run FASTCONV_AUTO=fixed
    assert "fixed order" in str(choice) and choice.algorithm in str(choice)
    named = fastconv.explain("conv2d_backward_weight", (8, 16, 20, 20), (16, 16, 3, 3), backend="im2col:gemm")
    assert (named.algorithm, named.how) == ("im2col:gemm", "named")
    x = np.zeros((2, 3, 8, 8), np.float64)
    pool = fastconv.explain("max_pool2d_backward", x, 2, backend="numba")
    assert pool.algorithm == "numba:pool" and pool.how == "only"
    with pytest.raises(ValueError, match="unknown op"):
        fastconv.explain("conv3d", x, x)


def test_backend_name_accepts_algorithms_as_defaults():
    with fastconv.use_backend("im2col:rowshift"):
        assert fastconv.get_backend() == "im2col:rowshift"
    with pytest.raises(ValueError, match="unknown backend or algorithm 'im2col:nope'"):
        fastconv.set_backend("im2col:nope")


def test_unavailable_backend_reports_why():
    dispatch.register_backend("_missing", "fastconv.backends._missing", requires=("no_such_package_xyz",))
    dispatch.register_backend("_broken", "fastconv.backends._no_such_module")
    try:
        status = fastconv.backend_status()
        assert status["_missing"] == "requires no_such_package_xyz, not installed"
        assert "failed to import fastconv.backends._no_such_module" in status["_broken"]
        assert "_missing" not in fastconv.available_backends()
        with pytest.raises(ValueError, match="unknown backend or algorithm '_broken'"):
            fastconv.conv2d(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 1, 1)), backend="_broken")
        assert fastconv.conv2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 1, 1))).sum() == 4  # auto unaffected
    finally:
        del dispatch._registry["_missing"], dispatch._registry["_broken"]


def test_set_and_use_backend():
    assert fastconv.get_backend() == "auto"
    with fastconv.use_backend("naive"):
        assert fastconv.get_backend() == "naive"
        with fastconv.use_backend("auto"):
            assert fastconv.get_backend() == "auto"
        assert fastconv.get_backend() == "naive"
    assert fastconv.get_backend() == "auto"
    fastconv.set_backend("naive")
    try:
        assert fastconv.get_backend() == "naive"
    finally:
        fastconv.set_backend("auto")


def test_scoped_settings_are_per_python_thread():
    seen, process_default = {}, fastconv.get_num_threads()
    inside, release = threading.Event(), threading.Event()

    def other():
        with fastconv.use_backend("naive"), fastconv.threads(1):
            inside.set()
            release.wait(5)
            seen["other"] = (fastconv.get_backend(), fastconv.get_num_threads())

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    seen["main"] = (fastconv.get_backend(), fastconv.get_num_threads())
    release.set()
    t.join()
    assert seen["other"] == ("naive", 1)
    assert seen["main"] == ("auto", process_default)


def test_threads_scope_restores():
    before = fastconv.get_num_threads()
    with fastconv.threads(1):
        assert fastconv.get_num_threads() == 1
    assert fastconv.get_num_threads() == before
    fastconv.set_num_threads(1)
    try:
        assert fastconv.get_num_threads() == 1
    finally:
        fastconv.set_num_threads(before)


def test_concurrent_calls_give_right_answers(backend):
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((2, 4, 10, 10)), rng.standard_normal((5, 4, 3, 3))
    expected = fastconv.conv2d(x, w, padding=1, backend="naive")
    results = [None] * 4

    def work(k):
        results[k] = fastconv.conv2d(x, w, padding=1, backend=backend)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-12, atol=1e-12)


def test_environment_variables_set_defaults():
    code = "import fastconv; print(fastconv.get_backend(), fastconv.get_num_threads())"
    env = {"FASTCONV_BACKEND": "naive", "FASTCONV_NUM_THREADS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["naive", "1"]


def test_import_is_light():
    """`import fastconv` imports no backend and never Numba."""
    code = "import sys, fastconv; print(any(m.startswith(('numba', 'fastconv.backends.')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_blas_limits_are_restored_after_a_call(backend):
    """Backends limit BLAS inside their own parallel regions and give the user's setting back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((8, 16, 24, 24)), rng.standard_normal((16, 16, 3, 3))  # above the serial cut

    def blas_threads():
        return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]

    fastconv.conv2d(x, w, backend=backend)  # loads whatever BLAS the backend uses
    before = blas_threads()
    fastconv.conv2d(x, w, backend=backend)
    fastconv.conv2d_backward(fastconv.conv2d(x, w, backend=backend), x, w, backend=backend)
    assert blas_threads() == before


def test_tiny_problems_run_on_one_thread():
    from fastconv.threads import SERIAL_WORK, threads_for

    with fastconv.threads(2):
        assert threads_for(SERIAL_WORK - 1) == 1
        assert threads_for(SERIAL_WORK) == 2


def test_backends_are_imported_only_when_needed():
    """A call with one backend imports that backend only; auto's fixed order stops at the first that serves."""
    code = ("import sys, numpy as np, fastconv; x = np.ones((1, 2, 6, 6)); w = np.ones((2, 2, 3, 3)); "
            "loaded = lambda: print('numba' in sys.modules, 'fastconv.backends.cython' in sys.modules); "
            "fastconv.conv2d(x, w, backend='naive'); loaded(); fastconv.conv2d(x, w); loaded()")
    env = dict(os.environ, FASTCONV_AUTO="fixed")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False", "False", "True"]


def test_explain_the_pooling_forward_without_indices():
    """explain takes return_indices: the forward without indices is a call of its own (measured apart)."""
    for return_indices in (True, False):
        choice = fastconv.explain("max_pool2d_forward", (2, 3, 8, 8), 2, return_indices=return_indices,
                                  backend="cython")
        assert choice.algorithm == "cython:pool"
