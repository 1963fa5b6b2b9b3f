"""A broad hypothesis sweep, with a fixed example budget and derandomized so CI time and results are
predictable: every backend in float32 against the oracle in float64, and against PyTorch if installed."""
import numpy as np
from cases import rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastconv
from fastconv.params import conv_params, pool_params

try:
    import torch
except ImportError:
    torch = None

SWEEP = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
small = st.integers(1, 4)
pair = st.tuples(small, small)


@st.composite
def conv_case(draw):
    groups = draw(st.integers(1, 3))
    x_shape = (draw(st.integers(1, 3)), groups * draw(small), draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    w_shape = (groups * draw(small), x_shape[1] // groups, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride, dilation = draw(pair), draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)),
                             st.sampled_from(["same", "valid"])))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    try:
        conv_params(x_shape, w_shape, stride, padding, dilation, groups)
    except ValueError:
        assume(False)
    return x_shape, w_shape, kw


@SWEEP
@given(case=conv_case(), seed=st.integers(0, 2**16))
def test_conv_sweep(backend, case, seed):
    x_shape, w_shape, kw = case
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    y = fastconv.conv2d(x, w, b, **kw, backend="naive")
    gy = rng.standard_normal(y.shape)
    refs = [y, *fastconv.conv2d_backward(gy, x, w, **kw, backend="naive")]
    f32 = [a.astype(np.float32) for a in (x, w, b, gy)]
    got = [fastconv.conv2d(*f32[:3], **kw, backend=backend),
           *fastconv.conv2d_backward(f32[3], f32[0], f32[1], **kw, backend=backend)]
    for g, r in zip(got, refs):
        assert rel_err(g, r) <= 1e-5
    if torch is not None:
        ref = torch.nn.functional.conv2d(*(torch.from_numpy(a) for a in (x, w, b)), **kw).numpy()
        assert rel_err(y, ref) <= 1e-12


@st.composite
def pool_case(draw):
    kernel = draw(pair)
    x_shape = (draw(st.integers(1, 2)), draw(small), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    kw = dict(kernel_size=kernel, stride=draw(st.one_of(st.none(), pair)),
              padding=(draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))),
              dilation=draw(st.tuples(st.integers(1, 3), st.integers(1, 3))), ceil_mode=draw(st.booleans()))
    try:
        pool_params(x_shape, *kw.values())
    except ValueError:
        assume(False)
    return x_shape, kw


@SWEEP
@given(case=pool_case(), seed=st.integers(0, 2**16))
def test_pool_sweep(backend, case, seed):
    x_shape, kw = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=x_shape).astype(np.float32)  # many ties
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True, backend=backend)
    y_ref, idx_ref = fastconv.max_pool2d(x, **kw, return_indices=True, backend="naive")
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(y, y_ref)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    assert rel_err(fastconv.max_pool2d_backward(gy, idx, x_shape, backend=backend),
                   fastconv.max_pool2d_backward(gy.astype(np.float64), idx, x_shape, backend="naive")) <= 1e-6
    if torch is not None:
        y_t, idx_t = torch.nn.functional.max_pool2d(torch.from_numpy(x), **kw, return_indices=True)
        np.testing.assert_array_equal(idx_ref, idx_t.numpy())
