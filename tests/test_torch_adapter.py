"""fastconv.torch: the PyTorch layers on fastconv's kernels, against PyTorch's own, and convert()."""
import copy
import importlib
import io

import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastconv.torch")

import fastconv  # noqa: E402


def _vgg(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2, ceil_mode=True),
        torch.nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 5, stride=2, padding=2, dilation=1, groups=2), torch.nn.Flatten(),
        torch.nn.LazyLinear(10),
    ).to(dtype)


def _pair(dtype):
    model = _vgg(dtype)
    model(torch.zeros(1, 3, 16, 16, dtype=dtype))  # the lazy layer takes its shape
    return model, ft.convert(copy.deepcopy(model))


def test_converted_layers_run_fastconv(monkeypatch):
    calls = []
    for name in ("conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward", "max_pool2d",
                 "max_pool2d_backward"):
        original = getattr(ft.api, name)
        monkeypatch.setattr(ft.api, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    _, model = _pair(torch.float32)
    model(torch.randn(2, 3, 16, 16, requires_grad=True)).sum().backward()
    assert sorted(set(calls)) == sorted(["conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
                                         "max_pool2d", "max_pool2d_backward"])
    assert calls.count("conv2d") == 3 and calls.count("max_pool2d") == 2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_same_outputs_gradients_and_twenty_sgd_steps(dtype, tolerance):
    original, converted = _pair(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4) % 10
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (original, converted)]
    for step in range(20):
        losses, outputs, grads = [], [], []
        for model, optimizer in zip((original, converted), optimizers):
            optimizer.zero_grad()
            xi = x.clone().requires_grad_()
            out = model(xi)
            loss = torch.nn.functional.cross_entropy(out, labels)
            loss.backward()
            losses.append(loss.item())
            outputs.append(out.detach())
            grads.append([xi.grad] + [p.grad for p in model.parameters()])
            optimizer.step()
        assert abs(losses[0] - losses[1]) <= tolerance * max(1.0, abs(losses[0]))
        if step == 0:
            for a, b in zip([outputs[1]] + grads[1], [outputs[0]] + grads[0]):
                assert (a - b).norm() <= tolerance * max(b.norm(), 1e-30)
    for a, b in zip(original.parameters(), converted.parameters()):
        assert (a - b).norm() <= 100 * tolerance * b.norm()


def test_convert_keeps_modules_parameters_and_state_dict_keys():
    model, _ = _pair(torch.float32)
    params, modules = list(model.parameters()), list(model.modules())
    keys = list(model.state_dict())
    assert ft.convert(model) is model
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert [id(m) for m in model.modules()] == [id(m) for m in modules]
    assert isinstance(model[0], ft.Conv2d) and isinstance(model[0], torch.nn.Conv2d)
    assert list(model.state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    plain = _vgg()
    plain(torch.zeros(1, 3, 16, 16))
    plain.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    back = io.BytesIO()
    torch.save(plain.state_dict(), back)
    model.load_state_dict(torch.load(io.BytesIO(back.getvalue())))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer, shape", [
    (lambda: ft.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1), (2, 3, 7, 6)),
    (lambda: ft.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(2, 1), groups=2), (1, 4, 8, 5)),
    (lambda: ft.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 4, 5)),
    (lambda: ft.ConvTranspose2d(3, 2, (2, 3), stride=(1, 2), dilation=(2, 1)), (1, 3, 3, 4)),
    (lambda: ft.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 6)),
    (lambda: ft.MaxPool2d(2, ceil_mode=True, dilation=1), (1, 2, 5, 7)),
])
def test_gradcheck_in_float64(layer, shape):
    module = layer().double()
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(2))
    inputs = (x, *module.parameters())

    def run(x, *parameters):
        return module(x)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7)


def test_no_grad_keeps_nothing_and_a_double_backward_raises():
    conv = ft.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    y = conv(x)
    assert type(y.grad_fn).__name__.startswith("_Conv2dFunction")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_threads_follow_pytorch_unless_fastconv_is_set(monkeypatch):
    monkeypatch.setattr(importlib.import_module("fastconv.threads"), "_chosen_by_user", False)  # as at start
    seen = []
    original = ft.api.conv2d
    monkeypatch.setattr(ft.api, "conv2d", lambda *a, **k: seen.append(fastconv.get_num_threads()) or original(*a, **k))
    conv, x = ft.Conv2d(2, 3, 3), torch.randn(1, 2, 5, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        conv(x)
        with fastconv.threads(2):
            conv(x)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_what_fastconv_cannot_serve_runs_pytorch():
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        model = ft.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")))
    assert type(model[0]) is torch.nn.Conv2d
    conv = ft.Conv2d(2, 3, 3, padding=1)
    reference = torch.nn.Conv2d(2, 3, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 2, 6, 6)
    half = x.to(torch.bfloat16)
    assert ft.why_not(conv, half) is not None
    assert torch.equal(conv.to(torch.bfloat16)(half), reference.to(torch.bfloat16)(half))
    conv.float(), reference.float()
    channels_last = x.to(memory_format=torch.channels_last)
    assert torch.allclose(conv(channels_last), reference(x), rtol=1e-5, atol=1e-6)


def test_under_torch_compile_the_layers_run_as_they_are():
    conv = ft.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)))
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    try:
        compiled = torch.compile(conv)
        out = compiled(x)
    except Exception as error:  # no compiler for inductor here: nothing of fastconv's to test
        pytest.skip(f"torch.compile does not run here: {error}")
    assert torch.equal(out, conv(x))
    out.sum().backward()
    assert x.grad is not None and conv[0].weight.grad is not None


def test_a_pooling_fastconv_refuses_runs_pytorch():
    """A window wholly in padding: PyTorch pools it to -inf, fastconv refuses it; the layer runs PyTorch."""
    pool, x = ft.MaxPool2d(2, stride=1, padding=1, dilation=3), torch.randn(1, 1, 2, 2)
    assert "only padding" in ft.why_not(pool, x)
    assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2, 1, 1, 3))


def test_an_unbatched_input_runs_pytorch():
    conv, x = ft.Conv2d(2, 3, 3), torch.randn(2, 6, 6)
    assert "3-D input" in ft.why_not(conv, x)
    assert conv(x).shape == (3, 4, 4)
