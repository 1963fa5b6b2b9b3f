"""fastconv.nn and `fastconv train`: the whole digits network against finite differences in float64 (and
PyTorch where installed), each layer on its own, SGD as the seed note and torch.optim.SGD state it, and a
short training run that must lower the loss."""
import numpy as np
import pytest
from cases import rel_err

import fastconv
from fastconv import cli, nn, train

EPS = 1e-6


def _batch(rng, dtype, n=4):
    return rng.random((n, 1, 8, 8)).astype(dtype), rng.integers(0, 10, n)


def _loss_and_grads(model, x, y):
    """The network's loss, and its analytic gradients: w.r.t. every parameter, then w.r.t. the input."""
    loss_fn = nn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(x), y)
    grad_input = model.backward(loss_fn.backward(), input_grad=True)
    return loss, [grad.copy() for _, grad in model.params()] + [grad_input]


def test_whole_network_gradients_match_finite_differences(backend):
    rng = np.random.default_rng(0)
    model = train.digits_cnn(np.random.default_rng(1), dtype=np.float64, backend=backend)
    for param, _ in model.params():  # nonzero biases, so a bias gradient bug cannot hide behind zeros
        param += 0.1 * rng.standard_normal(param.shape)
    x, y = _batch(rng, np.float64)
    _, analytic = _loss_and_grads(model, x, y)
    loss_fn = nn.SoftmaxCrossEntropy()
    for array, grad in zip([param for param, _ in model.params()] + [x], analytic):
        positions = [np.unravel_index(i, array.shape) for i in rng.choice(array.size, min(8, array.size), False)]
        numeric = []
        for pos in positions:
            saved = array[pos]
            array[pos] = saved + EPS
            up = loss_fn.forward(model.forward(x), y)
            array[pos] = saved - EPS
            down = loss_fn.forward(model.forward(x), y)
            array[pos] = saved
            numeric.append((up - down) / (2 * EPS))
        assert rel_err([grad[pos] for pos in positions], numeric) <= 1e-6, array.shape


def test_whole_network_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    model = train.digits_cnn(np.random.default_rng(3), dtype=np.float64)
    x, y = _batch(rng, np.float64, n=5)
    loss, grads = _loss_and_grads(model, x, y)

    weights = [torch.tensor(param, requires_grad=True) for param, _ in model.params()]
    tx = torch.tensor(x, requires_grad=True)
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(tx, weights[0], weights[1], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, weights[2], weights[3], padding=1)), 2)
    t_loss = F.cross_entropy(F.linear(h.flatten(1), weights[4], weights[5]), torch.tensor(y))
    t_loss.backward()
    assert abs(loss - t_loss.item()) <= 1e-12 * abs(loss)
    for got, ref in zip(grads, [w.grad.numpy() for w in weights] + [tx.grad.numpy()]):
        assert rel_err(got, ref) <= 1e-12


def test_layers_default_to_float32_and_he_init():
    rng = np.random.default_rng(4)
    conv, linear = nn.Conv2d(16, 32, 3, rng=rng), nn.Linear(128, 10, rng=rng)
    for layer, fan_in in ((conv, 16 * 9), (linear, 128)):
        assert layer.weight.dtype == layer.bias.dtype == np.float32
        assert not layer.bias.any()
        assert abs(layer.weight.std() / np.sqrt(2 / fan_in) - 1) < 0.1
    assert [param.shape for param, _ in conv.params()] == [(32, 16, 3, 3), (32,)]
    assert all(grad.shape == param.shape for param, grad in conv.params() + linear.params())


def test_conv2d_layer_uses_the_api_and_skips_input_gradient_on_request():
    rng = np.random.default_rng(5)
    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, rng=rng, backend="naive")
    conv.bias[:] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    y = conv.forward(x)
    np.testing.assert_array_equal(y, fastconv.conv2d(x, conv.weight, conv.bias, 2, 1, backend="naive"))
    g = rng.standard_normal(y.shape).astype(np.float32)
    assert conv.backward(g, input_grad=False) is None
    _, gw, gb = fastconv.conv2d_backward(g, x, conv.weight, 2, 1, backend="naive")
    np.testing.assert_array_equal(conv.weight_grad, gw)
    np.testing.assert_array_equal(conv.bias_grad, gb)
    assert conv.backward(g).shape == x.shape


def test_maxpool_relu_flatten_layers():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    pool = nn.MaxPool2d(2)
    y = pool.forward(x)
    gx = pool.backward(np.ones_like(y))
    np.testing.assert_array_equal(gx, x == y.repeat(2, axis=2).repeat(2, axis=3))  # 1 at each window's max

    relu = nn.ReLU()
    np.testing.assert_array_equal(relu.forward(x), np.maximum(x, 0))
    np.testing.assert_array_equal(relu.backward(np.full_like(x, 3)), 3 * (x > 0))

    flatten = nn.Flatten()
    assert flatten.forward(x).shape == (2, 48)
    assert flatten.backward(np.zeros((2, 48), np.float32)).shape == x.shape


def test_linear_layer():
    rng = np.random.default_rng(7)
    linear = nn.Linear(5, 3, rng=rng)
    linear.bias[:] = [1, 2, 3]
    x, g = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(linear.forward(x), x @ linear.weight.T + linear.bias, rtol=1e-6)
    np.testing.assert_allclose(linear.backward(g), g @ linear.weight, rtol=1e-6)
    np.testing.assert_allclose(linear.weight_grad, g.T @ x, rtol=1e-6)
    np.testing.assert_allclose(linear.bias_grad, g.sum(axis=0), rtol=1e-6)
    assert linear.backward(g, input_grad=False) is None


def test_softmax_cross_entropy():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])  # huge logits must not overflow
    loss_fn = nn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, np.array([1, 2]))
    assert loss == pytest.approx((1000 + np.log(3)) / 2)
    np.testing.assert_allclose(loss_fn.backward(), np.array([[1, -1, 0], [1 / 3, 1 / 3, -2 / 3]]) / 2, atol=1e-15)


def test_sgd_without_momentum_is_the_seed_update():
    param, grad = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    nn.SGD([(param, grad)], lr=0.1).step()
    np.testing.assert_array_equal(param, [1.0 - 0.1 * 0.5, -2.0 - 0.1 * 0.25])  # F_new = F - alpha * dL/dF


def test_sgd_matches_torch_optim_sgd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    param, grad = rng.standard_normal(6), np.zeros(6)
    t_param = torch.tensor(param.copy(), requires_grad=True)
    optimizer = nn.SGD([(param, grad)], lr=0.05, momentum=0.9, weight_decay=1e-3)
    t_optimizer = torch.optim.SGD([t_param], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(4):
        grad[:] = rng.standard_normal(6)
        t_param.grad = torch.tensor(grad.copy())
        optimizer.step()
        t_optimizer.step()
    np.testing.assert_allclose(param, t_param.detach().numpy(), rtol=1e-14)


def test_short_training_lowers_the_loss():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    x_train, y_train, x_test, y_test = train.load_digits(seed=0)
    data = (x_train[:480], y_train[:480], x_test, y_test)
    model = train.digits_cnn(np.random.default_rng(0))
    with fastconv.threads(1):  # layers this small gain nothing from a second thread on a shared machine
        history = train.fit(model, data, epochs=3, batch_size=32, lr=0.05, seed=0, progress=False,
                            log=lambda line: None)
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert history["test_accuracy"][-1] > 0.5  # chance is 0.1


def test_train_command_writes_the_plot(tmp_path, capsys):
    for name in train.EXTRA:
        pytest.importorskip(name)
    out = tmp_path / "curves.png"
    cli.main(["train", "--epochs", "1", "--out", str(out)])
    assert out.read_bytes().startswith(b"\x89PNG")
    assert "test accuracy" in capsys.readouterr().out


def test_train_command_names_the_extra_when_a_package_is_missing(monkeypatch):
    monkeypatch.setattr(train, "EXTRA", train.EXTRA + ("fastconv_missing_package",))
    with pytest.raises(SystemExit, match=r'fastconv_missing_package .*pip install -e "\.\[train\]"'):
        cli.main(["train"])


def test_train_command_rejects_an_unknown_backend():
    with pytest.raises(SystemExit, match="unknown or unavailable backend 'nope'"):
        train.main(["--backend", "nope"])
