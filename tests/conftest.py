import pytest

import fastconv

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
