"""The seed note's worked example, term by term: a 3x3 input X, a 2x2 filter F, output O, and the
expanded sums of dL/dF and dL/dX."""
import numpy as np
import pytest

import fastconv

# Distinct integers, so every product and sum is exact in float32 and float64 alike.
X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
F = np.array([[2.0, -1.0], [3.0, 5.0]])
G = np.array([[1.0, -2.0], [4.0, 3.0]])  # dL/dO


def _x(r, c):  # the seed's 1-based names, X11 .. X33
    return X[r - 1, c - 1]


def _f(r, c):
    return F[r - 1, c - 1]


def _g(r, c):
    return G[r - 1, c - 1]


@pytest.fixture(params=[np.float32, np.float64])
def dtype(request):
    return request.param


def test_forward_matches_seed(backend, dtype):
    out = fastconv.conv2d(X[None, None].astype(dtype), F[None, None].astype(dtype), backend=backend)
    expected = np.array([
        [_x(1, 1) * _f(1, 1) + _x(1, 2) * _f(1, 2) + _x(2, 1) * _f(2, 1) + _x(2, 2) * _f(2, 2),   # O11
         _x(1, 2) * _f(1, 1) + _x(1, 3) * _f(1, 2) + _x(2, 2) * _f(2, 1) + _x(2, 3) * _f(2, 2)],  # O12
        [_x(2, 1) * _f(1, 1) + _x(2, 2) * _f(1, 2) + _x(3, 1) * _f(2, 1) + _x(3, 2) * _f(2, 2),   # O21
         _x(2, 2) * _f(1, 1) + _x(2, 3) * _f(1, 2) + _x(3, 2) * _f(2, 1) + _x(3, 3) * _f(2, 2)],  # O22
    ])
    assert out.dtype == dtype and out.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(out[0, 0], expected)


def test_backward_matches_seed(backend, dtype):
    gx, gw, gb = fastconv.conv2d_backward(G[None, None].astype(dtype), X[None, None].astype(dtype),
                                          F[None, None].astype(dtype), backend=backend)
    dl_df = np.array([
        [_g(1, 1) * _x(1, 1) + _g(1, 2) * _x(1, 2) + _g(2, 1) * _x(2, 1) + _g(2, 2) * _x(2, 2),   # dL/dF11
         _g(1, 1) * _x(1, 2) + _g(1, 2) * _x(1, 3) + _g(2, 1) * _x(2, 2) + _g(2, 2) * _x(2, 3)],  # dL/dF12
        [_g(1, 1) * _x(2, 1) + _g(1, 2) * _x(2, 2) + _g(2, 1) * _x(3, 1) + _g(2, 2) * _x(3, 2),   # dL/dF21
         _g(1, 1) * _x(2, 2) + _g(1, 2) * _x(2, 3) + _g(2, 1) * _x(3, 2) + _g(2, 2) * _x(3, 3)],  # dL/dF22
    ])
    dl_dx = np.array([
        [_g(1, 1) * _f(1, 1),                                              # dL/dX11
         _g(1, 1) * _f(1, 2) + _g(1, 2) * _f(1, 1),                        # dL/dX12
         _g(1, 2) * _f(1, 2)],                                             # dL/dX13
        [_g(1, 1) * _f(2, 1) + _g(2, 1) * _f(1, 1),                        # dL/dX21
         _g(1, 1) * _f(2, 2) + _g(1, 2) * _f(2, 1) + _g(2, 1) * _f(1, 2) + _g(2, 2) * _f(1, 1),  # dL/dX22
         _g(1, 2) * _f(2, 2) + _g(2, 2) * _f(1, 2)],                       # dL/dX23
        [_g(2, 1) * _f(2, 1),                                              # dL/dX31
         _g(2, 1) * _f(2, 2) + _g(2, 2) * _f(2, 1),                        # dL/dX32
         _g(2, 2) * _f(2, 2)],                                             # dL/dX33
    ])
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    np.testing.assert_array_equal(gw[0, 0], dl_df)
    np.testing.assert_array_equal(gx[0, 0], dl_dx)
    np.testing.assert_array_equal(gb, [G.sum()])


@pytest.mark.parametrize("stride, size", [(1, 5), (2, 3)])
def test_seed_output_size_7x7(backend, stride, size):
    """The seed: a 7x7 image and a 3x3 filter give 5x5 at stride 1 and 3x3 at stride 2, O = 1 + (N - F)/S."""
    rng = np.random.default_rng(7)
    x, f = rng.standard_normal((1, 1, 7, 7)), rng.standard_normal((1, 1, 3, 3))
    out = fastconv.conv2d(x, f, stride=stride, backend=backend)
    assert out.shape == (1, 1, size, size)
    for i in range(size):
        for j in range(size):
            window = x[0, 0, i * stride:i * stride + 3, j * stride:j * stride + 3]
            assert out[0, 0, i, j] == pytest.approx(np.sum(window * f[0, 0]), rel=1e-12)


def test_seed_padding_keeps_size(backend):
    """The seed: O = 1 + (N - F + 2P)/S, so a 3x3 filter with P = 1 keeps a 7x7 image 7x7."""
    x, f = np.ones((1, 1, 7, 7)), np.ones((1, 1, 3, 3))
    out = fastconv.conv2d(x, f, padding=1, backend=backend)[0, 0]
    assert out.shape == (7, 7)
    assert out[0, 0] == 4 and out[0, 3] == 6 and out[3, 3] == 9  # zeros padded at the corner and edge
