"""`auto` (and backend names) measured: the fastest algorithm for a call's shape, raced once, remembered in
memory and on disk per fingerprint of what decides speed; tiny problems and FASTCONV_AUTO=fixed keep the
fixed order; a bad cache is ignored with a warning."""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from cases import rel_err

import fastconv
from fastconv import _sysinfo, autotune, dispatch


def _forget_all():
    dispatch._chosen.clear()
    autotune.forget()


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measuring on, into an empty cache of this test's own; the in-memory choices forgotten around it."""
    monkeypatch.setenv("FASTCONV_AUTO", "measure")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "RACE_SECONDS", 0.05)  # the tests check what is raced, not who wins
    _forget_all()
    yield tmp_path
    _forget_all()


@pytest.fixture
def races(monkeypatch):
    """The candidates of every race autotune runs."""
    seen = []
    real = autotune.race

    def counting(calls, **kwargs):
        seen.append(sorted(calls))
        return real(calls, **kwargs)

    monkeypatch.setattr(autotune, "race", counting)
    return seen


def _layer():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((4, 16, 20, 20)).astype(np.float32),
            rng.standard_normal((16, 16, 3, 3)).astype(np.float32))


def _stored(directory):
    (path,) = directory.glob(f"{autotune.FILE_PREFIX}*.json")
    return json.loads(path.read_text())


def test_every_fast_algorithm_races_once_then_the_choice_is_remembered(measuring, races):
    x, w = _layer()
    y = fastconv.conv2d(x, w, padding=1)
    assert races == [sorted(fastconv.explain("conv2d_forward", x, w, padding=1).candidates)]
    assert "naive" not in races[0] and {"cython:direct", "cython:gemm", "numba:direct"} <= set(races[0])
    fastconv.conv2d(x, w, padding=1)
    assert len(races) == 1  # remembered in memory
    stored = _stored(measuring)
    assert stored["fingerprint"] == autotune.fingerprint()
    ((key, name),) = stored["choices"].items()
    assert key.startswith("conv2d_forward|float32|auto|threads=") and name in races[0]
    dispatch._chosen.clear()
    autotune._state["path"] = None  # as a new process: only the file remembers
    assert fastconv.explain("conv2d_forward", x, w, padding=1).how == "remembered"
    fastconv.conv2d(x, w, padding=1)
    assert len(races) == 1
    assert rel_err(y, fastconv.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, backend="naive")) <= 1e-5


def test_explain_measures_and_gives_the_timings(measuring, races):
    choice = fastconv.explain("conv2d_backward_weight", (4, 16, 20, 20), (16, 16, 3, 3), padding=1)
    assert choice.how == "measured" and choice.algorithm in choice.timings
    assert set(choice.timings) == set(choice.candidates) and "fastest calls" in str(choice)
    assert fastconv.explain("conv2d_backward_weight", (4, 16, 20, 20), (16, 16, 3, 3), padding=1).how == "remembered"


def test_auto_chooses_per_thread_count_and_a_backend_once_for_all(measuring, races):
    x, w = _layer()
    for n in (1, 2):
        with fastconv.threads(n):
            fastconv.conv2d(x, w, padding=1)
            fastconv.conv2d(x, w, padding=1, backend="cython")
    assert len(races) == 3  # auto twice, cython once: its results must not depend on the thread count
    cython = {name for name in fastconv.algorithms() if name.startswith("cython:")}
    assert all(set(r) <= cython for r in races if "numba:direct" not in r)


def test_the_faster_candidate_wins():
    def slow():
        sum(range(200_000))

    timings, winner = autotune.race({"slow": slow, "fast": lambda: sum(range(10))}, cap=0.5)
    assert winner == "fast" and timings["fast"] < timings["slow"]


def test_a_race_drops_clear_losers_early():
    calls = {"slow": 0, "fast": 0}

    def call(name, work):
        calls[name] += 1
        sum(range(work))

    autotune.race({"slow": lambda: call("slow", 300_000), "fast": lambda: call("fast", 1000)}, cap=10)
    assert calls["slow"] <= 5  # the warm-up and two rounds of two calls, not ten seconds of them


def test_no_candidate_always_follows_the_same_one():
    # A call pays for what the one before it left behind (threads spinning): an order that puts b after a in
    # almost every round would charge b for a's threads.
    from fastconv._measure import time_calls

    sequence = []
    calls = {name: (lambda name=name: sequence.append(name)) for name in "abcd"}
    autotune.race(calls, cap=10, min_rounds=3, max_rounds=40, tie=-1, margin=float("inf"), far_behind=float("inf"),
                  turn=1)
    time_calls(calls, budget=1, min_repeats=1, max_repeats=40)
    for timed in (sequence[4:164], sequence[168:]):  # the warm-up calls left out
        predecessors = {}
        for before, name in zip(timed, timed[1:]):
            predecessors.setdefault(name, set()).add(before)
        assert all(len(p - {name}) == 3 for name, p in predecessors.items()), predecessors


def test_a_failing_candidate_is_left_out():
    def broken():
        raise RuntimeError("no")

    assert autotune.race({"broken": broken, "fine": lambda: None}, cap=0.01)[1] == "fine"
    with pytest.raises(RuntimeError):
        autotune.race({"broken": broken}, cap=0.01)


def test_tiny_problems_fixed_mode_and_algorithm_names_never_measure(measuring, races, monkeypatch):
    x, w = _layer()
    fastconv.conv2d(x[:1, :2, :4, :4], w[:2, :2], padding=1)  # far below the serial cut
    for name in ("cython:direct", "cython:gemm", "numba:direct", "im2col:rowshift", "im2col:gemm"):
        fastconv.conv2d(x, w, padding=1, backend=name)
    assert races == []
    monkeypatch.setenv("FASTCONV_AUTO", "fixed")
    fastconv.conv2d(x, w, padding=1)
    fastconv.conv2d(x, w, padding=1, backend="cython")
    assert races == []
    assert fastconv.explain("conv2d_forward", x, w, padding=1).how == "fixed"


@pytest.mark.parametrize("part", ["cpu_model", "cpu_flags", "blas_libraries", "kernel_variables", "versions"])
def test_the_fingerprint_changes_with_each_thing_it_holds(monkeypatch, part):
    before = autotune.fingerprint()
    path_before = autotune.cache_path()
    real = getattr(_sysinfo, part)
    changed = {
        "cpu_model": lambda: real() + " (another)",
        "cpu_flags": lambda: real() + " avx10_2",
        "blas_libraries": lambda: [dict(lib, architecture="another kernel") for lib in real()] + [{"library": "x"}],
        "kernel_variables": lambda: dict(real(), OPENBLAS_CORETYPE="Zen"),
        "versions": lambda: dict(real(), numpy="0.0"),
    }[part]
    monkeypatch.setattr(_sysinfo, part, changed)
    autotune._state["fingerprint_of"] = None
    assert autotune.fingerprint() != before and autotune.cache_path() != path_before
    monkeypatch.undo()
    autotune._state["fingerprint_of"] = None


def test_a_blas_kernel_variable_is_seen_at_once(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    before = autotune.cache_path()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell-or-not")
    assert autotune.cache_path() != before


def test_another_fingerprint_is_measured_again_and_both_are_kept(measuring, races, monkeypatch):
    x, w = _layer()
    fastconv.conv2d(x, w, padding=1)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SomeOtherKernel")
    dispatch._chosen.clear()
    fastconv.conv2d(x, w, padding=1)
    assert len(races) == 2
    assert len(list(measuring.glob(f"{autotune.FILE_PREFIX}*.json"))) == 2


@pytest.mark.parametrize("content", ["{not json", '{"choices": [1, 2]}', '"a string"', '{"choices": {"k": 3}}'])
def test_a_corrupt_cache_is_ignored_with_a_warning(measuring, races, content):
    autotune.cache_path().write_text(content)
    x, w = _layer()
    with pytest.warns(RuntimeWarning, match="corrupt auto cache"):
        fastconv.conv2d(x, w, padding=1)
    assert len(races) == 1
    assert _stored(measuring)["fingerprint"] == autotune.fingerprint()  # replaced by a valid file


def test_a_foreign_cache_is_ignored_with_a_warning(measuring, races):
    foreign = dict(autotune.fingerprint(), cpu="a machine far away")
    autotune.cache_path().write_text(json.dumps({"fingerprint": foreign, "choices": {}}))
    x, w = _layer()
    with pytest.warns(RuntimeWarning, match="another machine"):
        fastconv.conv2d(x, w, padding=1)
    assert len(races) == 1


def test_an_unwritable_cache_is_only_a_cache(measuring, races, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(blocker / "below-a-file"))
    x, w = _layer()
    with pytest.warns(RuntimeWarning, match="cannot write the auto cache"):
        y = fastconv.conv2d(x, w, padding=1)
    assert len(races) == 1 and y.shape == (4, 16, 20, 20)


def test_two_processes_filling_the_cache_at_once_leave_a_valid_file(tmp_path):
    script = textwrap.dedent("""
        import sys, numpy as np, fastconv
        from fastconv import autotune
        autotune.RACE_SECONDS = 0.02
        rng = np.random.default_rng(int(sys.argv[1]))
        for size in range(16, 40, 2):  # a new key per size, each saved at once
            x = rng.standard_normal((2, 16, size, size)).astype(np.float32)
            fastconv.conv2d(x, rng.standard_normal((16 + int(sys.argv[1]), 16, 3, 3)).astype(np.float32), padding=1)
    """)
    env = dict(os.environ, FASTCONV_AUTO="measure", FASTCONV_CACHE_DIR=str(tmp_path))
    workers = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env) for k in (1, 2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    stored = _stored(tmp_path)
    assert len(stored["choices"]) == 24  # both processes' choices, merged


def test_tune_measures_a_scripts_calls_again_and_cache_shows_and_clears(measuring, races, tmp_path, capsys):
    from fastconv import cli

    script = tmp_path / "model.py"
    script.write_text(textwrap.dedent("""
        import numpy as np, fastconv
        x = np.random.default_rng(0).standard_normal((4, 16, 20, 20)).astype(np.float32)
        fastconv.conv2d(x, np.ones((16, 16, 3, 3), np.float32), padding=1)
    """))
    cli.main(["tune", "--script", str(script)])
    cli.main(["tune", "--script", str(script)])
    assert len(races) == 2  # measured again, though remembered
    cli.main(["cache", "show"])
    shown = capsys.readouterr().out
    assert "1 choices" in shown and "conv2d_forward|float32|auto" in shown and "(this machine, now)" in shown
    cli.main(["cache", "clear"])
    assert autotune.cache_files() == [] and "removed 1 file" in capsys.readouterr().out


def test_a_backend_name_keeps_its_bitwise_promise_while_measuring(measuring):
    """backend="cython" measures its algorithms once, for every thread count: its results stay bitwise
    identical with 1 and 2 threads whichever algorithm won."""
    rng = np.random.default_rng(4)
    x, w, gy = (rng.standard_normal(shape).astype(np.float32)
                for shape in ((4, 16, 20, 20), (16, 16, 3, 3), (4, 16, 20, 20)))
    results = []
    for n in (2, 1):
        with fastconv.threads(n):
            results.append(fastconv.conv2d_backward(gy, x, w, padding=1, output_mask=(False, True, False),
                                                    backend="cython")[1])
    np.testing.assert_array_equal(*results)


def test_a_far_slower_candidate_leaves_after_two_rounds_and_does_not_eat_the_others_time():
    calls = {"slow": 0, "a": 0, "b": 0}

    def call(name, seconds):
        calls[name] += 1
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    autotune.race({"slow": lambda: call("slow", 0.05), "a": lambda: call("a", 0.002),
                   "b": lambda: call("b", 0.0021)}, cap=0.2, tie=-1)
    assert calls["slow"] == 5  # the warm-up and two rounds of two calls
    assert calls["a"] > 20  # the cap was theirs: 0.2 s of calls of 2 ms


def test_a_turn_times_only_its_last_call():
    """The first call of a turn pays for what ran before (threads asleep): it is not what a loop sees."""
    state = {"last": None, "calls": 0}

    def call(name, seconds):
        state["calls"] += 1
        cold = state["last"] != name
        state["last"] = name
        end = time.perf_counter() + (0.02 if cold else seconds)
        while time.perf_counter() < end:
            pass

    timings, winner = autotune.race({"a": lambda: call("a", 0.001), "b": lambda: call("b", 0.002)}, cap=0.3)
    assert winner == "a" and timings["a"] < 0.005


def test_bursts_of_load_do_not_hand_the_race_to_a_slower_candidate():
    """Load from elsewhere comes in bursts and only slows calls down: a candidate whose turns met a burst in
    most rounds (its median slowed 10x) still wins on its fastest call against a steadily 2x slower one."""
    rounds = {"a": 0}

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def a():
        rounds["a"] += 1
        timed_round = rounds["a"] // 2  # call 0 warms up; a turn is two calls, the second one timed
        spin(0.001 if timed_round % 3 == 2 else 0.01)

    timings, winner = autotune.race({"a": a, "b": lambda: spin(0.002)}, cap=0.3)
    assert winner == "a" and timings["a"] < timings["b"]


def test_a_new_algorithm_is_measured_though_an_old_choice_is_remembered(measuring, races):
    """A choice made among fewer candidates (before an algorithm existed, same version string) is not
    reused: the call is measured again among all of them."""
    name, how, _ = autotune.choose("conv2d_forward", "p", "float32", "auto", ("a", "b"), lambda n: None)
    assert how == "measured"
    assert autotune.choose("conv2d_forward", "p", "float32", "auto", ("a", "b"), lambda n: None)[1] == "remembered"
    assert autotune.choose("conv2d_forward", "p", "float32", "auto", ("a", "b", "c"), lambda n: None)[1] == "measured"
