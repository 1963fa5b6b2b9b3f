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


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=[name for name in BACKENDS if name != "naive"])
def fast_backend(request):
    """The backends under test as fast kernels, the oracle aside."""
    return request.param
