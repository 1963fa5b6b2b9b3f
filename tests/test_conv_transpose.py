"""conv_transpose2d and its gradients on every backend: the adjoint of conv2d (checked without PyTorch),
PyTorch's values and gradients where it is installed, and PyTorch's rejections as clear errors."""
import numpy as np
import pytest
from cases import TOLERANCE, rel_err

import fastconv


def _draw(rng):
    """A random valid transposed convolution: x, w, b and its keyword arguments."""
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in, c_out_group = groups * int(rng.integers(1, 4)), int(rng.integers(1, 4))
    kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
    stride = tuple(int(s) for s in rng.integers(1, 4, 2))
    dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
    kwargs = dict(stride=stride, padding=tuple(int(p) for p in rng.integers(0, 3, 2)),
                  output_padding=tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation)),
                  groups=groups, dilation=dilation)
    x = rng.standard_normal((int(rng.integers(1, 3)), c_in, int(rng.integers(1, 7)), int(rng.integers(1, 7))))
    return x, rng.standard_normal((c_in, c_out_group, *kernel)), rng.standard_normal(c_out_group * groups), kwargs


def _cases(count, seed):
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < count:
        x, w, b, kw = _draw(rng)
        try:
            fastconv.conv_transpose2d(x, w, b, **kw, backend="naive")
        except ValueError:  # an output too small for the padding
            continue
        cases.append((x, w, b, kw))
    return cases


CASES = _cases(40, seed=21)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_the_adjoint_of_conv2d(backend, index, dtype):
    """<conv_transpose2d(x, w), y> = <x, conv2d(y, w)>, and the gradients are those of that bilinear form."""
    x, w, b, kw = (a.astype(dtype) if isinstance(a, np.ndarray) else a for a in CASES[index])
    conv = {k: kw[k] for k in ("stride", "padding", "dilation", "groups")}
    y = fastconv.conv_transpose2d(x, w, None, **kw, backend=backend)
    gy = np.random.default_rng(index).standard_normal(y.shape).astype(dtype)
    down = fastconv.conv2d(gy.astype(np.float64), w.astype(np.float64), **conv, backend="naive")
    assert down.shape[2] >= x.shape[2] and down.shape[3] >= x.shape[3]
    down = down[:, :, :x.shape[2], :x.shape[3]]  # rows past the input: output_padding beyond the stride
    forward = float(np.vdot(y.astype(np.float64), gy))
    assert abs(forward - np.vdot(x, down)) <= 1e-5 * max(1.0, np.abs(y).sum() * np.abs(gy).max())
    gx, gw, gb = fastconv.conv_transpose2d_backward(gy, x, w, **kw, backend=backend)
    assert rel_err(gx, down) <= TOLERANCE[dtype]
    assert rel_err(gb, gy.sum(axis=(0, 2, 3), dtype=np.float64)) <= TOLERANCE[dtype]
    with_bias = fastconv.conv_transpose2d(x, w, b.astype(dtype), **kw, backend=backend)
    assert rel_err(with_bias - y, np.broadcast_to(b.reshape(1, -1, 1, 1), y.shape)) <= TOLERANCE[dtype]
    # the weight gradient: d<convT(x, w), gy>/dw, by the same identity with w perturbed along gw's direction
    step = 1e-3 * gw / max(np.abs(gw).max(), 1e-30)
    moved = fastconv.conv_transpose2d(x.astype(np.float64), (w + step).astype(np.float64), None, **kw,
                                      backend="naive")
    assert abs(np.vdot(moved, gy) - forward - np.vdot(gw.astype(np.float64), step)) <= \
        1e-4 * max(1.0, abs(np.vdot(gw.astype(np.float64), step)))


def test_torch_values_and_gradients(backend):
    torch = pytest.importorskip("torch")
    for x, w, b, kw in CASES:
        tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
        ty = torch.nn.functional.conv_transpose2d(tx, tw, tb, kw["stride"], kw["padding"], kw["output_padding"],
                                                  kw["groups"], kw["dilation"])
        gy = np.random.default_rng(1).standard_normal(tuple(ty.shape))
        ty.backward(torch.from_numpy(gy))
        y = fastconv.conv_transpose2d(x, w, b, **kw, backend=backend)
        got = fastconv.conv_transpose2d_backward(gy, x, w, **kw, backend=backend)
        for mine, theirs in zip((y, *got), (ty, tx.grad, tw.grad, tb.grad)):
            assert rel_err(mine, theirs.detach().numpy()) <= 1e-12, kw


@pytest.mark.parametrize("call, message", [
    (lambda x, w: fastconv.conv_transpose2d(x, w, stride=2, output_padding=2), "output_padding"),
    (lambda x, w: fastconv.conv_transpose2d(x, w[:3]), "expects 3"),
    (lambda x, w: fastconv.conv_transpose2d(x, w, padding="same"), "int or a pair"),
    (lambda x, w: fastconv.conv_transpose2d(x, w, padding=5), "too small"),
    (lambda x, w: fastconv.conv_transpose2d(x, w, groups=3), "divisible by groups=3"),
    (lambda x, w: fastconv.conv_transpose2d(x, w, np.ones(3)), "bias must have shape"),
    (lambda x, w: fastconv.conv_transpose2d(x[0], w), "4-D"),
    (lambda x, w: fastconv.conv_transpose2d_backward(np.ones((1, 2, 3, 3)), x, w), "grad_output must have"),
])
def test_what_pytorch_rejects_is_a_clear_error(call, message):
    x, w = np.ones((1, 4, 3, 3)), np.ones((4, 2, 3, 3))
    with pytest.raises(ValueError, match=message):
        call(x, w)


@pytest.mark.parametrize("kwargs, weight", [
    (dict(stride=2, output_padding=2), (4, 2, 3, 3)), (dict(padding=5), (4, 2, 3, 3)),
    (dict(groups=3), (4, 2, 3, 3)), ({}, (3, 2, 3, 3)), (dict(stride=1, dilation=2, output_padding=2), (4, 2, 3, 3)),
])
def test_fastconv_rejects_what_pytorch_rejects(kwargs, weight):
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError):
        torch.nn.functional.conv_transpose2d(torch.ones(1, 4, 3, 3), torch.ones(weight), **kwargs)
    with pytest.raises(ValueError):
        fastconv.conv_transpose2d(np.ones((1, 4, 3, 3), np.float32), np.ones(weight, np.float32), **kwargs)
