"""numba-specific checks: results independent of the thread count, calls from several Python threads,
float32 accuracy of long sums, and lazy loading (import fastconv never imports Numba)."""
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cases import rel_err

import fastconv

pytestmark = pytest.mark.skipif("numba" not in fastconv.available_backends(), reason="numba backend unavailable")

# Batch 1 and 2 (split inside an image), groups, stride, dilation, uneven padding, a tiny (serial) case.
CASES = [
    dict(x=(1, 16, 30, 30), w=(24, 16, 3, 3), kw=dict(padding=1)),
    dict(x=(5, 12, 17, 19), w=(18, 4, 3, 2), kw=dict(stride=2, padding=(1, 2), dilation=(2, 1), groups=3)),
    dict(x=(2, 8, 40, 40), w=(8, 8, 4, 4), kw=dict(padding="same")),
    dict(x=(9, 8, 20, 20), w=(12, 8, 1, 1), kw=dict()),
    dict(x=(1, 2, 5, 5), w=(3, 2, 2, 2), kw=dict(stride=3)),
]


def _all_outputs(case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["x"]).astype(np.float32)
    w = rng.standard_normal(case["w"]).astype(np.float32)
    b = rng.standard_normal(case["w"][0]).astype(np.float32)
    y = fastconv.conv2d(x, w, b, **case["kw"], backend="numba")
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx, gw, _ = fastconv.conv2d_backward(gy, x, w, **case["kw"], backend="numba")
    pooled, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, backend="numba")
    gp = fastconv.max_pool2d_backward(rng.standard_normal(pooled.shape).astype(np.float32), idx, x.shape,
                                      backend="numba")
    return [y, gx, gw, pooled, idx, gp]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['x']}-{c['w']}")
def test_bitwise_equal_with_one_and_two_threads(case):
    with fastconv.threads(1):
        one = _all_outputs(case)
    with fastconv.threads(2):
        two = _all_outputs(case)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_concurrent_calls_from_python_threads():
    expected = {i: _all_outputs(case, seed=i) for i, case in enumerate(CASES)}
    failures = []

    def run(i):
        try:
            for _ in range(3):
                for a, b in zip(_all_outputs(CASES[i], seed=i), expected[i]):
                    np.testing.assert_array_equal(a, b)
        except Exception as error:  # reported to the main thread below
            failures.append(error)

    workers = [threading.Thread(target=run, args=(i % len(CASES),)) for i in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures, failures


def test_float32_weight_gradient_of_a_large_layer():
    """64x64x32x32 -> 64, 3x3, pad 1: each weight gradient sums 65,536 terms."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64, 32, 32)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((64, 64, 32, 32)).astype(np.float32)
    _, gw, _ = fastconv.conv2d_backward(gy, x, w, padding=1, output_mask=(False, True, False), backend="numba")
    _, gw64, _ = fastconv.conv2d_backward(gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                          padding=1, output_mask=(False, True, False), backend="numba")
    assert rel_err(gw, gw64) <= 1e-5


def test_non_finite_values_stay_where_they_belong():
    """Padded taps add exact zeros: an inf in the input only reaches the outputs whose window holds it."""
    x = np.ones((1, 3, 6, 6), np.float32)
    x[0, 1, 0, 0] = np.inf
    w = np.ones((2, 3, 3, 3), np.float32)
    y = fastconv.conv2d(x, w, padding=1, backend="numba")
    ref = fastconv.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, backend="naive")
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    assert not np.isnan(y).any()


def test_import_fastconv_does_not_import_numba():
    code = "import sys, fastconv; fastconv.conv2d; assert 'numba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_backend_compiles_nothing():
    code = ("import fastconv.backends._numba_kernels as k, fastconv.backends.numba as nb; "
            "assert nb.describe().startswith('numba'); "
            "assert all(not f.signatures for f in (k.correlate, k.build_source, k.weight_partials, "
            "k.max_pool_forward, k.max_pool_backward))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_weight_gradient_with_an_inf_matches_the_oracle_elsewhere():
    """A non-finite input takes the exact (real columns only) weight-gradient path: the finite entries still
    match, and the inf reaches only the weights whose sums include it."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((3, 4, 9, 11)), rng.standard_normal((6, 4, 3, 3))
    x[1, 2, 8, 10] = np.inf
    gy = rng.standard_normal((3, 6, 9, 11))
    mask = (False, True, False)
    _, gw, _ = fastconv.conv2d_backward(gy, x, w, padding=1, output_mask=mask, backend="numba")
    _, ref, _ = fastconv.conv2d_backward(gy, x, w, padding=1, output_mask=mask, backend="naive")
    np.testing.assert_array_equal(np.isfinite(gw), np.isfinite(ref))
    finite = np.isfinite(ref)
    assert rel_err(gw[finite], ref[finite]) <= 1e-12


def test_the_kernel_cache_follows_every_file_the_kernels_compile_from(tmp_path):
    """Numba's own cache watches only the file defining a kernel: an edit of _simd.py must not leave stale
    machine code in use, so the cache folder is named by a digest of every kernel source."""
    from fastconv.backends import _numba_kernels
    from fastconv.backends import numba as backend

    here = Path(backend.__file__).parent
    for name in backend.KERNEL_SOURCES:
        shutil.copy(here / name, tmp_path / name)
    assert backend.kernel_cache_dir(tmp_path) == backend.kernel_cache_dir()
    (tmp_path / "_simd.py").write_text((here / "_simd.py").read_text() + "\n# an edit\n")
    assert backend.kernel_cache_dir(tmp_path) != backend.kernel_cache_dir()
    assert _numba_kernels.correlate._cache._cache_path.startswith(str(backend.kernel_cache_dir()))
