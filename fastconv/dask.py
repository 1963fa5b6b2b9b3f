"""fastconv's operations over Dask arrays: lazy, one task per chunk, on any scheduler or cluster.

The functions take fastconv's arguments and return what fastconv returns, as dask.arrays. Inputs are chunked
along the batch and, for large images, along H and W (never along channels); weights and biases may be NumPy
arrays and enter the graph once, as one key each. Every task runs fastconv's own call (`auto` unless `backend`
says otherwise) on its chunk and the halo its windows need, so results equal the unchunked call: an output
belongs to the chunk in which its window starts, any stride, padding or dilation included. Weight and bias
gradients are per-chunk sums reduced by a tree whose shape depends only on the chunking. `predict` runs a
fastconv.nn model's layers on each batch chunk in one task; `fit` trains one data-parallel on a cluster.

Kernel threads in a task: FASTCONV_NUM_THREADS (or set_num_threads) where it is set in the worker's process,
else 1, as Dask's own workers set OMP_NUM_THREADS=1: the worker's threads are the parallelism.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import numpy as np

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.core import flatten
    from dask.highlevelgraph import HighLevelGraph
except ImportError as error:  # an optional extra
    raise ImportError(f"fastconv.dask needs Dask: pip install 'fastconv[dask]' ({error})") from error

from . import api
from .params import (
    check_4d,
    check_float_arrays,
    check_pool_backward,
    pool_params,
)
from .threads import get_num_threads, is_set, threads


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of a windowed operation: input `size`, window `span` (dilation * (kernel - 1) + 1),
    stride, padding before and after, and output `out_size`."""

    size: int
    span: int
    stride: int
    pad_begin: int
    pad_end: int
    out_size: int

    def window(self, j0, j1):
        """The input rows [lo, hi) that outputs [j0, j1) read, padding (lo < 0 or hi > size) included."""
        return j0 * self.stride - self.pad_begin, (j1 - 1) * self.stride - self.pad_begin + self.span

    def outputs_starting_in(self, bounds):
        """Output chunk boundaries for input chunk boundaries: an output belongs to the chunk its window
        starts in (the first chunk also takes the windows starting in the padding, the last those after)."""
        inner = [min(max(-(-(a + self.pad_begin) // self.stride), 0), self.out_size) for a in bounds[1:-1]]
        return (0, *inner, self.out_size)

    def outputs_reaching(self, a, b):
        """The outputs [j0, j1) whose windows overlap input rows [a, b)."""
        j0 = max(0, (a - self.span + self.pad_begin) // self.stride + 1)
        j1 = min(self.out_size, (b - 1 + self.pad_begin) // self.stride + 1)
        return j0, max(j0, j1)

    @property
    def symmetric(self):
        return self.pad_begin == self.pad_end


def _conv_axes(p):
    (sh, sw), (top, bottom, left, right), (dh, dw) = p.stride, p.padding, p.dilation
    return (_Axis(p.in_height, dh * (p.kernel_height - 1) + 1, sh, top, bottom, p.out_height),
            _Axis(p.in_width, dw * (p.kernel_width - 1) + 1, sw, left, right, p.out_width))


def _pool_axes(p):
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    return (_Axis(p.in_height, dh * (p.kernel_height - 1) + 1, sh, ph, ph, p.out_height),
            _Axis(p.in_width, dw * (p.kernel_width - 1) + 1, sw, pw, pw, p.out_width))


def _bounds(chunks):
    return tuple(np.concatenate([[0], np.cumsum(chunks)]).astype(int).tolist())


def _sizes(bounds):
    return tuple(int(b - a) for a, b in zip(bounds[:-1], bounds[1:]))


# ---- inputs -------------------------------------------------------------------------------------------------

def _as_dask(array, name):
    """A dask.array (NumPy and array-likes become one chunk) with known chunk sizes."""
    if not isinstance(array, da.Array):
        array = da.from_array(np.asarray(array), chunks=-1)
    if any(np.isnan(size) for sizes in array.chunks for size in sizes):
        raise ValueError(f"{name} has unknown chunk sizes {array.chunks}: call {name}.compute_chunk_sizes() first")
    return array


def _check_channels(array, name):
    if array.ndim == 4 and len(array.chunks[1]) > 1:
        raise ValueError(f"{name} {array.shape} is chunked along channels {array.chunks[1]}: every block needs all "
                         f"channels; rechunk with {name}.rechunk({{1: -1}})")


def _constant(value, prefix):
    """A weight or bias as one graph key: (key, the layer holding it, the collections it depends on).
    A dask.array is made one chunk."""
    if value is None:
        return None, {}, []
    if isinstance(value, da.Array):
        value = value.rechunk(-1)
        return (value.name,) + (0,) * value.ndim, {}, [value]
    value = np.asarray(value)
    key = f"{prefix}-{tokenize(value)}"
    return key, {key: value}, []


def _aligned(array, like):
    """`array` with the batch chunks of `like`."""
    return array if array.chunks[0] == like.chunks[0] else array.rechunk({0: like.chunks[0]})


# ---- tasks (module-level functions: they travel to the workers by name) ------------------------------------

def _region_task(array, batch_block, rows, cols, fill):
    """A task assembling rows x cols ([lo, hi) pairs, which may reach outside the plane) of `array`'s batch
    block from the blocks that cover them, `fill` outside the plane."""
    size = array.shape[2:]
    picks = []
    for (lo, hi), n, chunks in zip((rows, cols), size, array.chunks[2:]):
        bounds = _bounds(chunks)
        inside = (max(lo, 0), min(hi, n))
        blocks = [i for i in range(len(chunks)) if bounds[i] < inside[1] and bounds[i + 1] > inside[0]]
        picks.append((blocks, bounds[blocks[0]] if blocks else 0))
    (row_blocks, row0), (col_blocks, col0) = picks
    keys = [[(array.name, batch_block, 0, i, j) for j in col_blocks] for i in row_blocks]
    shape = (array.chunks[0][batch_block], array.shape[1])
    return (_assemble, keys, (row0, *rows, size[0]), (col0, *cols, size[1]), fill, shape, array.dtype)


def _assemble(blocks, rows, cols, fill, shape, dtype):
    """The region of _region_task: rows = (first block's start, lo, hi, plane size), cols the same; a view of
    the block where one block holds it all."""
    (row0, top, bottom, height), (col0, left, right, width) = rows, cols
    if not blocks or not blocks[0]:  # wholly outside the data (grad_output zero-extended)
        return np.full((*shape, bottom - top, right - left), fill, dtype)
    data = np.concatenate([np.concatenate(row, axis=3) for row in blocks], axis=2) \
        if len(blocks) > 1 or len(blocks[0]) > 1 else blocks[0][0]
    inner = data[:, :, max(top, 0) - row0:min(bottom, height) - row0, max(left, 0) - col0:min(right, width) - col0]
    before_rows, before_cols = max(-top, 0), max(-left, 0)
    widths = ((0, 0), (0, 0), (before_rows, bottom - top - before_rows - inner.shape[2]),
              (before_cols, right - left - before_cols - inner.shape[3]))
    return np.pad(inner, widths, constant_values=fill) if any(w for pair in widths for w in pair) else inner


def _kernel_threads():
    return get_num_threads() if is_set() else 1


def _conv_block(x, w, b, stride, padding, dilation, groups, backend):
    with threads(_kernel_threads()):
        return api.conv2d(x, w, b, stride, padding, dilation, groups, backend=backend)


def _input_grad_block(gy, w, region, padding, crops, target, stride, dilation, groups, backend, bias):
    """conv2d's input gradient over the (virtual) input `region` (H, W) from grad_output rows gy, cropped into
    the target block (channels, H, W): crops = ((to, from, length) along H, the same along W)."""
    grad = None
    if gy.shape[2] and gy.shape[3]:
        dummy = np.broadcast_to(np.zeros((), gy.dtype), (gy.shape[0], target[0], *region))  # only its shape
        with threads(_kernel_threads()):
            grad, _, _ = api.conv2d_backward(gy, dummy, w, stride, padding, dilation, groups,
                                             output_mask=(True, False, False), backend=backend)
    (row_to, row_from, rows), (col_to, col_from, cols) = crops
    if grad is None or grad.shape[2:] != target[1:] or crops != ((0, 0, target[1]), (0, 0, target[2])):
        out = np.zeros((gy.shape[0], *target), gy.dtype)
        if grad is not None:
            out[:, :, row_to:row_to + rows, col_to:col_to + cols] = \
                grad[:, :, row_from:row_from + rows, col_from:col_from + cols]
        grad = out
    if bias is not None:
        grad += bias.reshape(1, -1, 1, 1)
    return grad


def _weight_grad_block(gy, x, weight_shape, stride, padding, dilation, groups, backend):
    """One block's share of the weight gradient, with a leading axis to stack the shares on."""
    if 0 in gy.shape:
        return np.zeros((1, *weight_shape), gy.dtype)
    dummy = np.broadcast_to(np.zeros((), gy.dtype), weight_shape)  # only its shape
    with threads(_kernel_threads()):
        _, grad, _ = api.conv2d_backward(gy, x, dummy, stride, padding, dilation, groups,
                                         output_mask=(False, True, False), backend=backend)
    return grad[None]


def _pool_block(x, kernel_size, stride, padding, dilation, ceil_mode, origin, plane, first_taps, with_indices,
                backend):
    """max_pool2d of a block's region, the indices (if asked for) made positions in the whole plane. A window
    whose cells are all -inf keeps its first cell, which may be the region's -inf fill: that index becomes
    the window's first cell inside the plane, which is what the unchunked call gives."""
    with threads(_kernel_threads()):
        out = api.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=with_indices,
                             backend=backend)
    if not with_indices:
        return out, None
    y, indices = out
    if origin == (0, 0) and x.shape[2:] == plane:
        return y, indices
    rows, cols = np.divmod(indices, x.shape[3])
    rows += origin[0]
    cols += origin[1]
    outside = (rows < 0) | (rows >= plane[0]) | (cols < 0) | (cols >= plane[1])
    if outside.any():
        rows[outside] = np.broadcast_to(first_taps[0][:, None], outside.shape)[outside]
        cols[outside] = np.broadcast_to(first_taps[1][None, :], outside.shape)[outside]
    return y, rows * plane[1] + cols


def _first_taps(axis, dilation, j0, j1):
    """For outputs [j0, j1) along an axis, the first kernel tap inside the input (validation keeps one)."""
    starts = np.arange(j0, j1) * axis.stride - axis.pad_begin
    return np.where(starts < 0, starts - starts // dilation * dilation, starts)


def _empty_pool(shape, dtype):
    return np.zeros(shape, dtype), np.zeros(shape, np.int64)


def _pool_backward_block(gy, indices, input_shape, backend):
    with threads(_kernel_threads()):
        return api.max_pool2d_backward(gy, indices, (gy.shape[0], *input_shape[1:]), backend=backend)


def _predict_block(model, x):
    with threads(_kernel_threads()):
        return model.predict(x)


# ---- graphs -------------------------------------------------------------------------------------------------

def _array(name, layer, dependencies, chunks, dtype):
    graph = HighLevelGraph.from_collections(name, layer, dependencies=dependencies)
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype))


def _window_spans(batch_blocks, axes, out_bounds):
    """For each output block (ib, ih, iw) of a windowed op: the input rows and columns its task reads and the
    padding its call is given, or None for an empty block. An axis whose output is one chunk and whose
    padding is symmetric runs whole with its padding; any other runs on its window's rows, the padding
    filled in by the region."""
    for ib in range(batch_blocks):
        for ih in range(len(out_bounds[0]) - 1):
            for iw in range(len(out_bounds[1]) - 1):
                spans, pads = [], []
                for axis, bounds, i in zip(axes, out_bounds, (ih, iw)):
                    whole = bounds == (0, axis.out_size) and axis.symmetric
                    spans.append((0, axis.size) if whole else axis.window(bounds[i], bounds[i + 1]))
                    pads.append(axis.pad_begin if whole else 0)
                empty = any(bounds[i] == bounds[i + 1] for bounds, i in zip(out_bounds, (ih, iw)))
                yield (ib, ih, iw), None if empty else tuple(spans), tuple(pads)


def _windowed(name, source, axes, out_bounds, call, layer, dependencies, chunks, dtype):
    """An op whose output block (ib, ih, iw) reads a window region of `source`:
    call(ib, ih, iw, spans, pads, shape) -> the block's task (spans None for an empty block)."""
    layer = dict(layer)
    for (ib, ih, iw), spans, pads in _window_spans(len(source.chunks[0]), axes, out_bounds):
        shape = (chunks[0][ib], chunks[1][0], chunks[2][ih], chunks[3][iw])
        layer[(name, ib, 0, ih, iw)] = call(ib, ih, iw, spans, pads, shape)
    return _array(name, layer, [source, *dependencies], chunks, dtype)


def _input_gradient(name, gy, axes, target_bounds, w_key, p, backend, layer, dependencies, b_key=None):
    """conv2d's input gradient for the input chunks `target_bounds` (per axis), each block from the
    grad_output rows whose windows reach it; gy reads as zeros beyond its own extent (a transposed
    convolution's input can be shorter than the grad_output it stands for)."""
    layer = dict(layer)
    for ib in range(len(gy.chunks[0])):
        for ih in range(len(target_bounds[0]) - 1):
            for iw in range(len(target_bounds[1]) - 1):
                spans, regions, pads, crops = [], [], [], []
                for axis, bounds, i in zip(axes, target_bounds, (ih, iw)):
                    a, b = bounds[i], bounds[i + 1]
                    if bounds == (0, axis.size) and axis.symmetric:
                        spans.append((0, axis.out_size))
                        regions.append(axis.size)
                        pads.append(axis.pad_begin)
                        crops.append((0, 0, axis.size))
                        continue
                    j0, j1 = axis.outputs_reaching(a, b)
                    lo, hi = axis.window(j0, j1)
                    start, stop = max(a, lo), min(b, hi)
                    spans.append((j0, j1))
                    regions.append(max(hi - lo, 0))
                    pads.append(0)
                    crops.append((start - a, start - lo, max(stop - start, 0)))
                target = (p.in_channels, target_bounds[0][ih + 1] - target_bounds[0][ih],
                          target_bounds[1][iw + 1] - target_bounds[1][iw])
                layer[(name, ib, 0, ih, iw)] = (
                    _input_grad_block, _region_task(gy, ib, *spans, 0), w_key, tuple(regions),
                    tuple(pads), tuple(crops), target, p.stride, p.dilation, p.groups, backend, b_key)
    chunks = (gy.chunks[0], (p.in_channels,), _sizes(target_bounds[0]), _sizes(target_bounds[1]))
    return _array(name, layer, [gy, *dependencies], chunks, gy.dtype)


def _weight_gradient(name, gy, x, axes, p, backend, split_every):
    """The weight gradient of convolution `p` (gy its grad_output, x its input, same batch chunks): the tree
    sum of one share per grad_output block, each from that block and the input window its outputs read."""
    out_bounds = (_bounds(gy.chunks[2]), _bounds(gy.chunks[3]))
    layer = {}
    for n, ((ib, ih, iw), spans, pads) in enumerate(_window_spans(len(gy.chunks[0]), axes, out_bounds)):
        if spans is None:
            layer[(name, n, 0, 0, 0, 0)] = (np.zeros, (1, *p.weight_shape), gy.dtype)
        else:
            layer[(name, n, 0, 0, 0, 0)] = (_weight_grad_block, (gy.name, ib, 0, ih, iw),
                                            _region_task(x, ib, *spans, 0), p.weight_shape, p.stride, pads,
                                            p.dilation, p.groups, backend)
    chunks = ((1,) * len(layer), *((n,) for n in p.weight_shape))
    stacked = _array(name, layer, [x, gy], chunks, gy.dtype)
    return stacked.sum(axis=0, dtype=np.float64, split_every=split_every).astype(gy.dtype)


def _bias_gradient(gy, dtype, split_every):
    return gy.sum(axis=(0, 2, 3), dtype=np.float64, split_every=split_every).astype(dtype)


# ---- the operations -----------------------------------------------------------------------------------------

def _parameter(value):
    """A weight or bias: a dask.array stays one, anything else becomes a NumPy array."""
    return None if value is None else value if isinstance(value, da.Array) else np.asarray(value)


def _forward(name, source, p, out_bounds, w, b, backend):
    """The forward convolution `p` of `source` into the output blocks `out_bounds` (per axis)."""
    w_key, w_layer, w_deps = _constant(w, "fastconv-weight")
    b_key, b_layer, b_deps = _constant(b, "fastconv-bias")

    def call(ib, ih, iw, spans, pads, shape):
        if spans is None:
            return (np.zeros, shape, source.dtype)
        return (_conv_block, _region_task(source, ib, *spans, 0), w_key, b_key, p.stride, pads, p.dilation,
                p.groups, backend)

    chunks = (source.chunks[0], (p.out_channels,), _sizes(out_bounds[0]), _sizes(out_bounds[1]))
    return _windowed(name, source, _conv_axes(p), out_bounds, call, {**w_layer, **b_layer}, w_deps + b_deps,
                     chunks, source.dtype)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, backend=None):
    """fastconv.conv2d over a dask.array: one task per input block, the output chunked as the input (the
    same batch chunks; along H and W, each output in the chunk its window starts in)."""
    x, w, b = _as_dask(input, "input"), _parameter(weight), _parameter(bias)
    check_float_arrays(input=x, weight=w, bias=b)
    p = api._conv_setup(x, w, stride, padding, dilation, groups)
    if b is not None and b.shape != (p.out_channels,):
        raise ValueError(f"bias must have shape ({p.out_channels},) for weight {w.shape}, got {b.shape}")
    _check_channels(x, "input")
    out_bounds = tuple(axis.outputs_starting_in(_bounds(c)) for axis, c in zip(_conv_axes(p), x.chunks[2:]))
    name = "fastconv-conv2d-" + tokenize(x.name, w, b, p, backend)
    return _forward(name, x, p, out_bounds, w, b, backend)


def _backward_setup(grad_output, input, weight, params_of, output_shape_of, output_mask, backend, split_every):
    """What both backward ops check and prepare: (grad_output with the input's batch chunks, input, weight,
    dtype, the convolution's params, the output mask, the graph's token)."""
    gy, x, w = _as_dask(grad_output, "grad_output"), _as_dask(input, "input"), _parameter(weight)
    dtype = check_float_arrays(grad_output=gy, input=x, weight=w)
    p = params_of(x, w)
    if gy.shape != output_shape_of(p):
        raise ValueError(f"grad_output must have the output's shape {output_shape_of(p)} (input {x.shape}, "
                         f"weight {w.shape}), got {gy.shape}")
    mask = api._output_mask(output_mask)
    _check_channels(x, "input")
    _check_channels(gy, "grad_output")
    gy = _aligned(gy, x)
    return gy, x, w, dtype, p, mask, tokenize(gy.name, x.name, w, p, backend, split_every)


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    output_mask=(True, True, True), backend=None, split_every=None):
    """fastconv.conv2d_backward over dask.arrays: (grad_input, chunked as the input; grad_weight; grad_bias),
    None where output_mask is False. The weight and bias gradients are tree sums of per-block shares
    (`split_every` per node, Dask's default unless given) in an order fixed by the chunking."""
    gy, x, w, dtype, p, (want_input, want_weight, want_bias), token = _backward_setup(
        grad_output, input, weight, lambda x, w: api._conv_setup(x, w, stride, padding, dilation, groups),
        lambda p: p.output_shape, output_mask, backend, split_every)
    grad_input = grad_weight = grad_bias = None
    if want_input:
        w_key, w_layer, w_deps = _constant(w, "fastconv-weight")
        target = (_bounds(x.chunks[2]), _bounds(x.chunks[3]))
        grad_input = _input_gradient("fastconv-conv2d-grad-input-" + token, gy, _conv_axes(p), target, w_key, p,
                                     backend, w_layer, w_deps)
    if want_weight:
        grad_weight = _weight_gradient("fastconv-conv2d-grad-weight-" + token, gy, x, _conv_axes(p), p, backend,
                                       split_every)
    if want_bias:
        grad_bias = _bias_gradient(gy, dtype, split_every)
    return grad_input, grad_weight, grad_bias


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     backend=None):
    """fastconv.conv_transpose2d over a dask.array: the output has the input's batch chunks and, along H and
    W, chunk boundaries at the input's times the stride."""
    x, w, b = _as_dask(input, "input"), _parameter(weight), _parameter(bias)
    check_float_arrays(input=x, weight=w, bias=b)
    p = api._transpose_setup(x, w, stride, padding, output_padding, dilation, groups)
    if b is not None and b.shape != (p.in_channels,):
        raise ValueError(f"bias must have shape ({p.in_channels},) for weight {w.shape} and groups={groups}, "
                         f"got {b.shape}")
    _check_channels(x, "input")
    axes = _conv_axes(p)
    target = tuple(
        (0, axis.size) if len(c) == 1 else (0, *(min(a * s, axis.size) for a in _bounds(c)[1:-1]), axis.size)
        for axis, c, s in zip(axes, x.chunks[2:], p.stride))
    w_key, w_layer, w_deps = _constant(w, "fastconv-weight")
    b_key, b_layer, b_deps = _constant(b, "fastconv-bias")
    name = "fastconv-conv-transpose2d-" + tokenize(x.name, w, b, p, backend)
    return _input_gradient(name, x, axes, target, w_key, p, backend, {**w_layer, **b_layer}, w_deps + b_deps, b_key)


def conv_transpose2d_backward(grad_output, input, weight, stride=1, padding=0, output_padding=0, groups=1,
                              dilation=1, *, output_mask=(True, True, True), backend=None, split_every=None):
    """fastconv.conv_transpose2d_backward over dask.arrays: (grad_input, chunked as the input; grad_weight;
    grad_bias), None where output_mask is False; the sums as in conv2d_backward."""
    gy, x, w, dtype, p, (want_input, want_weight, want_bias), token = _backward_setup(
        grad_output, input, weight,
        lambda x, w: api._transpose_setup(x, w, stride, padding, output_padding, dilation, groups),
        lambda p: p.input_shape, output_mask, backend, split_every)
    grad_input = grad_weight = grad_bias = None
    if want_input:  # the forward convolution of grad_output, into the input's chunks
        grad_input = _forward("fastconv-conv-transpose2d-grad-input-" + token, gy, p,
                              (_bounds(x.chunks[2]), _bounds(x.chunks[3])), w, None, backend)
    if want_weight:  # the convolution's weight gradient, grad_output and input in swapped roles
        grad_weight = _weight_gradient("fastconv-conv-transpose2d-grad-weight-" + token, x, gy, _conv_axes(p), p,
                                       backend, split_every)
    if want_bias:
        grad_bias = _bias_gradient(gy, dtype, split_every)
    return grad_input, grad_weight, grad_bias


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *, return_indices=False,
               backend=None):
    """fastconv.max_pool2d over a dask.array, chunked as conv2d's output; indices are positions in the whole
    H*W plane, as the unchunked call gives."""
    x = _as_dask(input, "input")
    dtype = check_float_arrays(input=x)
    check_4d(x, "input", "(N, C, H, W)")
    p = pool_params(x.shape, *(api._hashable(a) for a in (kernel_size, stride, padding, dilation)), ceil_mode)
    _check_channels(x, "input")
    axes = _pool_axes(p)
    out_bounds = tuple(axis.outputs_starting_in(_bounds(c)) for axis, c in zip(axes, x.chunks[2:]))
    kernel = (p.kernel_height, p.kernel_width)

    def call(ib, ih, iw, spans, pads, shape):
        if spans is None:
            return (_empty_pool, shape, dtype)
        first_taps = tuple(_first_taps(axis, d, bounds[i], bounds[i + 1])
                           for axis, d, bounds, i in zip(axes, p.dilation, out_bounds, (ih, iw)))
        return (_pool_block, _region_task(x, ib, *spans, -np.inf), kernel, p.stride, pads, p.dilation, ceil_mode,
                tuple(lo for lo, _ in spans), (p.in_height, p.in_width), first_taps, return_indices, backend)

    chunks = (x.chunks[0], (p.channels,), _sizes(out_bounds[0]), _sizes(out_bounds[1]))
    token = tokenize(x.name, p, return_indices, backend)
    pairs = _windowed("fastconv-max-pool2d-pairs-" + token, x, axes, out_bounds, call, {}, [], chunks, dtype)
    values = _part(pairs, "fastconv-max-pool2d-" + token, 0, dtype)
    return (values, _part(pairs, "fastconv-max-pool2d-indices-" + token, 1, np.int64)) if return_indices else values


def _part(pairs, name, i, dtype):
    """Element i of every block of `pairs` (blocks that are tuples), as an array."""
    layer = {(name, *key[1:]): (operator.getitem, key, i) for key in flatten(pairs.__dask_keys__())}
    return _array(name, layer, [pairs], pairs.chunks, dtype)


def max_pool2d_backward(grad_output, indices, input_shape, *, backend=None):
    """fastconv.max_pool2d_backward over dask.arrays: one task per batch chunk, the gradient of its whole
    planes (grad_output and indices chunked along H and W are joined: an index may point anywhere in its
    plane)."""
    gy, idx = _as_dask(grad_output, "grad_output"), _as_dask(indices, "indices")
    p = check_pool_backward(gy, idx, input_shape)
    _check_channels(gy, "grad_output")
    idx = idx if idx.chunks == gy.chunks else idx.rechunk(gy.chunks)
    name = "fastconv-max-pool2d-backward-" + tokenize(gy.name, idx.name, p, backend)
    whole = ((0, p.output_shape[2]), (0, p.output_shape[3]))
    layer = {(name, ib, 0, 0, 0): (_pool_backward_block, _region_task(gy, ib, *whole, 0),
                                   _region_task(idx, ib, *whole, 0), p.input_shape, backend)
             for ib in range(len(gy.chunks[0]))}
    chunks = (gy.chunks[0], *((n,) for n in p.input_shape[1:]))
    return _array(name, layer, [gy, idx], chunks, gy.dtype)


def predict(model, x):
    """model.predict over a dask.array of images chunked along the batch: every layer of a chunk in one task,
    the model one key of the graph (sent to each worker once)."""
    x = _as_dask(x, "x")
    check_4d(x, "x", api._INPUT)
    if len(x.chunks[2]) > 1 or len(x.chunks[3]) > 1:
        raise ValueError(f"x {x.shape} is chunked along H or W {x.chunks[2:]}: a model's forward needs whole "
                         f"images; rechunk with x.rechunk({{2: -1, 3: -1}})")
    _check_channels(x, "x")
    sample = model.predict(np.zeros((1, *x.shape[1:]), x.dtype))
    model_key = "fastconv-model-" + tokenize(model)
    name = "fastconv-predict-" + tokenize(x.name, model_key)
    layer = {model_key: model}
    for ib in range(len(x.chunks[0])):
        layer[(name, ib, *(0,) * (sample.ndim - 1))] = (_predict_block, model_key, (x.name, ib, 0, 0, 0))
    return _array(name, layer, [x], (x.chunks[0], *((n,) for n in sample.shape[1:])), sample.dtype)


# ---- data-parallel training ---------------------------------------------------------------------------------

def fit(model, x, y, *, client=None, epochs, batch_size, lr, momentum=0.9, weight_decay=5e-4, seed=0,
        validation=None, progress=True, log=print, callback=None, split_every=8):
    """Data-parallel SGD of a fastconv.nn model on a Dask cluster: fastconv.train.fit's loop (the same
    batches, learning-rate schedule, momentum and weight decay, the same progress lines), each step's
    gradients computed by the workers on the shards of the batch they hold, summed by a tree of fixed shape
    (`split_every` shares per node) and applied once here; the new weights go out with the next step.

    x (N, C, H, W) and y (N,) integer labels: dask.arrays (the shards are x's batch chunks) or NumPy arrays
    (cut into one shard per worker). They are persisted on the cluster once; a shard whose worker is lost is
    recomputed from its graph on the workers left, and training goes on to the same result. validation:
    (x_test, y_test) NumPy arrays evaluated here after every epoch. client: distributed's default client
    unless given. Returns fastconv.train.fit's history; the model holds the trained weights."""
    from distributed import default_client, futures_of, wait

    from . import train

    client = client or default_client()
    x, y = _shards(x, y, len(client.scheduler_info()["workers"]))
    check_float_arrays(x=x, **{"the model's weights": next((p for p, _ in model.params()), None)})
    x, y = client.persist([x, y])
    wait([x, y])
    steps = _ClusterSteps(client, model, x, y, split_every, futures_of)
    x_test, y_test = validation if validation is not None else (None, None)
    return train.fit(model, (x, y, x_test, y_test), epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, seed=seed, progress=progress, log=log, step=steps, callback=callback)


def _shards(x, y, workers):
    """The training arrays as dask.arrays with the same batch chunks (x's, or one per worker for NumPy
    arrays), each NumPy chunk its own graph key: the graph holds the data, so a lost chunk can be rebuilt."""
    x = x if isinstance(x, da.Array) else np.asarray(x)
    y = y if isinstance(y, da.Array) else np.asarray(y)
    check_4d(x, "x", api._INPUT)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y must be 1-D with one label per image of x {tuple(x.shape)}, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if not isinstance(x, da.Array):
        x = _literal_chunks(np.asarray(x), -(-len(x) // workers))
    x = _as_dask(x, "x")
    _check_channels(x, "x")
    x = x.rechunk({2: -1, 3: -1})
    if not isinstance(y, da.Array):
        y = _literal_chunks(np.asarray(y), x.chunks[0])
    return x, _aligned(_as_dask(y, "y"), x)


def _literal_chunks(a, chunks):
    """`a` cut along its first axis (chunks: a size, or the sizes), each piece a graph key of its own."""
    sizes = da.core.normalize_chunks((chunks,) + (-1,) * (a.ndim - 1), a.shape)
    name = "fastconv-data-" + tokenize(a)
    starts = _bounds(sizes[0])
    layer = {(name, i) + (0,) * (a.ndim - 1): a[lo:hi].copy() for i, (lo, hi) in enumerate(zip(starts, starts[1:]))}
    return _array(name, layer, [], sizes, a.dtype)


class _ClusterSteps:
    """fastconv.train.fit's step on a cluster: per batch, one task per shard holding some of its images
    (the model's gradient over them, scaled by their share of the batch), summed in shard order (by a tree of
    tasks, `split_every` per node, down to `split_every` sums that come here), then the optimizer's step
    here."""

    def __init__(self, client, model, x, y, split_every, futures_of):
        self.client, self.split_every = client, split_every
        by_key = {future.key: future for future in futures_of([x, y])}
        self.x_blocks = [by_key[key] for key in flatten(x.__dask_keys__())]
        self.y_blocks = [by_key[key] for key in flatten(y.__dask_keys__())]
        self.bounds = np.asarray(_bounds(x.chunks[0]))
        self.model = client.submit(_held, model, pure=False)  # the layers, sent once; weights go every step

    def __call__(self, model, loss_fn, optimizer, batch):
        submit = self.client.submit
        # The weights travel inside each task: one hop less than a task of their own, and a task rerun after
        # a lost worker has them wherever it runs.
        weights = tuple(param.copy() for param, _ in model.params())
        shard = np.searchsorted(self.bounds, batch, side="right") - 1
        shares = [submit(_gradient_share, self.model, weights, self.x_blocks[i], self.y_blocks[i],
                         batch[shard == i] - self.bounds[i], len(batch), pure=False)
                  for i in np.unique(shard)]  # in shard order: the sums' order depends only on the data
        while len(shares) > self.split_every:
            shares = [submit(_sum_shares, *shares[i:i + self.split_every], pure=False)
                      for i in range(0, len(shares), self.split_every)]
        grads, loss = _sum_shares(*self.client.gather(shares))
        for (_, grad), total in zip(model.params(), grads):
            grad[...] = total
        optimizer.step()
        return loss


def _held(value):
    return value


def _gradient_share(model, weights, x, y, rows, batch_size):
    """The gradients of the batch's mean loss over the images `rows` of this shard (their share of it)."""
    from .nn import SoftmaxCrossEntropy

    model = copy.deepcopy(model)  # a worker's threads share the one it was sent
    for (param, _), value in zip(model.params(), weights):
        param[...] = value
    loss_fn = SoftmaxCrossEntropy()
    with threads(_kernel_threads()):
        loss = loss_fn.forward(model.forward(x[rows]), y[rows])
        model.backward(loss_fn.backward(), input_grad=False)
    share = len(rows) / batch_size
    return [grad * share for _, grad in model.params()], loss * share


def _sum_shares(*shares):
    grads = [np.sum([share[0][i] for share in shares], axis=0) for i in range(len(shares[0][0]))]
    return grads, sum(share[1] for share in shares)
