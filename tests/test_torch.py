"""PyTorch 2.13 as a second oracle (skipped where it is not installed): finite differences cannot see a
'same'-padding placement, a ceil_mode window or an index rule that both fastconv's sides got wrong."""
import cases
import numpy as np
import pytest
from cases import TOLERANCE, case_id, conv_arrays, conv_cases, conv_kwargs, pool_cases, pool_input, pool_kwargs, rel_err

import fastconv

torch = pytest.importorskip("torch")
F = torch.nn.functional

CONV_CASES = conv_cases(150, seed=12)
POOL_CASES = pool_cases(120, seed=13)


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_against_torch(backend, case, dtype):
    x, w, b, gy = conv_arrays(case, dtype)
    kw = conv_kwargs(case)
    y = fastconv.conv2d(x, w, b, **kw, backend=backend)
    x64, w64, b64, gy64 = (None if a is None else _t(a.astype(np.float64)) for a in (x, w, b, gy))
    y_ref = F.conv2d(x64, w64, b64, **kw).numpy()
    assert rel_err(y, y_ref) <= TOLERANCE[dtype]

    gx, gw, gb = fastconv.conv2d_backward(gy, x, w, **kw, backend=backend)
    p = fastconv.params.conv_params(x.shape, w.shape, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    top, bottom, left, right = p.padding
    if (top, left) != (bottom, right):
        # aten.convolution_backward takes symmetric padding only: pad the extra row/column beforehand.
        x64 = F.pad(x64, (0, right - left, 0, bottom - top))
    gx_ref, gw_ref, gb_ref = torch.ops.aten.convolution_backward(
        gy64, x64, w64, [w.shape[0]], list(p.stride), [top, left], list(p.dilation), False, [0, 0], p.groups,
        [True, True, True])
    gx_ref = gx_ref[:, :, :x.shape[2], :x.shape[3]]
    for got, ref in ((gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        assert rel_err(got, ref.numpy()) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_against_torch(backend, case, dtype):
    x = pool_input(case, dtype)
    y, idx = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=True, backend=backend)
    kw = pool_kwargs(case)
    y_ref, idx_ref = F.max_pool2d(_t(x), **kw, return_indices=True)
    np.testing.assert_array_equal(idx, idx_ref.numpy())
    np.testing.assert_array_equal(y, y_ref.numpy())
    gy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    gx = fastconv.max_pool2d_backward(gy, idx, x.shape, backend=backend)
    stride = kw["stride"] if kw["stride"] is not None else kw["kernel_size"]
    gx_ref = torch.ops.aten.max_pool2d_with_indices_backward(
        _t(gy), _t(x), kw["kernel_size"], stride, kw["padding"], kw["dilation"], kw["ceil_mode"], idx_ref)
    assert rel_err(gx, gx_ref.numpy()) <= TOLERANCE[dtype]


def _outcome(fn):
    try:
        return tuple(fn().shape)
    except (ValueError, RuntimeError):
        return "error"


def test_shapes_and_rejections_match_torch():
    """Raw draws, valid or not: the same output shape as PyTorch, or an error where PyTorch has one.
    The one rejection of fastconv's own is a pool window wholly in padding (PyTorch gives -inf there
    with an index outside the plane)."""
    rng = np.random.default_rng(15)
    for _ in range(600):
        case = cases._draw_conv(rng)
        x, w = np.zeros(case["x_shape"]), np.zeros(case["w_shape"])
        kw = conv_kwargs(case)
        assert _outcome(lambda: fastconv.conv2d(x, w, **kw)) == _outcome(lambda: F.conv2d(_t(x), _t(w), **kw)), case
        case = cases._draw_pool(rng)
        case["padding"] = tuple(int(p) for p in rng.integers(0, 3, size=2))
        x = rng.standard_normal(case["x_shape"])
        kw = pool_kwargs(case)
        ours = _outcome(lambda: fastconv.max_pool2d(x, **kw))
        theirs = _outcome(lambda: F.max_pool2d(_t(x), **kw, return_indices=True)[1])
        if ours == "error" and theirs != "error":
            idx = F.max_pool2d(_t(x), **kw, return_indices=True)[1]
            assert idx.max() >= x.shape[2] * x.shape[3], case  # wholly-padding window
        else:
            assert ours == theirs, case


def test_same_padding_even_kernel_matches_torch(backend):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3, 4, 2))
    for dilation in [1, 2, (3, 1)]:
        y = fastconv.conv2d(x, w, padding="same", dilation=dilation, backend=backend)
        ref = F.conv2d(_t(x), _t(w), padding="same", dilation=dilation).numpy()
        assert y.shape == x.shape[:1] + (4,) + x.shape[2:]
        assert rel_err(y, ref) <= 1e-12
