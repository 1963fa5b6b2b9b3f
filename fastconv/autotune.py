"""The measured choice behind `auto` and backend names: the fastest algorithm for one call's shape on this
machine, raced once (_measure.race) and remembered, in memory and on disk (as FFTW keeps its wisdom).

A choice is keyed by the operation, the dtype, what was asked for ("auto" or a backend name), the thread
count (for "auto" only: a backend's choice holds for every count, so its results do not depend on it) and
the normalized params. It is stored in FASTCONV_CACHE_DIR (default: $XDG_CACHE_HOME/fastconv or
~/.cache/fastconv), in one file per fingerprint of what decides speed (the CPU and its flags, each loaded
BLAS and its kernel, the variables that force a kernel, the versions): after a change of any of them the
choices are measured again, and the old ones stay for when it changes back. A corrupt, foreign or
unwritable file is ignored with a warning. Only problems above the serial cut are measured (smaller ones
take the fixed order: timing microseconds would cost more than it could save), and never `naive`.
FASTCONV_AUTO=fixed turns measuring off.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from . import _sysinfo
from ._measure import race
from .threads import get_num_threads, is_tiny

FILE_PREFIX = "auto-choices-"
# The race of one new key: about a second of timed calls at most (warm-up calls excluded).
RACE_SECONDS = 1.0

_state = {"path": None, "choices": None, "fingerprint": None, "fingerprint_of": None, "warned": set(),
          "remeasure": None}
_lock = threading.RLock()


def measuring() -> bool:
    """Whether `auto` and backend names measure (FASTCONV_AUTO is not "fixed")."""
    return os.environ.get("FASTCONV_AUTO", "measure") != "fixed"


def worth_measuring(params) -> bool:
    """Above the serial cut (multiply-adds of a convolution, elements of a pooling)."""
    return not is_tiny(params.work)


def cache_dir() -> Path:
    root = os.environ.get("FASTCONV_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastconv"
    return Path(root)


def fingerprint() -> dict:
    """What a remembered choice depends on besides the call. Recomputed when a kernel variable changes or
    modules were imported since (one of them may have loaded another BLAS)."""
    of = (len(sys.modules), tuple(sorted(_sysinfo.kernel_variables().items())))
    if _state["fingerprint_of"] != of:
        machine = _sysinfo.describe()
        _state["fingerprint"] = {key: machine[key] for key in _sysinfo.FINGERPRINT}
        _state["fingerprint_of"] = (len(sys.modules), of[1])
    return _state["fingerprint"]


def _digest(print_):
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:16]


def cache_path() -> Path:
    """The file of this machine's fingerprint."""
    return cache_dir() / f"{FILE_PREFIX}{_digest(fingerprint())}.json"


def _warn_once(path, message):
    if (path, message) not in _state["warned"]:
        _state["warned"].add((path, message))
        warnings.warn(f"fastconv: {message} ({path}); auto measures again", RuntimeWarning, stacklevel=5)


def _read(path, print_):
    """The choices stored in `path` for fingerprint `print_` ({} if none), warning about a file that is
    corrupt or written for another fingerprint."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:
        _warn_once(path, f"cannot read the auto cache: {error}")
        return {}
    try:
        stored = json.loads(text)
        choices = stored["choices"]
        if not (isinstance(choices, dict) and all(isinstance(v, str) for v in choices.values())):
            raise ValueError("choices are not names")
    except (ValueError, KeyError, TypeError) as error:
        _warn_once(path, f"ignoring a corrupt auto cache: {error}")
        return {}
    if stored.get("fingerprint") != print_:
        _warn_once(path, "ignoring an auto cache written for another machine or other versions")
        return {}
    return dict(choices)


def remembered() -> dict:
    """The remembered choices of this machine and versions (read once per file)."""
    path = cache_path()
    if _state["path"] != path:
        _state["choices"], _state["path"] = _read(path, fingerprint()), path
    return _state["choices"]


@contextlib.contextmanager
def _file_lock(directory):
    """An exclusive lock on the cache directory between processes, where the system has one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace still leaves a valid file
        yield
        return
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save(key, name):
    """Add one choice to the file, merged with what other processes wrote since, and replaced atomically:
    two processes filling the cache at once leave a valid file holding both."""
    path, print_ = cache_path(), fingerprint()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.parent):
            choices = _read(path, print_)
            choices.update(_state["choices"])
            choices[key] = name
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
                json.dump({"fingerprint": print_, "choices": choices}, out, indent=1, sort_keys=True)
            os.replace(out.name, path)
    except OSError as error:
        _warn_once(path, f"cannot write the auto cache: {error}")


def _key(op, params, dtype, requested, candidates, per_thread_count) -> str:
    """A choice's key: the call, and the candidates it was chosen among (a choice made before an algorithm
    existed says nothing about it: a new algorithm is measured, whatever the version string says)."""
    threads = get_num_threads() if per_thread_count else "any"
    return f"{op}|{dtype}|{requested}|threads={threads}|among={','.join(sorted(candidates))}|{params!r}"


def choose(op, params, dtype, requested, candidates, trial, per_thread_count=True):
    """The fastest of `candidates` (algorithm names, in the fixed order) for this call: remembered, or raced
    now with trial(name), which runs the call with that algorithm. Returns (name, "remembered" or
    "measured", {name: its fastest call's seconds} or None)."""
    key = _key(op, params, dtype, requested, candidates, per_thread_count)
    with _lock:
        choices = remembered()
        name = choices.get(key)
        remeasure = _state["remeasure"]
        if name in candidates and (remeasure is None or key in remeasure):
            return name, "remembered", None
        timings, name = race({name: (lambda name=name: trial(name)) for name in candidates}, cap=RACE_SECONDS)
        choices[key] = name
        if remeasure is not None:
            remeasure.add(key)
        _save(key, name)
        return name, "measured", timings


@contextlib.contextmanager
def remeasuring():
    """Inside the block, every choice asked for is measured again (once), whatever was remembered."""
    with _lock:
        _state["remeasure"] = set()
    try:
        yield
    finally:
        with _lock:
            _state["remeasure"] = None


def cache_files() -> list:
    """Every choices file in the cache directory."""
    return sorted(cache_dir().glob(f"{FILE_PREFIX}*.json"))


def forget() -> None:
    """Drop every remembered choice, in memory and on disk (every fingerprint's file)."""
    with _lock:
        _state["choices"], _state["path"] = {}, cache_path()
        for path in cache_files():
            with contextlib.suppress(OSError):
                path.unlink()
