"""fastconv inside PyTorch models (needs PyTorch; fastconv itself does not).

`Conv2d`, `ConvTranspose2d` and `MaxPool2d` are torch.nn's layers (same constructor arguments, parameters and
`state_dict` keys) whose forward and backward run fastconv's kernels through `torch.autograd.Function`s, on
NumPy views of the CPU tensors (no copy where a tensor is contiguous; a channels_last tensor is read through
its strides and copied once into NCHW). `convert(model)` swaps every such layer of a model in place (the
same module objects, so the same Parameters: an optimizer built before goes on working) and returns the
model. What fastconv cannot serve runs PyTorch's own code, call by call: CUDA tensors, dtypes other than
float32 and float64, `padding_mode` other than 'zeros', a double backward (which raises). The thread count is
PyTorch's (`torch.get_num_threads()`) unless fastconv's own is set (FASTCONV_NUM_THREADS, set_num_threads,
`with fastconv.threads(n)`). Under `torch.no_grad()` or when nothing requires a gradient, the layers call
fastconv directly and keep nothing for a backward. Under `torch.compile` the layers' forwards are left out
of the compiled graph (torch.compiler.disable: a graph break at each, the layer run as it is); the rest of
the model is compiled.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from . import api
from .params import pool_params
from .threads import is_set as _threads_chosen
from .threads import threads as _threads_scope

__all__ = ["Conv2d", "ConvTranspose2d", "MaxPool2d", "convert", "why_not"]

_DTYPES = (torch.float32, torch.float64)


def _numpy(t):
    return None if t is None else t.detach().numpy()


def _tensor(a):
    return None if a is None else torch.from_numpy(a)


@contextlib.contextmanager
def _torch_threads():
    """fastconv's thread count: its own where set, else PyTorch's."""
    if _threads_chosen():
        yield
    else:
        with _threads_scope(torch.get_num_threads()):
            yield


def why_not(layer, *tensors):
    """None if fastconv serves this layer on these tensors, else why PyTorch's own code runs."""
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={layer.padding_mode!r} (fastconv pads with zeros only)"
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"a {t.device.type} tensor (fastconv runs on the CPU)"
        if t.dtype not in _DTYPES:
            return f"dtype {t.dtype} (fastconv runs float32 and float64)"
    if tensors and tensors[0].dim() != 4:
        return f"a {tensors[0].dim()}-D input (fastconv takes NCHW batches)"
    if len({t.dtype for t in tensors if t is not None}) > 1:
        return "mixed dtypes"
    if isinstance(layer, nn.MaxPool2d) and tensors:
        try:  # a window wholly in padding: PyTorch pools it to -inf, fastconv refuses it
            pool_params(tuple(tensors[0].shape), layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        layer.ceil_mode)
        except (ValueError, TypeError) as error:
            return str(error)
    return None


def _needs_graph(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _ConvFunction(torch.autograd.Function):
    """A convolution's forward and backward through fastconv: `ops` is the pair of API functions (forward,
    backward), `conv` their keyword arguments."""

    @staticmethod
    def forward(ctx, x, weight, bias, ops, conv, backend):
        with _torch_threads():
            y = ops[0](_numpy(x), _numpy(weight), _numpy(bias), **conv, backend=backend)
        ctx.save_for_backward(x, weight)
        ctx.ops, ctx.conv, ctx.backend, ctx.has_bias = ops, conv, backend, bias is not None
        return _tensor(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        with _torch_threads():
            gx, gw, gb = ctx.ops[1](_numpy(grad.contiguous()), _numpy(x), _numpy(weight), **ctx.conv,
                                    output_mask=mask, backend=ctx.backend)
        return _tensor(gx), _tensor(gw), _tensor(gb), None, None, None


class _Conv2dFunction(_ConvFunction):
    pass


class _ConvTranspose2dFunction(_ConvFunction):
    pass


def _convolve(layer, input, function, ops, conv):
    """A convolution layer's forward on fastconv: straight through the API where no graph is recorded (nothing
    kept for a backward), else through its autograd Function."""
    if not _needs_graph(input, layer.weight, layer.bias):
        with _torch_threads():
            return _tensor(ops[0](_numpy(input), _numpy(layer.weight), _numpy(layer.bias), **conv,
                                  backend=layer.fastconv_backend))
    return function.apply(input, layer.weight, layer.bias, ops, conv, layer.fastconv_backend)


class _MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pool, backend):
        with _torch_threads():
            y, indices = api.max_pool2d(_numpy(x), **pool, return_indices=True, backend=backend)
        ctx.input_shape, ctx.backend = tuple(x.shape), backend
        indices = _tensor(indices)
        ctx.save_for_backward(indices)
        ctx.mark_non_differentiable(indices)
        return _tensor(y), indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        (indices,) = ctx.saved_tensors
        with _torch_threads():
            gx = api.max_pool2d_backward(_numpy(grad.contiguous()), _numpy(indices), ctx.input_shape,
                                         backend=ctx.backend)
        return _tensor(gx), None, None


class _OnFastconv:
    """What fastconv's torch.nn layers add to torch.nn's: `backend` (fastconv's; None for its default), which
    convert() sets on the layers it swaps."""

    fastconv_backend = None

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fastconv_backend = backend


class Conv2d(_OnFastconv, nn.Conv2d):
    """torch.nn.Conv2d on fastconv's kernels (`backend`: fastconv's, None for its default)."""

    @torch.compiler.disable
    def forward(self, input):
        if why_not(self, input, self.weight, self.bias) is not None:
            return super().forward(input)
        conv = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return _convolve(self, input, _Conv2dFunction, (api.conv2d, api.conv2d_backward), conv)


class ConvTranspose2d(_OnFastconv, nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d on fastconv's kernels (`output_size` in forward as in torch.nn)."""

    @torch.compiler.disable
    def forward(self, input, output_size=None):
        if why_not(self, input, self.weight, self.bias) is not None:
            return super().forward(input, output_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        conv = dict(stride=self.stride, padding=self.padding, output_padding=tuple(output_padding),
                    groups=self.groups, dilation=self.dilation)
        return _convolve(self, input, _ConvTranspose2dFunction, (api.conv_transpose2d, api.conv_transpose2d_backward),
                         conv)


class MaxPool2d(_OnFastconv, nn.MaxPool2d):
    """torch.nn.MaxPool2d on fastconv's kernels (return_indices as in torch.nn)."""

    @torch.compiler.disable
    def forward(self, input):
        if why_not(self, input) is not None:
            return super().forward(input)
        pool = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
                    ceil_mode=self.ceil_mode)
        if not _needs_graph(input):  # no backward: the indices only if asked for
            with _torch_threads():
                out = api.max_pool2d(_numpy(input), **pool, return_indices=self.return_indices,
                                     backend=self.fastconv_backend)
            return tuple(map(_tensor, out)) if self.return_indices else _tensor(out)
        else:
            y, indices = _MaxPool2dFunction.apply(input, pool, self.fastconv_backend)
        return (y, indices) if self.return_indices else y


_SWAPS = {nn.Conv2d: Conv2d, nn.ConvTranspose2d: ConvTranspose2d, nn.MaxPool2d: MaxPool2d}


def convert(model, *, backend=None):
    """Swap every torch.nn.Conv2d, ConvTranspose2d and MaxPool2d of `model` (itself included) for fastconv's,
    in place: each module keeps its identity, Parameters, buffers and hooks, only its class changes. Layers
    fastconv cannot serve whatever the input (padding_mode other than 'zeros', parameters on another device
    or of another dtype) are left as they are, with a warning that names them and says why. Returns model."""
    left = []
    for name, module in model.named_modules():
        swap = _SWAPS.get(type(module))
        if swap is None:
            continue
        reason = why_not(module, *(p for p in module.parameters(recurse=False)))
        if reason is not None:
            left.append(f"{name or type(module).__name__}: {reason}")
            continue
        module.__class__ = swap
        module.fastconv_backend = backend
    if left:
        warnings.warn("fastconv.torch.convert left these layers to PyTorch: " + "; ".join(left), stacklevel=2)
    return model
