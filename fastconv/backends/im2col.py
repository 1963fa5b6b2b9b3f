"""im2col + BLAS: the classic GEMM formulation, in NumPy.

Forward:      Y_g (C_out/g x L) = W_g (C_out/g x K) @ cols_g (K x L),   K = C_in/g * KH * KW
Grad weight:  dW_g += dY_g (C_out/g x L) @ cols_g^T (L x K)
Grad input:   dcols_g = W_g^T @ dY_g, then col2im adds each kernel tap's slab of dcols back into dX.

`cols` holds, for each (channel, kh, kw), the input pixels that kernel tap sees at every output pixel of
a unit of work: a chunk of images, or a band of output rows of one image when a single image's columns
exceed the workspace cap (`set_workspace_limit`), so memory does not grow with the batch.

Stride-1 convolutions use "wide" rows: each output row is computed over the whole padded width, so a
tap's slab of cols is one contiguous run of the padded input and im2col/col2im are plain block copies
and adds. The extra columns (padded width - output width) are computed and dropped. Other strides fill
cols tap by tap from strided views of the input, with zeros where a tap falls in padding.

Copies and col2im adds run on a small pool of Python threads (NumPy releases the GIL), split by channel
or image blocks so no two threads write the same memory and results do not depend on the thread count;
the GEMMs run on BLAS's own threads, with one unit's partials added in unit order.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..params import index_out_of_plane
from ..threads import apply_to_blas, get_num_threads

_workspace = {"limit": int(os.environ.get("FASTCONV_IM2COL_WORKSPACE_BYTES", 32 << 20))}
_executor = {"pool": None}
_executor_lock = threading.Lock()


def set_workspace_limit(nbytes: int) -> None:
    """Cap the column buffer of one unit of work (default 32 MiB; env FASTCONV_IM2COL_WORKSPACE_BYTES)."""
    if nbytes < 1:
        raise ValueError(f"nbytes must be >= 1, got {nbytes}")
    _workspace["limit"] = int(nbytes)


def supports(op, p, dtype):
    return None


def describe():
    return f"NumPy {np.__version__} matmul on BLAS threads, copies on a thread pool, column cap {_workspace['limit']} B"


def _run_parallel(task, blocks):
    """task(block) for every block, on up to get_num_threads() threads; blocks never write the same memory."""
    if get_num_threads() == 1 or len(blocks) == 1:
        for block in blocks:
            task(block)
        return
    with _executor_lock:
        if _executor["pool"] is None:
            _executor["pool"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                   thread_name_prefix="fastconv-im2col")
    for future in [_executor["pool"].submit(task, block) for block in blocks]:
        future.result()


def _blocks(channels, images):
    """(channel slice, image slice) blocks, one per thread: by channel when there are enough channels,
    else by image."""
    n = get_num_threads()
    if channels >= n or images < n:
        return [(slice(c[0], c[-1] + 1), slice(0, images)) for c in np.array_split(np.arange(channels), n) if c.size]
    return [(slice(0, channels), slice(i[0], i[-1] + 1)) for i in np.array_split(np.arange(images), n) if i.size]


def _tap_range(out_start, out_stop, size, stride, pad, offset):
    """Along one axis, the output positions [lo, hi) (relative to out_start) at which the tap at
    `offset` (= kernel index * dilation) lands inside the input, and the input slice it reads there."""
    lo = max(out_start, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(out_stop, (size - 1 + pad - offset) // stride + 1)
    if hi <= lo:
        return 0, 0, slice(0, 0)
    first = lo * stride - pad + offset
    return lo - out_start, hi - out_start, slice(first, first + (hi - lo - 1) * stride + 1, stride)


def _taps(kernel, size, stride, pad, dilation, out_start, out_stop):
    return [_tap_range(out_start, out_stop, size, stride, pad, k * dilation) for k in range(kernel)]


def _is_pointwise(p):
    """A 1x1, stride-1, unpadded convolution is a plain GEMM on the input: no unfolding."""
    return (p.kernel_height, p.kernel_width, p.stride, p.padding) == (1, 1, (1, 1), (0, 0, 0, 0))


def _group_matrices(a, groups, columns):
    """A C-contiguous array whose leading axis splits into groups, as one (rows x columns) matrix per group."""
    return a.reshape(groups, -1, columns)


class _Unfolding:
    """The workspace and the unfold/fold steps of one convolution, unit of work by unit of work."""

    def __init__(self, p, dtype):
        self.p = p
        self.wide = p.stride == (1, 1)
        self.row_width = p.padded_width if self.wide else p.out_width
        taps = p.in_channels * p.kernel_height * p.kernel_width
        per_row = taps * self.row_width * np.dtype(dtype).itemsize
        rows_fit = max(1, _workspace["limit"] // per_row)
        if rows_fit < p.out_height:
            self.units = [(slice(n, n + 1), slice(r, min(r + rows_fit, p.out_height)))
                          for n in range(p.batch) for r in range(0, p.out_height, rows_fit)]
        else:
            images = min(p.batch, rows_fit // p.out_height)
            self.units = [(slice(n, min(n + images, p.batch)), slice(0, p.out_height))
                          for n in range(0, p.batch, images)]
        unit_images = self.units[0][0].stop - self.units[0][0].start
        unit_rows = self.units[0][1].stop - self.units[0][1].start
        self.cols = np.empty(taps * unit_images * unit_rows * self.row_width, dtype)
        self.out = np.empty(p.out_channels * unit_images * unit_rows * self.row_width, dtype)
        if self.wide:  # the padded input rows one unit reads, plus one row for the last tap's overrun
            self.band_height = unit_rows + p.dilation[0] * (p.kernel_height - 1) + 1
            self.padded = np.zeros((unit_images, p.in_channels, self.band_height, p.padded_width), dtype)

    def _view(self, flat, leading, images, rows):
        shape = leading + (images.stop - images.start, rows.stop - rows.start, self.row_width)
        return flat[:int(np.prod(shape))].reshape(shape)

    def columns(self, images, rows):
        """The (C_in, KH, KW, nb, rows, row_width) column buffer of a unit."""
        p = self.p
        return self._view(self.cols, (p.in_channels, p.kernel_height, p.kernel_width), images, rows)

    def outputs(self, images, rows):
        """The (C_out, nb, rows, row_width) buffer of a unit's output or grad_output, channels first."""
        return self._view(self.out, (self.p.out_channels,), images, rows)

    def _band(self, rows):
        """For a wide unit: the input rows [start, stop) it reads and where they sit in the padded band."""
        top = rows.start - self.p.padding[0]  # input row of the band's first row
        start, stop = max(0, top), min(self.p.in_height, top + self.band_height - 1)
        return start, stop, start - top

    def _tap_offsets(self):
        p = self.p
        return [(kh, kw, kh * p.dilation[0] * p.padded_width + kw * p.dilation[1])
                for kh in range(p.kernel_height) for kw in range(p.kernel_width)]

    def unfold(self, x, images, rows):
        """im2col: fill and return the unit's column buffer from x."""
        p, cols = self.p, self.columns(images, rows)
        nb, nr = images.stop - images.start, rows.stop - rows.start
        if self.wide:
            start, stop, at = self._band(rows)
            band = self.padded[:nb]
            left = p.padding[2]
            run = nr * p.padded_width

            def fill(block):
                channels, part = block
                dst = band[part, channels]
                dst[:, :, :at] = 0
                dst[:, :, at + stop - start:] = 0
                dst[:, :, at:at + stop - start, left:left + p.in_width] = x[images][part, channels, start:stop]
                flat = dst.reshape(dst.shape[0], dst.shape[1], -1).transpose(1, 0, 2)  # (c, n, band)
                for kh, kw, offset in self._tap_offsets():
                    cols[channels, kh, kw, part].reshape(flat.shape[0], flat.shape[1], run)[...] = \
                        flat[:, :, offset:offset + run]
        else:
            taps = self._strided_taps(rows)

            def fill(block):
                channels, part = block
                src = x[images][part, channels].transpose(1, 0, 2, 3)  # (c, n, H, W)
                for kh, kw, (i_lo, i_hi, in_rows), (j_lo, j_hi, in_cols) in taps:
                    dst = cols[channels, kh, kw, part]
                    dst[:, :, :i_lo] = 0  # taps that fall in padding read zeros
                    dst[:, :, i_hi:] = 0
                    dst[:, :, i_lo:i_hi, :j_lo] = 0
                    dst[:, :, i_lo:i_hi, j_hi:] = 0
                    dst[:, :, i_lo:i_hi, j_lo:j_hi] = src[:, :, in_rows, in_cols]

        _run_parallel(fill, _blocks(p.in_channels, nb))
        return cols

    def fold(self, dcols, gx, images, rows):
        """col2im: add the unit's column gradients into gx (which starts at zero)."""
        p = self.p
        nb, nr = images.stop - images.start, rows.stop - rows.start
        if self.wide:
            start, stop, at = self._band(rows)
            band = self.padded[:nb]
            left = p.padding[2]
            run = nr * p.padded_width

            def add(block):
                channels, part = block
                acc = band[part, channels]
                acc[...] = 0
                flat = acc.reshape(acc.shape[0], acc.shape[1], -1).transpose(1, 0, 2)
                for kh, kw, offset in self._tap_offsets():
                    flat[:, :, offset:offset + run] += dcols[channels, kh, kw, part].reshape(flat.shape[0], -1, run)
                gx[images][part, channels, start:stop] += acc[:, :, at:at + stop - start, left:left + p.in_width]
        else:
            taps = self._strided_taps(rows)

            def add(block):
                channels, part = block
                dst = gx[images][part, channels].transpose(1, 0, 2, 3)
                for kh, kw, (i_lo, i_hi, in_rows), (j_lo, j_hi, in_cols) in taps:
                    dst[:, :, in_rows, in_cols] += dcols[channels, kh, kw, part, i_lo:i_hi, j_lo:j_hi]

        _run_parallel(add, _blocks(p.in_channels, nb))

    def _strided_taps(self, rows):
        """For every kernel tap (kh, kw): its valid output rows and columns and the input slices they read."""
        p = self.p
        tap_rows = _taps(p.kernel_height, p.in_height, p.stride[0], p.padding[0], p.dilation[0], rows.start, rows.stop)
        tap_cols = _taps(p.kernel_width, p.in_width, p.stride[1], p.padding[2], p.dilation[1], 0, p.out_width)
        return [(kh, kw, tap_rows[kh], tap_cols[kw]) for kh in range(p.kernel_height) for kw in range(p.kernel_width)]


def conv2d_forward(x, w, b, p):
    apply_to_blas(get_num_threads())
    y = np.empty(p.output_shape, x.dtype)
    wg = _group_matrices(w, p.groups, w[0].size)
    if _is_pointwise(p):
        xg = x.reshape(p.batch, p.groups, p.in_channels // p.groups, -1)
        yg = y.reshape(p.batch, p.groups, p.out_channels // p.groups, -1)
        for g in range(p.groups):
            np.matmul(wg[g], xg[:, g], out=yg[:, g])
        if b is not None:
            y += b[:, None, None]
        return y
    unfolding = _Unfolding(p, x.dtype)
    for images, rows in unfolding.units:
        cols, out = unfolding.unfold(x, images, rows), unfolding.outputs(images, rows)
        columns = out[0].size
        colsg, outg = _group_matrices(cols, p.groups, columns), _group_matrices(out, p.groups, columns)
        for g in range(p.groups):
            np.matmul(wg[g], colsg[g], out=outg[g])
        dst, src = y[images, :, rows].transpose(1, 0, 2, 3), out[..., :p.out_width]
        if b is None:
            dst[...] = src
        else:
            np.add(src, b[:, None, None, None], out=dst)
    return y


def _grad_output_unit(unfolding, gy, images, rows):
    """The unit's grad_output, channels first, zero in the extra columns of wide rows."""
    gyt = unfolding.outputs(images, rows)
    width = unfolding.p.out_width
    gyt[..., :width] = gy[images, :, rows].transpose(1, 0, 2, 3)
    gyt[..., width:] = 0
    return gyt


def conv2d_backward_weight(gy, x, p):
    apply_to_blas(get_num_threads())
    gw = np.zeros(p.weight_shape, gy.dtype)
    gwg = _group_matrices(gw, p.groups, gw[0].size)
    if _is_pointwise(p):
        xg = x.reshape(p.batch, p.groups, p.in_channels // p.groups, -1)
        gyg = gy.reshape(p.batch, p.groups, p.out_channels // p.groups, -1)
        for n in range(p.batch):  # one partial per image, added in image order
            for g in range(p.groups):
                gwg[g] += gyg[n, g] @ xg[n, g].T
        return gw
    unfolding = _Unfolding(p, x.dtype)
    for images, rows in unfolding.units:
        cols, gyt = unfolding.unfold(x, images, rows), _grad_output_unit(unfolding, gy, images, rows)
        columns = gyt[0].size
        colsg, gytg = _group_matrices(cols, p.groups, columns), _group_matrices(gyt, p.groups, columns)
        for g in range(p.groups):  # one partial per unit, added in unit order
            gwg[g] += gytg[g] @ colsg[g].T
    return gw


def conv2d_backward_input(gy, w, p):
    apply_to_blas(get_num_threads())
    wg = _group_matrices(w, p.groups, w[0].size)
    if _is_pointwise(p):
        gx = np.empty(p.input_shape, gy.dtype)
        gyg = gy.reshape(p.batch, p.groups, p.out_channels // p.groups, -1)
        gxg = gx.reshape(p.batch, p.groups, p.in_channels // p.groups, -1)
        for g in range(p.groups):
            np.matmul(wg[g].T, gyg[:, g], out=gxg[:, g])
        return gx
    gx = np.zeros(p.input_shape, gy.dtype)
    unfolding = _Unfolding(p, gy.dtype)
    for images, rows in unfolding.units:
        gyt, dcols = _grad_output_unit(unfolding, gy, images, rows), unfolding.columns(images, rows)
        columns = gyt[0].size
        dcolsg, gytg = _group_matrices(dcols, p.groups, columns), _group_matrices(gyt, p.groups, columns)
        for g in range(p.groups):
            np.matmul(wg[g].T, gytg[g], out=dcolsg[g])
        unfolding.fold(dcols, gx, images, rows)
    return gx


def max_pool2d_forward(x, p):
    """One pass per window tap in row-major order over a strided view: a tap replaces the running best
    where it is greater or NaN (first max wins a tie, last NaN wins). Taps in padding are skipped, and
    each window's first in-bounds cell sets the initial value and index."""
    shape = p.output_shape
    rows = _taps(p.kernel_height, p.in_height, p.stride[0], p.padding[0], p.dilation[0], 0, p.out_height)
    cols = _taps(p.kernel_width, p.in_width, p.stride[1], p.padding[1], p.dilation[1], 0, p.out_width)
    best = np.full(shape, np.nan, x.dtype)  # every cell is overwritten by its window's first in-bounds tap
    indices = np.full(shape, -1, np.int64)
    mask = np.empty(shape, bool)
    for i_lo, i_hi, in_rows in rows:
        for j_lo, j_hi, in_cols in cols:
            if i_hi <= i_lo or j_hi <= j_lo:
                continue
            values = x[:, :, in_rows, in_cols]
            flat = (np.arange(in_rows.start, in_rows.stop, in_rows.step)[:, None] * p.in_width
                    + np.arange(in_cols.start, in_cols.stop, in_cols.step))
            window = (slice(None), slice(None), slice(i_lo, i_hi), slice(j_lo, j_hi))
            b, idx, m = best[window], indices[window], mask[window]
            np.greater(values, b, out=m)
            m |= np.isnan(values)
            m |= idx < 0  # the window's first in-bounds tap
            np.copyto(b, values, where=m)
            np.copyto(idx, flat, where=m)
    return best, indices


def max_pool2d_backward(gy, indices, input_shape):
    """A scatter-add by index; np.ravel_multi_index rejects an index outside its plane in the same pass
    that turns plane-local indices into flat ones."""
    planes, plane_size = input_shape[0] * input_shape[1], input_shape[2] * input_shape[3]
    local = indices.reshape(planes, -1)
    try:
        flat = np.ravel_multi_index((np.arange(planes)[:, None], local), (planes, plane_size))
    except ValueError:
        bad = local[(local < 0) | (local >= plane_size)][0]
        raise index_out_of_plane(bad, input_shape) from None
    # bincount sums in float64, in index order: deterministic, and exact enough for float32 too.
    gx = np.bincount(flat.ravel(), weights=gy.ravel(), minlength=planes * plane_size)
    return gx.astype(gy.dtype, copy=False).reshape(input_shape)
