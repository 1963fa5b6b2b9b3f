"""The speed comparisons' summary: GFLOP/s of every convolution benchmark and its share of NumPy's float32
2048^3 GEMM measured in the same pytest run (medians both), printed after pytest-benchmark's tables."""
import pytest

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
