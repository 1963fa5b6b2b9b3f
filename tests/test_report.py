"""`fastconv report`'s machinery on a tiny suite: auto, every available algorithm (and PyTorch) measured,
the folder written with its tables, plots and raw numbers. No timing is asserted."""
import json

import numpy as np
import pytest

import fastconv
from fastconv import _measure, _sysinfo, autotune, cli, suite
from fastconv.ops import CONV_OPS, POOL_OPS
from fastconv.report import measure, render, stats

TINY_CONVS = (suite.Conv((2, 3, 8, 8), 4, 3, padding=1), suite.Conv((3, 2, 9, 7), 5, 2, stride=2))
TINY_POOLS = (suite.Pool((2, 3, 8, 8), 2, 2), suite.Pool((1, 2, 9, 9), 3, 2, padding=1))


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("tqdm")  # installed by the test extra; the report's progress bar
    pytest.importorskip("matplotlib")
    with pytest.MonkeyPatch.context() as patch:  # the ceilings' full-size runs take seconds: tested below
        patch.setattr(measure, "gemm_rate", lambda threads, budget: 100.0)
        patch.setattr(measure, "copy_bandwidth", lambda threads, budget: 10.0)
        return measure.collect(TINY_CONVS, TINY_POOLS, threads=1, budget=0.001, min_repeats=1, progress=False,
                              gemm_size=64)


def test_ceilings_and_timer():
    assert _measure.gemm_rate(1, size=64, budget=0.001) > 0
    assert _measure.copy_bandwidth(2, megabytes=1, budget=0.001) > 0
    timing, result = _measure.time_call(lambda: 7, budget=0.001, min_repeats=3)
    assert result == 7 and timing.repeats >= 3 and 0 <= timing.best <= timing.median


def test_every_side_measures_every_case(results):
    sides = ["auto", *fastconv.algorithms()]
    assert results["sides"][:len(sides)] == sides
    for case in TINY_CONVS + TINY_POOLS:
        for op in case.ops:
            for side in results["sides"]:
                found = [r for r in results["rows"] if (r["case"], r["op"], r["backend"]) == (case.name, op, side)]
                if side not in ("auto", "torch") and side not in fastconv.algorithms(op):
                    assert found == []  # an algorithm without the op has no row
                    continue
                (row,) = found
                if side == "auto":
                    assert row["chose"] in fastconv.algorithms(op)
                if side == "naive" and not case.naive_feasible():
                    assert row["status"] == "skipped"
                    continue
                assert row["status"] in ("ok", "skipped"), row
                if row["status"] == "ok":
                    assert row["median_s"] > 0 and row["repeats"] >= 1
                    if row["kind"] == "conv":  # the GEMM reference measured in the same turns
                        assert row["gemm_gflops"] > 0
                    assert row["error"] <= 1e-5, row
                    assert row.get("indices_equal", True), row


def test_report_folder(results, tmp_path):
    path = render.write(results, tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text()
    assert page.count("data:image/png;base64,") == len(CONV_OPS + POOL_OPS) + 1  # + roofline
    assert "Geometric means" in page and "Machine" in page
    assert "auto against the fastest algorithm" in page and "auto (chose)" in page
    markdown = (tmp_path / "report.md").read_text()
    for name in [f"{op}.png" for op in CONV_OPS + POOL_OPS] + ["roofline.png"]:
        assert f"]({name})" in markdown
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    assert "|" in render.summary(results) and "auto against the fastest algorithm" in render.summary(results)


def test_the_full_suite_runs_every_convolution_in_float64_on_auto_and_pytorch():
    float64 = [(case, ops, sides) for case, dtype, ops, sides in measure._runs(list(suite.CONVS), list(suite.POOLS))
               if dtype == np.float64]
    measured = [(case, op) for case, ops, _ in float64 for op in ops]
    assert sorted(measured, key=str) == sorted(((case, op) for case in suite.CONVS for op in CONV_OPS), key=str)
    for case, ops, sides in float64:
        assert sides == (None if (case, ops) == (suite.FLOAT64_CASE, ("conv2d_forward",)) else ("auto", "torch"))
    quick = [run for run in measure._runs(list(suite.QUICK_CONVS), list(suite.QUICK_POOLS)) if run[1] == np.float64]
    assert quick == [(suite.FLOAT64_CASE, np.float64, ("conv2d_forward",), None)]


def test_float64_rows_get_their_section_and_speedups(results, tmp_path):
    auto = [dict(r, dtype="float64")
            for r in results["rows"] if r["kind"] == "conv" and r["backend"] == "auto" and r["status"] == "ok"]
    rows = auto + [{**{k: v for k, v in r.items() if k != "chose"}, "backend": "torch", "median_s": 3 * r["median_s"]}
                   for r in auto]  # PyTorch 3x slower on every case
    # PyTorch is a side of these results even where it is not installed (results["sides"] then lacks it)
    sides = results["sides"] if "torch" in results["sides"] else [*results["sides"], "torch"]
    with_torch = dict(results, rows=results["rows"] + rows, sides=sides)
    found = stats.float64_against_torch(with_torch)
    assert set(found) == set(CONV_OPS)
    for speedup in found.values():
        assert speedup["geomean"] == pytest.approx(3) and speedup["cases"] == len(TINY_CONVS)
    page = render.write(with_torch, tmp_path).read_text()
    assert "conv2d forward, float64" in page and "3.00x over 2 cases" in page


def test_training_steps_of_pytorch_models(results, tmp_path):
    pytest.importorskip("torch")
    from fastconv.report import training

    assert {(r["model"], r["dtype"]) for r in results["training"]} == {
        (model, dtype) for model in training.MODELS for dtype in ("float32", "float64")}
    assert all(r["torch_s"] > 0 and r["fastconv_s"] > 0 and r["batch"] == training.BATCH for r in results["training"])
    render.write(results, tmp_path)
    assert "## PyTorch models: training steps" in (tmp_path / "report.md").read_text()


def test_transposed_convolutions(results, tmp_path):
    assert {(r["case"], r["op"]) for r in results["transposed"]} == {
        (case, op) for case in suite.TRANSPOSED for op in ("forward", "grad input", "grad weight")}
    assert {"auto", "cython"} <= {r["side"] for r in results["transposed"]}
    render.write(results, tmp_path)
    assert "## conv_transpose2d" in (tmp_path / "report.md").read_text()


def test_auto_against_the_fastest_algorithm(results):
    closeness = stats.auto_against_best(results)
    pairs = sum(len(case.ops) for case in TINY_CONVS + TINY_POOLS)
    assert closeness["pairs"] == pairs
    for way in ("measured", "choice"):
        assert 0 < closeness[way]["worst"]["ratio"] <= closeness[way]["geomean"] + 1e-12
    assert closeness["choice"]["geomean"] <= 1 + 1e-12  # no algorithm is faster than the fastest
    headers, table = render._algorithm_table(results, "conv2d_forward")
    assert "cython:direct" in headers and "fastest" in headers and len(table) == len(TINY_CONVS)


def test_reference_inputs_match_every_pooling_algorithm():
    case = TINY_POOLS[1]
    inputs = suite.make_inputs(case, np.float64)
    for backend in fastconv.algorithms("max_pool2d_forward"):
        _, indices = suite.fastconv_call(case, "max_pool2d_forward", inputs, backend)()
        assert np.array_equal(indices, inputs["indices"]), backend


def test_restarts_itself_with_reused_buffers_and_sleeping_blas_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    cli.restart_for_measuring(["report", "--quick"])
    (executable, argv, env), = calls
    assert argv[1:] == ["-m", "fastconv", "report", "--quick"]
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + measure.REUSED_BUFFERS
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert "OPENBLAS_CORETYPE" not in env  # OpenBLAS's own kernel, unless kept
    cli.restart_for_measuring(["report", "--keep-blas-kernel"], keep_blas_kernel=True)
    assert calls[-1][2]["OPENBLAS_CORETYPE"] == "Haswell"
    calls.pop()
    monkeypatch.delenv("OPENBLAS_CORETYPE")

    monkeypatch.setenv("GLIBC_TUNABLES", measure.REUSED_BUFFERS)
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "6")  # the user's own setting is kept
    cli.restart_for_measuring(["report"])
    assert len(calls) == 1  # already set: no restart

    monkeypatch.delenv("GLIBC_TUNABLES")
    cli.restart_for_measuring(["report", "--default-allocator"], reuse_buffers=False)
    assert len(calls) == 1


def test_thread_scaling_rows_and_table(results):
    """The batch-1 thread comparison: every fast side measured with 1 and 2 threads, in bursts, and shown."""
    case = TINY_CONVS[0]
    rows = measure.thread_scaling(case, results["sides"], threads=2, budget=0.001, min_repeats=1)
    sides = [side for side in results["sides"] if side not in ("naive", "torch") and suite.implements(
        side, "conv2d_forward") and suite.why_not(side, case, "conv2d_forward", np.float32) is None]
    assert "im2col:pointwise" not in sides and "cython:direct" in sides
    assert {(r["backend"], r["threads"]) for r in rows} >= {(side, n) for side in sides for n in (1, 2)}
    assert all(r["status"] == "ok" and r["gflops"] > 0 for r in rows), rows
    shown = render._markdown(render._blocks(dict(results, scaling=rows), {}))
    assert "## Threads at batch 1" in shown and all(f"| {side} |" in shown for side in sides)


def test_share_of_gemm_is_against_the_reference_in_the_same_turns(results):
    """% of GEMM divides by the GEMM measured in the row's own turns, not by the ceiling."""
    op = "conv2d_forward"
    changed = dict(results, rows=[dict(r, gemm_gflops=r["gflops"] * 4) if r.get("gflops") else r
                                  for r in results["rows"]])
    headers, table = render._op_table(changed, op, "float32")
    shares = [line[headers.index("% of GEMM")] for line in table if line[headers.index("% of GEMM")]]
    assert shares and set(shares) == {"25%"}


def test_a_report_renders_again_from_its_results_alone(results, tmp_path, monkeypatch):
    """`fastconv report --from results.json` writes the same report, and rendering times nothing."""
    render.write(results, tmp_path / "measured")

    def no_timing(*args, **kwargs):
        raise AssertionError("the renderer timed something")

    for module, name in ((_measure, "time_calls"), (_measure, "race"), (measure, "time_calls"),
                         (measure, "gemm_rate"), (measure, "copy_bandwidth")):
        monkeypatch.setattr(module, name, no_timing)
    cli.main(["report", "--from", str(tmp_path / "measured" / "results.json"), "--out", str(tmp_path / "again")])
    for name in ["report.md", "report.html", "results.json", "roofline.png"]:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "measured" / name).read_bytes(), name


def test_info_report_and_fingerprint_describe_the_machine_with_one_function(monkeypatch, capsys):
    real = _sysinfo.describe()
    monkeypatch.setattr(_sysinfo, "describe", lambda: dict(real, cpu="A CPU described once"))
    autotune._state["fingerprint_of"] = None
    try:
        cli.main(["info"])
        assert "A CPU described once" in capsys.readouterr().out
        assert measure.machine(1)["cpu"] == "A CPU described once"
        assert autotune.fingerprint()["cpu"] == "A CPU described once"
    finally:
        autotune._state["fingerprint_of"] = None
