"""Every backward function against central finite differences of its forward, in float64.

For L = sum(forward(...) * G) with a random G, a few random entries of each argument are perturbed by
eps and (L(+eps) - L(-eps)) / 2eps is compared with the analytic gradient there. This catches transposed
or flipped kernels that an oracle written by the same hand would share."""
import numpy as np
import pytest
from cases import case_id, conv_arrays, conv_cases, conv_kwargs, pool_cases, pool_kwargs, rel_err

import fastconv

EPS = 1e-6
LIMIT = 1e-6
SAMPLES = 6


def _numeric_grad(loss, array, positions):
    """Central differences of loss() w.r.t. array at positions; array is perturbed and restored."""
    grads = []
    for pos in positions:
        saved = array[pos]
        array[pos] = saved + EPS
        up = loss()
        array[pos] = saved - EPS
        down = loss()
        array[pos] = saved
        grads.append((up - down) / (2 * EPS))
    return np.array(grads)


def _positions(rng, shape):
    flat = rng.choice(int(np.prod(shape)), size=min(SAMPLES, int(np.prod(shape))), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def _fixed_cases():
    """The edges named in TESTING.md beside the random draws: 'same' with even and odd kernels,
    depthwise, stride above the kernel, kernel equal to the padded input, 1x1 spatial."""
    base = dict(bias=True, stride=1, padding=0, dilation=1, groups=1)
    return [
        {**base, "x_shape": (2, 3, 7, 6), "w_shape": (4, 3, 4, 2), "padding": "same"},
        {**base, "x_shape": (1, 2, 6, 7), "w_shape": (2, 2, 3, 5), "padding": "same", "dilation": (2, 1)},
        {**base, "x_shape": (2, 4, 8, 8), "w_shape": (4, 1, 3, 3), "padding": 1, "groups": 4},
        {**base, "x_shape": (1, 2, 9, 9), "w_shape": (3, 2, 2, 2), "stride": 3},
        {**base, "x_shape": (2, 2, 3, 4), "w_shape": (3, 2, 5, 6), "padding": 1},
        {**base, "x_shape": (3, 2, 1, 1), "w_shape": (2, 2, 1, 1)},
        {**base, "x_shape": (2, 4, 9, 7), "w_shape": (6, 2, 3, 2), "stride": (2, 1), "padding": (1, 2),
         "dilation": (1, 2), "groups": 2},
    ]


@pytest.mark.parametrize("case", _fixed_cases() + conv_cases(30, seed=21), ids=case_id)
def test_conv_backward_matches_finite_differences(backend, case):
    rng = np.random.default_rng(4)
    x, w, b, g = conv_arrays(case, np.float64, seed=5)
    b = rng.standard_normal(w.shape[0])
    kw = conv_kwargs(case)
    gx, gw, gb = fastconv.conv2d_backward(g, x, w, **kw, backend=backend)

    def loss():
        return float(np.sum(fastconv.conv2d(x, w, b, **kw, backend=backend) * g))

    for array, analytic in ((x, gx), (w, gw), (b, gb)):
        positions = _positions(rng, array.shape)
        numeric = _numeric_grad(loss, array, positions)
        assert rel_err(numeric, np.array([analytic[p] for p in positions])) <= LIMIT


@pytest.mark.parametrize("case", pool_cases(30, seed=22), ids=case_id)
def test_pool_backward_matches_finite_differences(backend, case):
    """Without ties (distinct values spaced far wider than eps) the max is differentiable."""
    rng = np.random.default_rng(6)
    shape = case["x_shape"]
    x = rng.permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) * 0.01
    kw = pool_kwargs(case)
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True, backend=backend)
    g = rng.standard_normal(y.shape)
    gx = fastconv.max_pool2d_backward(g, idx, shape, backend=backend)

    def loss():
        return float(np.sum(fastconv.max_pool2d(x, **kw, backend=backend) * g))

    # Half the samples where the gradient is nonzero (window maxima), half anywhere.
    winners = [np.unravel_index(i, shape) for i in np.flatnonzero(gx)[:SAMPLES // 2]]
    positions = winners + _positions(rng, shape)[:SAMPLES // 2]
    numeric = _numeric_grad(loss, x, positions)
    assert rel_err(numeric, np.array([gx[p] for p in positions])) <= LIMIT
