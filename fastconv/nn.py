"""A small, explicit set of training layers over fastconv's public API: forward and backward by hand, no autograd.

Every layer has `forward(x)`, which keeps what its backward needs, and `backward(grad, input_grad=True)`,
which returns the gradient w.r.t. the layer's input (None where `input_grad=False` lets a layer skip it: the
network's first layer, whose input is the data). Parameters and their gradients are exposed uniformly by
`params()` -> [(array, grad), ...]; backward writes the grads in place, so SGD holds them once and is generic.
Arrays are float32 unless `dtype` says otherwise. Convolutions and poolings run on the backend the API picks
for each call: `backend=None` is fastconv's default ("auto" unless set), or name one.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .api import conv2d, conv2d_backward, max_pool2d, max_pool2d_backward
from .threads import single_threaded_blas

# Multiply-adds below which a Linear layer's GEMM runs on one BLAS thread: BLAS's threads gain little on a
# classifier head's small GEMMs and then spin for a while after the call, taking the cores from the next
# layer's kernels.
SMALL_GEMM = 1 << 24


def _blas_for(m, n, k):
    return single_threaded_blas() if m * n * k < SMALL_GEMM else contextlib.nullcontext()


def _he_normal(rng, shape, fan_in, dtype):
    """He (Kaiming) normal initialization, std sqrt(2 / fan_in): keeps activations' scale through ReLUs."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class Layer:
    """The base of every layer: no parameters unless a subclass has some. `predict(x)` is the forward for
    inference: it keeps nothing, so one layer may serve several threads at once. A pickled layer carries its
    parameters, not what its last forward kept for the backward (`_kept`)."""

    _kept = ()

    def params(self):
        return []

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key not in self._kept}


class Conv2d(Layer):
    """2-D convolution with bias, as torch.nn.Conv2d (groups and dilation left out)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *, rng=None,
                 dtype=np.float32, backend=None):
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
        rng = np.random.default_rng() if rng is None else rng
        self.weight = _he_normal(rng, (out_channels, in_channels, kh, kw), in_channels * kh * kw, dtype)
        self.bias = np.zeros(out_channels, dtype)
        self.weight_grad, self.bias_grad = np.zeros_like(self.weight), np.zeros_like(self.bias)
        self.stride, self.padding, self.backend = stride, padding, backend

    _kept = ("input",)

    def predict(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, backend=self.backend)

    def forward(self, x):
        self.input = x
        return self.predict(x)

    def backward(self, grad, input_grad=True):
        grad_input, self.weight_grad[...], self.bias_grad[...] = conv2d_backward(
            grad, self.input, self.weight, self.stride, self.padding,
            output_mask=(input_grad, True, True), backend=self.backend)
        return grad_input

    def params(self):
        return [(self.weight, self.weight_grad), (self.bias, self.bias_grad)]


class MaxPool2d(Layer):
    """2-D max-pooling; keeps the argmax indices for the backward scatter."""

    def __init__(self, kernel_size, stride=None, *, backend=None):
        self.kernel_size, self.stride, self.backend = kernel_size, stride, backend

    _kept = ("input_shape", "indices")

    def predict(self, x):
        return max_pool2d(x, self.kernel_size, self.stride, backend=self.backend)

    def forward(self, x):
        self.input_shape = x.shape
        y, self.indices = max_pool2d(x, self.kernel_size, self.stride, return_indices=True, backend=self.backend)
        return y

    def backward(self, grad, input_grad=True):
        return max_pool2d_backward(grad, self.indices, self.input_shape, backend=self.backend)


class ReLU(Layer):
    """max(x, 0); the gradient passes where the input was positive."""

    _kept = ("positive",)

    def predict(self, x):
        return np.maximum(x, 0)  # one pass, no mask: the mask is for the backward

    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, grad, input_grad=True):
        return grad * self.positive


class Flatten(Layer):
    """(N, ...) -> (N, features)."""

    _kept = ("input_shape",)

    def predict(self, x):
        return x.reshape(len(x), -1)

    def forward(self, x):
        self.input_shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad, input_grad=True):
        return grad.reshape(self.input_shape)


class Linear(Layer):
    """y = x @ weight.T + bias, weight (out_features, in_features) as in torch.nn.Linear."""

    def __init__(self, in_features, out_features, *, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        self.weight = _he_normal(rng, (out_features, in_features), in_features, dtype)
        self.bias = np.zeros(out_features, dtype)
        self.weight_grad, self.bias_grad = np.zeros_like(self.weight), np.zeros_like(self.bias)

    _kept = ("input",)

    def predict(self, x):
        with _blas_for(*x.shape, len(self.weight)):
            return x @ self.weight.T + self.bias

    def forward(self, x):
        self.input = x
        return self.predict(x)

    def backward(self, grad, input_grad=True):
        with _blas_for(*self.input.shape, len(self.weight)):
            np.matmul(grad.T, self.input, out=self.weight_grad)
            grad.sum(axis=0, out=self.bias_grad)
            return grad @ self.weight if input_grad else None

    def params(self):
        return [(self.weight, self.weight_grad), (self.bias, self.bias_grad)]


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def predict(self, x):
        """The layers' predict in order; a dask.array runs as fastconv.dask.predict (one task per chunk)."""
        if type(x).__module__.startswith("dask."):
            from . import dask

            return dask.predict(self, x)
        for layer in self.layers:
            x = layer.predict(x)
        return x

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad, input_grad=True):
        for layer in reversed(self.layers[1:]):
            grad = layer.backward(grad)
        return self.layers[0].backward(grad, input_grad=input_grad)

    def params(self):
        return [pair for layer in self.layers for pair in layer.params()]


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels, as torch.nn.CrossEntropyLoss."""

    def forward(self, logits, labels):
        shifted = logits - logits.max(axis=1, keepdims=True)  # exp cannot overflow
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self.probs, self.labels = np.exp(log_probs), labels
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    def backward(self):
        """d loss / d logits = (softmax - one_hot) / N."""
        grad = self.probs.copy()
        grad[np.arange(len(self.labels)), self.labels] -= 1
        return grad / len(self.labels)


class SGD:
    """Stochastic gradient descent with momentum and weight decay, as torch.optim.SGD:
    v = momentum * v + (grad + weight_decay * param), then param -= lr * v.
    With momentum and weight decay 0 it is the seed note's F_new = F - alpha * dL/dF, alpha = lr."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        self.params, self.lr, self.momentum, self.weight_decay = list(params), lr, momentum, weight_decay
        self.velocities = [np.zeros_like(param) for param, _ in self.params]

    def step(self):
        for (param, grad), velocity in zip(self.params, self.velocities):
            velocity *= self.momentum
            velocity += grad
            if self.weight_decay:
                velocity += self.weight_decay * param
            param -= self.lr * velocity
