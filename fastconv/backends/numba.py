"""The `numba` backend: kernels compiled by Numba (_numba_kernels.py), as two algorithms: `direct` (every
convolution, forward and both gradients) and `pool` (max-pooling forward and backward).

Kernels compile on first use (never at import) and are cached on disk, in a folder named by a digest of
every file they compile from (Numba's own cache watches only the file that defines a kernel, so an edit of
_simd.py would leave stale machine code in use). Every call applies the thread
setting in force (Numba's thread count is per Python thread); problems too small to pay for a parallel
region run on one thread, chosen by size only. Results do not depend on the thread count: every output
is computed by one work item, and the weight gradient adds fixed chunks of the batch in a fixed order.
"""
import contextlib
import functools
import hashlib
import os
from pathlib import Path

import numba
import numpy as np

from ..autotune import cache_dir
from ..ops import Algorithm
from ..params import index_out_of_plane
from ..threads import threads_for

# Every file the kernels compile from.
KERNEL_SOURCES = ("_numba_kernels.py", "_simd.py")


def kernel_cache_dir(sources=Path(__file__).parent):
    """Where the compiled kernels are cached: below NUMBA_CACHE_DIR (or fastconv's cache folder), in a
    folder named by a digest of the KERNEL_SOURCES in `sources`."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        digest.update((sources / name).read_bytes())
    return Path(os.environ.get("NUMBA_CACHE_DIR") or cache_dir()) / f"numba-kernels-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _caching_in(folder):
    """numba.config.CACHE_DIR set while the kernels are defined (each takes its cache location then), and
    restored afterwards: the user's own cached functions stay where they were."""
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(folder)
    try:
        yield
    finally:
        numba.config.CACHE_DIR = previous


with _caching_in(kernel_cache_dir()):
    from . import _numba_kernels as kernels
from ._simd import VECTOR_BYTES  # noqa: E402

# omp runs concurrent calls from several Python threads; workqueue would abort on them.
numba.config.THREADING_LAYER = "omp"


def describe():
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = f"{numba.config.THREADING_LAYER} (requested)"
    return f"numba {numba.__version__}, threading layer {layer}, register tiles of {8 * VECTOR_BYTES}-bit vectors"


def _use_threads(work):
    """Apply the thread setting to this Python thread's Numba (its count is per Python thread): one thread
    for small work (multiply-adds, or elements for pooling)."""
    numba.set_num_threads(min(threads_for(work), numba.config.NUMBA_NUM_THREADS))


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _source(a, up, pad, stride, sub_shape, tail, fold=1, check_finite=False):
    """a (N, C, H, W) upsampled by `up` or split into stride phases of sub_shape each (see _numba_kernels),
    padded by `pad` (top, left; negative crops), `fold` images side by side per flat source image, plus a
    zero tail `tail` long; and, if check_finite, whether it is all finite."""
    n, c = a.shape[:2]
    sub_h, sub_w = sub_shape
    source = np.empty((-(-n // fold), c * stride[0] * stride[1] * sub_h * sub_w * fold + tail), a.dtype)
    non_finite = kernels.build_source(a, source, up[0], up[1], pad[0], pad[1], stride[0], stride[1], sub_h, sub_w,
                                      fold, check_finite)
    return source, non_finite == 0


@functools.lru_cache(maxsize=256)
def _tap_offsets(groups, per_group, kernel, stride, dilation, sub_shape, taps_padded, tail_start):
    """offsets[g, k]: where tap k = (channel, kh, kw) of group g starts in a source image (stride phase,
    then shift); taps past the real ones point at the zero tail. Remembered per layout (building them is a
    visible share of a small call), so the array is shared: the kernels only read it."""
    (kh, kw), (sh, sw), (dh, dw), (sub_h, sub_w) = kernel, stride, dilation, sub_shape
    channel = np.arange(groups)[:, None, None, None] * per_group + np.arange(per_group)[None, :, None, None]
    rows, cols = np.arange(kh)[:, None] * dh, np.arange(kw)[None, :] * dw
    phase = (channel * sh + rows % sh) * sw + cols % sw
    offsets = phase * (sub_h * sub_w) + (rows // sh) * sub_w + cols // sw
    packed = np.full((groups, taps_padded), tail_start, np.int64)
    packed[:, :per_group * kh * kw] = offsets.reshape(groups, -1)
    return packed


def _packed_weights(w, groups):
    """(C_out, Cg, KH, KW) as (G, blocks of 4 output channels, Cg*KH*KW, 4), zero rows past C_out/G: each
    tap's 4 weights of a block side by side, as the register tile reads them."""
    per_group = w.shape[0] // groups
    flat = w.reshape(groups, per_group, -1)
    packed = np.zeros((groups, _round_up(per_group, 4), flat.shape[2]), w.dtype)
    packed[:, :per_group] = flat
    return np.ascontiguousarray(packed.reshape(groups, -1, 4, flat.shape[2]).transpose(0, 1, 3, 2))


ROWS_PER_TILE = 2048  # output elements (whole rows) of one work item at most; small planes fold images to fill it
# A tile's input (a run of every input channel of a group) should stay in a core's L2 cache: each of the
# tile's blocks of output channels reads all of it again (stride phases are not counted: a strided layer's
# tiles would get too short).
TILE_INPUT_BYTES = 1 << 19


def _tile_elements(channels_per_group, itemsize):
    """Outputs per work item: ROWS_PER_TILE, or fewer where that many of every input channel would not fit
    TILE_INPUT_BYTES (wide layers), but never fewer than a quarter of it."""
    fitting = TILE_INPUT_BYTES // (channels_per_group * itemsize)
    return max(ROWS_PER_TILE // 4, min(ROWS_PER_TILE, fitting))


def _fold(batch, out_height, row, tile_elements=ROWS_PER_TILE):
    """How many images to put side by side in each source row: enough for runs of about tile_elements."""
    return max(1, min(batch, tile_elements // (out_height * row)))


def _correlate(source_of, weights, groups, kernel, stride, dilation, sub_shape, bias, out):
    """out = the stride-1 correlation of the source with the packed taps (see _numba_kernels.correlate).
    Small planes put several images side by side in each source row: longer runs per weight block."""
    packed = _packed_weights(weights, groups)
    tile_elements = _tile_elements(weights.shape[1], weights.itemsize)
    fold = _fold(out.shape[0], out.shape[2], sub_shape[1], tile_elements)
    wide_shape = (sub_shape[0], fold * sub_shape[1])
    row = wide_shape[1]
    tail = kernels.TILE_VECTORS * VECTOR_BYTES // out.itemsize  # a register tile's overrun past the last row
    source = source_of(tail, fold)
    offsets = _tap_offsets(groups, weights.shape[1], kernel, stride, dilation, wide_shape, packed.shape[2],
                           source.shape[1] - tail)
    if offsets.max() + out.shape[2] * row + tail > source.shape[1]:  # the tile's loads are unchecked
        raise RuntimeError(f"numba:direct would read past its source ({source.shape}) for {out.shape}")
    kernels.correlate(source, packed, offsets, bias, out, row, fold, tile_elements)
    return out


def _forward_layout(p):
    """Stride-phase sub-image shape of the padded input; one extra row keeps the wide rows' reads inside."""
    (sh, sw) = p.stride
    return (-(-p.padded_height // sh) + 1, -(-p.padded_width // sw))


def conv2d_forward(x, w, b, p):
    _use_threads(p.work)
    sub_shape = _forward_layout(p)
    top, _, left, _ = p.padding
    bias = np.zeros(p.out_channels, x.dtype) if b is None else b
    out = np.empty(p.output_shape, x.dtype)
    return _correlate(lambda tail, fold: _source(x, (1, 1), (top, left), p.stride, sub_shape, tail, fold)[0], w,
                      p.groups, (p.kernel_height, p.kernel_width), p.stride, p.dilation, sub_shape, bias, out)


def conv2d_backward_input(gy, w, p):
    """A stride-1 correlation of the zero-upsampled, padded output gradient with the flipped kernel,
    input and output channels swapped within each group: each input pixel gathers what it receives."""
    _use_threads(p.work)
    kh, kw = p.kernel_height, p.kernel_width
    (dh, dw), (top, _, left, _) = p.dilation, p.padding
    span_h, span_w = dh * (kh - 1), dw * (kw - 1)
    sub_shape = (p.in_height + span_h + 1, p.in_width + span_w)
    per_group = p.out_channels // p.groups
    flipped = (w[:, :, ::-1, ::-1].reshape(p.groups, per_group, w.shape[1], kh, kw).transpose(0, 2, 1, 3, 4)
               .reshape(p.in_channels, per_group, kh, kw))
    out = np.empty(p.input_shape, gy.dtype)
    return _correlate(lambda tail, fold: _source(gy, p.stride, (span_h - top, span_w - left), (1, 1), sub_shape,
                                                 tail, fold)[0],
                      np.ascontiguousarray(flipped), p.groups, (kh, kw), (1, 1), p.dilation, sub_shape,
                      np.zeros(p.in_channels, gy.dtype), out)


def conv2d_backward_weight(gy, x, p):
    _use_threads(p.work)
    sub_shape = _forward_layout(p)
    top, _, left, _ = p.padding
    fold = _fold(p.batch, p.out_height, sub_shape[1])
    wide_shape = (sub_shape[0], fold * sub_shape[1])
    row = wide_shape[1]
    length = p.out_height * row
    per_group, channels_per_group = p.out_channels // p.groups, p.in_channels // p.groups
    taps = channels_per_group * p.kernel_height * p.kernel_width
    rows_padded, taps_padded = _round_up(per_group, 4), _round_up(taps, kernels.TAPS_WEIGHT)
    source, finite = _source(x, (1, 1), (top, left), p.stride, sub_shape, length, fold, check_finite=True)
    offsets = _tap_offsets(p.groups, channels_per_group, (p.kernel_height, p.kernel_width), p.stride,
                           p.dilation, wide_shape, taps_padded, source.shape[1] - length)
    grad_rows = np.empty((source.shape[0], p.groups, rows_padded, length), gy.dtype)
    kernels.spread_rows(gy.reshape(p.batch, p.groups, per_group, p.out_height, p.out_width), grad_rows, row, fold)
    chunks = -(-source.shape[0] // kernels.WEIGHT_CHUNK)
    partials = np.empty((chunks, p.groups, rows_padded, taps_padded), np.float64)
    # Wide rows are exact only for a finite source: elsewhere sum the real columns only (see weight_partials),
    # one run per output row of each image.
    runs = (1, length, length) if finite else (p.out_height * fold, sub_shape[1], p.out_width)
    kernels.weight_partials(source, grad_rows, offsets, partials, *runs)
    total = partials[0] if chunks == 1 else partials.sum(axis=0)
    return np.ascontiguousarray(total[:, :per_group, :taps].reshape(p.weight_shape), dtype=gy.dtype)


def max_pool2d_forward(x, p):
    _use_threads(p.work)
    y = np.empty(p.output_shape, x.dtype)
    indices = np.empty(p.output_shape, np.int64)
    kernels.max_pool_forward(x, y, indices, p.kernel_height, p.kernel_width, *p.stride, *p.padding, *p.dilation)
    return y, indices if p.with_indices else None  # its kernel has no values-only path


def max_pool2d_backward(gy, indices, p):
    _use_threads(p.work)
    gx = np.empty(p.input_shape, gy.dtype)
    bad = np.zeros((p.input_shape[0] * p.input_shape[1], 2), np.int64)
    kernels.max_pool_backward(gy, indices, gx, bad)
    flagged = np.flatnonzero(bad[:, 0])
    if flagged.size:
        raise index_out_of_plane(int(bad[flagged[0], 1]), p.input_shape)
    return gx


ALGORITHMS = (
    Algorithm("direct", {"conv2d_forward": conv2d_forward, "conv2d_backward_input": conv2d_backward_input,
                         "conv2d_backward_weight": conv2d_backward_weight}),
    Algorithm("pool", {"max_pool2d_forward": max_pool2d_forward, "max_pool2d_backward": max_pool2d_backward}),
)
