"""The registry, the pure selection function, the default-backend and thread settings."""
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import EXPECTED_BACKENDS

import fastconv
from fastconv import dispatch


def test_expected_backends_load():
    status = fastconv.backend_status()
    for name in EXPECTED_BACKENDS:
        assert status.get(name) is None, f"backend {name!r} failed to load: {status.get(name)}"
    assert set(EXPECTED_BACKENDS) <= set(fastconv.available_backends())


def _yes(op, p, dtype):
    return None


def _only_3x3(op, p, dtype):
    return None if p == "3x3" else "3x3 only"


def test_select_backend_auto_follows_preference():
    supports = {"naive": _yes, "im2col": _yes, "numba": _yes}
    assert dispatch.select_backend("conv2d_forward", "3x3", "f4", "auto", supports) == "numba"
    assert dispatch.select_backend("conv2d_forward", "3x3", "f4", "auto", {"naive": _yes}) == "naive"


def test_select_backend_auto_skips_what_cannot_serve():
    supports = {"naive": _yes, "im2col": _yes, "cython": _only_3x3}
    assert dispatch.select_backend("conv2d_forward", "3x3", "f4", "auto", supports) == "cython"
    assert dispatch.select_backend("conv2d_forward", "5x5", "f4", "auto", supports) == "im2col"


def test_select_backend_explicit_name():
    supports = {"naive": _yes, "cython": _only_3x3}
    assert dispatch.select_backend("conv2d_forward", "5x5", "f4", "naive", supports) == "naive"
    with pytest.raises(ValueError, match="backend 'cython' cannot run conv2d_forward here: 3x3 only"):
        dispatch.select_backend("conv2d_forward", "5x5", "f4", "cython", supports)
    with pytest.raises(ValueError, match="unknown backend 'numba'; available: auto, naive, cython"):
        dispatch.select_backend("conv2d_forward", "5x5", "f4", "numba", supports)


def test_select_backend_auto_fails_only_when_nothing_serves():
    with pytest.raises(ValueError, match="no available backend supports"):
        dispatch.select_backend("conv2d_forward", "5x5", "f4", "auto", {"cython": _only_3x3})


def test_unavailable_backend_reports_why():
    dispatch.register_backend("_missing", "fastconv.backends._missing", requires=("no_such_package_xyz",))
    dispatch.register_backend("_broken", "fastconv.backends._no_such_module")
    try:
        status = fastconv.backend_status()
        assert status["_missing"] == "requires no_such_package_xyz, not installed"
        assert "failed to import fastconv.backends._no_such_module" in status["_broken"]
        assert "_missing" not in fastconv.available_backends()
        with pytest.raises(ValueError, match="unknown backend '_broken'"):
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
