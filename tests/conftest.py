import os
import tempfile

import pytest

# `auto` keeps the fixed preference order in the tests (results do not hang on a timing), and a measured
# choice never lands in the user's cache: test_autotune.py turns measuring on where it tests it.
os.environ["FASTCONV_AUTO"] = "fixed"
os.environ["FASTCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastconv-test-cache-")

import fastconv  # noqa: E402

# Backends that must load on the project's machines: a failure to load is a test failure, not a skip.
EXPECTED_BACKENDS = ("naive", "im2col", "numba", "cython")

BACKENDS = fastconv.available_backends()
# The algorithms under test, the oracle aside: one conformance suite runs over each of them.
CONV_ALGORITHMS = [name for name in fastconv.algorithms("conv2d_forward") if name != "naive"]
POOL_ALGORITHMS = [name for name in fastconv.algorithms("max_pool2d_forward") if name != "naive"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=[name for name in BACKENDS if name != "naive"])
def fast_backend(request):
    """The backends under test as fast kernels, the oracle aside."""
    return request.param


@pytest.fixture(params=CONV_ALGORITHMS)
def conv_algorithm(request):
    return request.param


@pytest.fixture(params=POOL_ALGORITHMS)
def pool_algorithm(request):
    return request.param


# The speed comparisons' summary (tests/perf): GFLOP/s of every convolution benchmark and its share of NumPy's
# float32 2048^3 GEMM measured in the same pytest run (medians both), printed after the tests.
RATES = pytest.StashKey[list]()


@pytest.fixture
def record_rate(request):
    """record_rate(benchmark, name=..., gflop=...): keep a finished benchmark's median rate for the summary."""
    rates = request.config.stash.setdefault(RATES, [])

    def record(benchmark, name, gflop):
        if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
            median = benchmark.stats.stats.median
            rates.append({"name": name, "median_s": median, "gflops": gflop / median})

    return record


def pytest_terminal_summary(terminalreporter, config):
    rates = config.stash.get(RATES, [])
    if not rates:
        return
    reference = next((r["gflops"] for r in rates if r["name"] == "reference"), None)
    terminalreporter.section("GFLOP/s (medians), share of the NumPy float32 2048^3 GEMM of this run")
    if reference is not None:
        terminalreporter.line(f"{'NumPy GEMM 2048^3 (reference)':60s} {reference:8.1f} GFLOP/s")
    for r in rates:
        if r["name"] != "reference":
            share = f"{100 * r['gflops'] / reference:5.0f}%" if reference else ""
            terminalreporter.line(f"{r['name']:60s} {r['gflops']:8.1f} GFLOP/s {share}")
