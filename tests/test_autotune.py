"""`auto` measured: the fastest fast backend for a call's shape, timed once, remembered in memory and on
disk, forgotten when the machine or the versions change; tiny problems and FASTCONV_AUTO=fixed keep the
fixed order."""
import json

import numpy as np
import pytest
from cases import rel_err

import fastconv
from fastconv import autotune, dispatch


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measuring on, into an empty cache of this test's own; the in-memory choices forgotten around it."""
    monkeypatch.setenv("FASTCONV_AUTO", "measure")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    dispatch._choices.clear()
    autotune.forget()
    yield tmp_path
    dispatch._choices.clear()
    autotune.forget()


@pytest.fixture
def timings(monkeypatch):
    """Counts the measurements autotune makes."""
    calls = []
    real = autotune.time_calls

    def counting(calls_to_time, **kwargs):
        calls.append(sorted(calls_to_time))
        return real(calls_to_time, **kwargs)

    monkeypatch.setattr(autotune, "time_calls", counting)
    return calls


def _layer():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 16, 20, 20)).astype(np.float32), rng.standard_normal((16, 16, 3, 3)).astype(np.float32)


def test_measured_once_then_remembered_on_disk(measuring, timings):
    x, w = _layer()
    y = fastconv.conv2d(x, w, padding=1)
    assert len(timings) == 1 and "naive" not in timings[0] and len(timings[0]) >= 2
    fastconv.conv2d(x, w, padding=1)
    assert len(timings) == 1  # remembered in memory
    stored = json.loads((measuring / autotune.FILE_NAME).read_text())
    assert stored["fingerprint"] == autotune.fingerprint()
    ((key, name),) = stored["choices"].items()
    assert key.startswith("conv2d_forward|float32|threads=") and name in timings[0]
    dispatch._choices.clear()
    autotune._state["path"] = None  # as a new process: only the file remembers
    fastconv.conv2d(x, w, padding=1)
    assert len(timings) == 1
    assert rel_err(y, fastconv.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, backend="naive")) <= 1e-5


def test_each_op_and_thread_count_is_its_own_choice(measuring, timings):
    x, w = _layer()
    with fastconv.threads(1):
        y = fastconv.conv2d(x, w, padding=1)
        fastconv.conv2d_backward(y, x, w, padding=1, output_mask=(True, True, False))
    with fastconv.threads(2):
        fastconv.conv2d(x, w, padding=1)
    assert len(timings) == 4


def test_another_machine_or_version_is_ignored(measuring, timings):
    x, w = _layer()
    (measuring / autotune.FILE_NAME).write_text(json.dumps(
        {"fingerprint": dict(autotune.fingerprint(), numpy="0.0"), "choices": {}}))
    fastconv.conv2d(x, w, padding=1)
    assert len(timings) == 1
    assert json.loads((measuring / autotune.FILE_NAME).read_text())["fingerprint"]["numpy"] == np.__version__


def test_the_faster_candidate_wins():
    def trial(name):
        sum(range(200_000 if name == "slow" else 10))

    key_args = ("test_op", ("a shape",), "float32")
    autotune.forget()
    try:
        assert autotune.choose(*key_args, ["slow", "fast"], trial) == "fast"
    finally:
        autotune.forget()


def test_tiny_problems_and_fixed_mode_keep_the_fixed_order(measuring, timings, monkeypatch):
    x, w = _layer()
    fastconv.conv2d(x[:1, :2, :4, :4], w[:2, :2], padding=1)  # far below the serial cut
    assert timings == []
    monkeypatch.setenv("FASTCONV_AUTO", "fixed")
    fastconv.conv2d(x, w, padding=1)
    assert timings == []


def test_explicit_backends_are_never_measured(measuring, timings):
    x, w = _layer()
    for name in fastconv.available_backends():
        fastconv.conv2d(x, w, padding=1, backend=name)
    assert timings == []


def test_an_unwritable_cache_is_only_a_cache(measuring, timings, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(blocker / "below-a-file"))
    x, w = _layer()
    fastconv.conv2d(x, w, padding=1)
    assert len(timings) == 1
