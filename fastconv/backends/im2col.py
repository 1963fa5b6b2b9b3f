"""im2col + BLAS: the classic GEMM formulation, in NumPy.

Forward:      Y_g (C_out/g x L) = W_g (C_out/g x K) @ cols_g (K x L),   K = C_in/g * KH * KW
Grad weight:  dW_g += dY_g (C_out/g x L) @ cols_g^T (L x K)
Grad input:   dcols_g = W_g^T @ dY_g, then col2im adds each kernel tap's slab of dcols back into dX.

`cols` holds, for each (channel, kh, kw), the input pixels that kernel tap sees at every output pixel of
a unit of work: a chunk of images, or a band of output rows of one image when a single image's columns
exceed the workspace cap (`set_workspace_limit`), so memory does not grow with the batch.

Stride-1 convolutions use "wide" rows: each output row is computed over a whole row of the padded input,
so a tap's slab of cols is one contiguous run of it and im2col/col2im are plain block copies and adds.
The extra columns (row pitch - output width) are computed and dropped. Neighbouring rows share their
padding columns (the pitch is W + max(left, right) pads, not W + both): a tap reaching past a row's right
end reads the next row's left padding, zeros too. Other strides fill cols tap by tap from strided views
of the input, with zeros where a tap falls in padding.

Three algorithms: `gemm` (the above, for every convolution), `pointwise` (1x1, stride 1, unpadded: the
input is its own column matrix) and `rowshift`, which most stride-1 layers prefer (_row_shifted_wins): cols
holds the taps of one kernel row only (KW slabs instead of KH * KW), and kernel row kh's contribution to
output row r is its product with cols at row r + kh * dilation. The forward is then one GEMM of every kernel
row's weights, (KH * C_out/g x C_in/g * KW) @ cols, and a sum of KH row-shifted slices of the product; the
weight gradient is one GEMM per kernel row against cols shifted by its rows. A third of the copying for
3x3, and a squarer GEMM, which OpenBLAS runs faster.

Units run on the calling thread and a small pool of Python threads (NumPy releases the GIL), each with
its own workspace and a single-threaded BLAS: one thread's unfolding overlaps the other's GEMM, and a
GEMM per core is more efficient than one GEMM split over the cores at these shapes. Every NumPy call hands
the GIL over between the threads, which costs most when a thread has to be woken, so a unit makes few
calls. Weight-gradient partials are added in unit order, so results do not depend on the thread count
for a given plan of units.
"""
import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..ops import POOL_OPS, Algorithm
from ..params import index_out_of_plane
from ..threads import SERIAL_WORK, blas_threads, get_num_threads, threads_for

_workspace = {"limit": int(os.environ.get("FASTCONV_IM2COL_WORKSPACE_BYTES", 16 << 20))}
_executor = {"pool": None}
_executor_lock = threading.Lock()


def set_workspace_limit(nbytes: int) -> None:
    """Cap the column buffers of one call, all threads together (default 16 MiB; env
    FASTCONV_IM2COL_WORKSPACE_BYTES)."""
    if nbytes < 1:
        raise ValueError(f"nbytes must be >= 1, got {nbytes}")
    _workspace["limit"] = int(nbytes)


def describe():
    return f"NumPy {np.__version__} matmul, one BLAS thread per worker thread, column cap {_workspace['limit']} B"


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


def _row_shifted_wins(p):
    """Whether row-shifted (see _Unfolding.row_shifted_forward) comes before im2col + GEMM in the default
    order for the stride-1 convolution p: it copies a kernel row's taps instead of every tap, and its GEMM
    (KH * C_out/G x C_in/G * KW) has a better shape than im2col's (C_out/G x C_in/G * KH * KW), but it
    computes the `span` rows below each unit's rows too. It wins where a kernel row has enough taps
    (C_in/G * KW >= 16) and the span is small against the output's height, or where im2col's GEMM has few
    rows (C_out/G < 16)."""
    span = p.dilation[0] * (p.kernel_height - 1)
    return (p.stride == (1, 1) and p.kernel_height > 1 and p.in_channels // p.groups * p.kernel_width >= 16
            and (8 * span <= p.out_height or p.out_channels // p.groups < 16))


def _group_matrices(a, groups, columns):
    """A C-contiguous array whose leading axis splits into groups, as one (rows x columns) matrix per group."""
    return a.reshape(groups, -1, columns)


def _blas_limit(p, n):
    """BLAS limited to n threads for a serial unit loop; tiny problems leave BLAS alone
    (OpenBLAS runs GEMMs that small on one thread anyway, and the limit costs microseconds)."""
    return blas_threads(n) if p.work >= SERIAL_WORK else contextlib.nullcontext()


def _row_width(p):
    """The columns computed per output row: the wide rows' pitch at stride 1 (see the module's docstring),
    else the output's width."""
    if p.stride != (1, 1):
        return p.out_width
    return p.in_width + max(p.padding[2], p.padding[3], p.out_width - p.in_width)


def _plan(p, itemsize, workers, row_shifted, folds):
    """Units of work, (image slice, output-row slice), in groups that one worker takes in turn: bands of
    rows of one image are grouped when the work folds (col2im adds them into overlapping input rows)."""
    row_width = _row_width(p)
    span, per_row = 0, p.in_channels * p.kernel_height * p.kernel_width * row_width * itemsize
    if row_shifted:  # columns of one kernel row and products of every kernel row, over `span` rows more
        span = p.dilation[0] * (p.kernel_height - 1)
        per_row = (p.in_channels * p.kernel_width + p.kernel_height * p.out_channels) * row_width * itemsize
    rows_fit = max(1, _workspace["limit"] // workers // per_row - span)
    if p.batch < workers:  # bands of rows, so that every worker gets a unit
        rows_fit = min(rows_fit, -(-p.out_height // workers))
    if rows_fit < p.out_height:
        rows_fit = -(-p.out_height // -(-p.out_height // rows_fit))  # bands of equal height
        bands = [[(slice(n, n + 1), slice(r, min(r + rows_fit, p.out_height)))
                  for r in range(0, p.out_height, rows_fit)] for n in range(p.batch)]
        return bands if folds else [[unit] for image in bands for unit in image]
    images = max(1, min(-(-p.batch // workers), rows_fit // p.out_height))  # every worker gets a unit
    return [[(slice(n, min(n + images, p.batch)), slice(0, p.out_height))] for n in range(0, p.batch, images)]


def _for_each_unit(p, dtype, work, row_shifted=False, folds=False, workspace=True):
    """work(unfolding, index, unit) for every unit, in parallel over groups of units; each worker thread
    owns one _Unfolding (its workspace, for im2col or for the row-shifted path; None without `workspace`).
    Units are numbered in order; claimed in order. BLAS runs single-threaded inside the workers: OpenBLAS's
    own threads would keep spinning for a while after each call and slow whatever runs next (measured:
    2-3x on the next millisecond-long kernel of another library)."""
    workers = threads_for(p.work)
    groups = _plan(p, np.dtype(dtype).itemsize, workers, row_shifted, folds)
    numbered, index = [], 0
    for group in groups:
        numbered.append([(index + k, unit) for k, unit in enumerate(group)])
        index += len(group)
    largest = max((u for g in groups for u in g), key=lambda u: (u[0].stop - u[0].start) * (u[1].stop - u[1].start))

    def new_unfolding():
        return _Unfolding(p, dtype, largest, row_shifted) if workspace else None

    if workers == 1 or len(groups) == 1:
        unfolding = new_unfolding()
        with _blas_limit(p, get_num_threads()):
            for group in numbered:
                for index, unit in group:
                    work(unfolding, index, unit)
        return
    claim, lock = iter(numbered), threading.Lock()

    def worker():
        unfolding = new_unfolding()
        while True:
            with lock:
                group = next(claim, None)
            if group is None:
                return
            for index, unit in group:
                work(unfolding, index, unit)

    with _executor_lock:
        if _executor["pool"] is None:
            _executor["pool"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                   thread_name_prefix="fastconv-im2col")
    with blas_threads(1):
        # The calling thread is one of the workers: a thread asleep takes long to wake in a virtual machine.
        helpers = [_executor["pool"].submit(worker) for _ in range(min(workers, len(groups)) - 1)]
        try:
            worker()
        finally:  # the helpers are done with the caller's arrays before it returns, or raises
            for future in helpers:
                future.result()


class _InOrder:
    """Adds per-unit partial sums into a total in unit order, whichever worker finishes first: the sum
    does not depend on the thread count or on timing. A partial that arrives before its turn waits in
    `pending` and the worker goes on (waiting for the turn made the workers step in lockstep); a worker
    waits only when it is `ahead` units in front of the next partial due, which bounds the memory."""

    def __init__(self, total, ahead):
        self.total, self.ahead, self.next, self.pending, self.turn = total, ahead, 0, {}, threading.Condition()

    def add(self, index, partial):
        with self.turn:
            self.turn.wait_for(lambda: index - self.next < self.ahead)
            self.pending[index] = partial
            while self.next in self.pending:
                self.total += self.pending.pop(self.next)
                self.next += 1
            self.turn.notify_all()


class _Unfolding:
    """One worker's workspace and the unfold (im2col) and fold (col2im) of units of work. One per worker
    and call, which either unfolds or folds: an unfold trusts the zeros it left around the input rows."""

    def __init__(self, p, dtype, largest_unit, row_shifted):
        self.p = p
        self.wide = p.stride == (1, 1)
        self.row_width = _row_width(p)
        images, rows = (s.stop - s.start for s in largest_unit)
        self.span = p.dilation[0] * (p.kernel_height - 1) if self.wide else 0  # the rows a band reads beyond its own
        if row_shifted:  # taps of one kernel row; products of every kernel row
            cols = p.in_channels * p.kernel_width * (rows + self.span)
            out = p.out_channels * p.kernel_height * (rows + self.span)
        else:
            cols, out = p.in_channels * p.kernel_height * p.kernel_width * rows, p.out_channels * rows
        self.cols = np.empty(cols * images * self.row_width, dtype)
        self.out = np.empty(out * images * self.row_width, dtype)
        if self.wide:  # the padded input rows one unit reads, then zero rows for the last tap's overrun
            self.band_rows, self.band_layout, self.band_images = rows + self.span, None, 0
            self.stacked_layout = None  # row_shifted_weight_gradient's zeros around grad_output
            overrun = -(-(p.kernel_width - 1) * p.dilation[1] // self.row_width)
            self.padded = np.zeros((images, p.in_channels, self.band_rows + overrun, self.row_width), dtype)

    def _view(self, flat, leading, images, rows):
        shape = leading + (images.stop - images.start, rows.stop - rows.start, self.row_width)
        return flat[:int(np.prod(shape))].reshape(shape)

    def columns(self, images, rows):
        """The unit's column buffer, (C_in, KH, KW, nb, rows, row_width)."""
        p = self.p
        return self._view(self.cols, (p.in_channels, p.kernel_height, p.kernel_width), images, rows)

    def outputs(self, images, rows):
        """The unit's output or grad_output, channels first: (C_out, nb, rows, row_width)."""
        return self._view(self.out, (self.p.out_channels,), images, rows)

    def _band(self, images, rows):
        """A wide unit's padded band, flattened per (channel, image), and the input rows [start, stop) it
        holds from row `at` on (none, at 0, for a band of rows that lies wholly in the padding)."""
        p = self.p
        top = rows.start - p.padding[0]  # the input row of the band's first row
        start, stop = max(0, top), min(p.in_height, top + self.band_rows)
        band = self.padded[:images.stop - images.start]
        if stop <= start:
            return band, 0, 0, 0
        return band, start, stop, start - top

    def _tap_offsets(self):
        p = self.p
        return [(kh, kw, kh * p.dilation[0] * self.row_width + kw * p.dilation[1])
                for kh in range(p.kernel_height) for kw in range(p.kernel_width)]

    def _strided_taps(self, rows):
        """Every kernel tap (kh, kw) with its valid output rows and columns and the input slices they read."""
        p = self.p
        tap_rows = _taps(p.kernel_height, p.in_height, p.stride[0], p.padding[0], p.dilation[0], rows.start, rows.stop)
        tap_cols = _taps(p.kernel_width, p.in_width, p.stride[1], p.padding[2], p.dilation[1], 0, p.out_width)
        return [(kh, kw, tap_rows[kh], tap_cols[kw]) for kh in range(p.kernel_height) for kw in range(p.kernel_width)]

    def _padded_band(self, x, images, rows):
        """The unit's padded input rows, flattened: (C_in, nb, band height * row_width). The padding rows
        are zeroed only when the rows holding input move (units of whole images all have the same): every
        NumPy call costs a hand-over of the GIL between the worker threads."""
        p = self.p
        band, start, stop, at = self._band(images, rows)
        layout = (at, stop - start)
        if layout != self.band_layout or len(band) > self.band_images:
            band[:, :, :at] = 0
            band[:, :, at + stop - start:] = 0
            self.band_layout, self.band_images = layout, len(band)
        band[:, :, at:at + stop - start, p.padding[2]:p.padding[2] + p.in_width] = x[images, :, start:stop]
        return band.reshape(band.shape[0], band.shape[1], -1).transpose(1, 0, 2)

    def unfold_kernel_row(self, x, images, rows):
        """Stride 1: the columns of one kernel row, (C_in, KW, nb, (rows + span) * row_width): tap kw's
        slab is the padded band shifted by kw * dilation, over the unit's rows and the `span` rows below
        them that the lower kernel rows reach (row_shifted_forward adds those in)."""
        p, flat = self.p, self._padded_band(x, images, rows)
        shape = (p.in_channels, p.kernel_width, flat.shape[1], (rows.stop - rows.start + self.span) * self.row_width)
        cols = self.cols[:math.prod(shape)].reshape(shape)
        # Every tap at once, from overlapping views of the band: one NumPy call instead of KW.
        step = flat.strides[2]
        cols[...] = as_strided(flat, shape, (flat.strides[0], p.dilation[1] * step, flat.strides[1], step),
                               writeable=False)
        return cols

    def row_shifted_forward(self, wk, bias, x, images, rows, y_unit):
        """y_unit (G, C_out/G, nb, rows, out_width) = the unit's forward convolution (+ bias, (G, C_out/G, 1, 1, 1),
        or None), as one GEMM of every kernel row's weights with the columns of one kernel row (a third of
        im2col's copying for 3x3), then the sum of each kernel row's products shifted down by its rows:
        wk is the weight as (G, KH * C_out/G, C_in/G * KW)."""
        p = self.p
        cols = self.unfold_kernel_row(x, images, rows)
        groups, nb, rows_n, width = p.groups, cols.shape[2], rows.stop - rows.start, self.row_width
        colsg = cols.reshape(groups, -1, nb * cols.shape[3])
        out = self.out[:wk.shape[1] * groups * colsg.shape[2]].reshape(groups, wk.shape[1], colsg.shape[2])
        np.matmul(wk, colsg, out=out)
        # Per group, flat whole runs of each kernel row's products: a pixel shifted past its own rows lands
        # in a dropped column or row, and contiguous runs spare NumPy's iteration buffers.
        products = out.reshape(groups, p.kernel_height, -1)
        block = products.shape[2]
        for kh in range(1, p.kernel_height):
            shift = kh * p.dilation[0] * width
            products[:, 0, :block - shift] += products[:, kh, shift:]
        totals = products[:, 0].reshape(groups, -1, nb, rows_n + self.span, width)
        totals = totals[:, :, :, :rows_n, :p.out_width]
        if bias is None:
            y_unit[...] = totals
        else:
            np.add(totals, bias, out=y_unit)

    def row_shifted_weight_gradient(self, gy, x, images, rows):
        """The unit's weight gradient, (G, KH, C_out/G, C_in/G, KW), from the columns of one kernel row:
        kernel row kh pairs output pixel (r, c) with column pixel (r + kh * dilation, c), so one GEMM of
        grad_output stacked KH times, each copy shifted down by its kernel row's rows (zeros elsewhere),
        with the columns' transpose gives every kernel row at once. x must be finite: the zeros meet every
        column pixel, and 0 * inf would be a NaN that PyTorch does not have."""
        p = self.p
        cols = self.unfold_kernel_row(x, images, rows)
        groups, nb, rows_n, width = p.groups, cols.shape[2], rows.stop - rows.start, self.row_width
        stacked = self.out[:p.kernel_height * p.out_channels * nb * cols.shape[3]].reshape(
            groups, p.kernel_height, -1, nb, rows_n + self.span, width)
        if (nb, rows_n) != self.stacked_layout:  # the copies land in the same cells unit after unit
            stacked[...] = 0
            self.stacked_layout = (nb, rows_n)
        gy_unit = gy[images, :, rows].transpose(1, 0, 2, 3).reshape(groups, -1, nb, rows_n, p.out_width)
        # Copy kh sits kh * dilation rows down in block kh: one strided view takes every copy in one call.
        strides = stacked.strides
        copies = as_strided(stacked, (groups, p.kernel_height) + gy_unit.shape[1:],
                            (strides[0], strides[1] + p.dilation[0] * strides[4]) + strides[2:])
        copies[...] = gy_unit[:, None]
        columns = nb * cols.shape[3]
        products = stacked.reshape(groups, -1, columns) @ cols.reshape(groups, -1, columns).transpose(0, 2, 1)
        return products.reshape(groups, p.kernel_height, -1, p.in_channels // groups, p.kernel_width)

    def unfold(self, x, images, rows):
        """im2col: fill and return the unit's column buffer from x."""
        cols = self.columns(images, rows)
        if self.wide:
            flat = self._padded_band(x, images, rows)
            run = cols.shape[4] * cols.shape[5]
            for kh, kw, offset in self._tap_offsets():
                cols[:, kh, kw].reshape(flat.shape[0], flat.shape[1], run)[...] = flat[:, :, offset:offset + run]
            return cols
        src = x[images].transpose(1, 0, 2, 3)  # (c, n, H, W)
        for kh, kw, (i_lo, i_hi, in_rows), (j_lo, j_hi, in_cols) in self._strided_taps(rows):
            dst = cols[:, kh, kw]
            dst[:, :, :i_lo] = 0  # taps that fall in padding read zeros
            dst[:, :, i_hi:] = 0
            dst[:, :, i_lo:i_hi, :j_lo] = 0
            dst[:, :, i_lo:i_hi, j_hi:] = 0
            dst[:, :, i_lo:i_hi, j_lo:j_hi] = src[:, :, in_rows, in_cols]
        return cols

    def fold(self, dcols, gx, images, rows):
        """col2im: add the unit's column gradients into gx."""
        p = self.p
        if self.wide:
            band, start, stop, at = self._band(images, rows)
            band[...] = 0
            flat = band.reshape(band.shape[0], band.shape[1], -1).transpose(1, 0, 2)
            run = dcols.shape[4] * dcols.shape[5]
            for kh, kw, offset in self._tap_offsets():
                flat[:, :, offset:offset + run] += dcols[:, kh, kw].reshape(flat.shape[0], flat.shape[1], run)
            gx[images, :, start:stop] += band[:, :, at:at + stop - start, p.padding[2]:p.padding[2] + p.in_width]
            return
        dst = gx[images].transpose(1, 0, 2, 3)
        for kh, kw, (i_lo, i_hi, in_rows), (j_lo, j_hi, in_cols) in self._strided_taps(rows):
            dst[:, :, in_rows, in_cols] += dcols[:, kh, kw, :, i_lo:i_hi, j_lo:j_hi]


def _pointwise_matrices(a, p, unit):
    """A unit's (images, :, rows) of a (N, C, H, W) array as (images, groups, C/groups, rows*W): the
    per-image, per-group matrices of a 1x1 convolution. A view (the rows span whole widths), so it can
    take a GEMM's output."""
    images, rows = unit
    return a[images, :, rows].reshape(images.stop - images.start, p.groups, a.shape[1] // p.groups, -1)


def _forward_pointwise(x, w, b, p):
    y = np.empty(p.output_shape, x.dtype)
    wg = _group_matrices(w, p.groups, w[0].size)

    def work(unfolding, index, unit):
        np.matmul(wg, _pointwise_matrices(x, p, unit), out=_pointwise_matrices(y, p, unit))
        if b is not None:
            y[unit[0], :, unit[1]] += b[:, None, None]

    _for_each_unit(p, x.dtype, work, workspace=False)
    return y


def _forward_row_shifted(x, w, b, p):
    y = np.empty(p.output_shape, x.dtype)
    per_group = (p.groups, p.out_channels // p.groups)
    wk = np.ascontiguousarray(w.reshape(*per_group, -1, p.kernel_height, p.kernel_width).transpose(0, 3, 1, 2, 4))
    wk = wk.reshape(p.groups, p.kernel_height * per_group[1], -1)
    y_groups = y.reshape(p.batch, *per_group, p.out_height, p.out_width)
    bias = None if b is None else b.reshape(*per_group, 1, 1, 1)

    def work(unfolding, index, unit):
        images, rows = unit
        unfolding.row_shifted_forward(wk, bias, x, images, rows, y_groups[images, :, :, rows].transpose(1, 2, 0, 3, 4))

    _for_each_unit(p, x.dtype, work, row_shifted=True)
    return y


def _forward_gemm(x, w, b, p):
    y = np.empty(p.output_shape, x.dtype)
    wg = _group_matrices(w, p.groups, w[0].size)

    def work(unfolding, index, unit):
        images, rows = unit
        cols, out = unfolding.unfold(x, images, rows), unfolding.outputs(images, rows)
        colsg, outg = _group_matrices(cols, p.groups, out[0].size), _group_matrices(out, p.groups, out[0].size)
        np.matmul(wg, colsg, out=outg)
        dst, src = y[images, :, rows].transpose(1, 0, 2, 3), out[..., :p.out_width]
        if b is None:
            dst[...] = src
        else:
            np.add(src, b[:, None, None, None], out=dst)

    _for_each_unit(p, x.dtype, work)
    return y


def _grad_output_unit(unfolding, gy, images, rows):
    """The unit's grad_output, channels first, zero in the extra columns of wide rows."""
    gyt = unfolding.outputs(images, rows)
    width = unfolding.p.out_width
    gyt[..., :width] = gy[images, :, rows].transpose(1, 0, 2, 3)
    gyt[..., width:] = 0
    return gyt


def _weight_row_shifted(gy, x, p):
    # Row-shifted pairs every input pixel of a unit with grad_output, zeros included, so an inf in x would
    # turn into NaN where PyTorch has none: such inputs (rare; a sum finds them) take the GEMM path.
    if not np.isfinite(x.sum()):
        return _weight_gemm(gy, x, p)
    per_kernel_row = np.zeros((p.groups, p.kernel_height, p.out_channels // p.groups, p.in_channels // p.groups,
                               p.kernel_width), gy.dtype)
    total = _InOrder(per_kernel_row, _partials_ahead())
    _for_each_unit(p, x.dtype, lambda unfolding, index, unit: total.add(
        index, unfolding.row_shifted_weight_gradient(gy, x, *unit)), row_shifted=True)
    return np.ascontiguousarray(per_kernel_row.transpose(0, 2, 3, 1, 4)).reshape(p.weight_shape)


def _weight_pointwise(gy, x, p):
    gw = np.zeros(p.weight_shape, gy.dtype)
    total = _InOrder(gw, _partials_ahead())

    def work(unfolding, index, unit):
        xg, gyg = _pointwise_matrices(x, p, unit), _pointwise_matrices(gy, p, unit)
        partial = gyg[0] @ xg[0].transpose(0, 2, 1)
        for n in range(1, len(xg)):  # image by image: no (images, C_out, C_in) temporary
            partial += gyg[n] @ xg[n].transpose(0, 2, 1)
        total.add(index, partial.reshape(p.weight_shape))

    _for_each_unit(p, x.dtype, work, workspace=False)
    return gw


def _weight_gemm(gy, x, p):
    gw = np.zeros(p.weight_shape, gy.dtype)
    total = _InOrder(gw, _partials_ahead())

    def work(unfolding, index, unit):
        images, rows = unit
        cols, gyt = unfolding.unfold(x, images, rows), _grad_output_unit(unfolding, gy, images, rows)
        cols[..., p.out_width:] = 0  # the dropped columns of wide rows: an inf there times 0 would be NaN
        colsg, gytg = _group_matrices(cols, p.groups, gyt[0].size), _group_matrices(gyt, p.groups, gyt[0].size)
        total.add(index, (gytg @ colsg.transpose(0, 2, 1)).reshape(p.weight_shape))

    _for_each_unit(p, x.dtype, work)
    return gw


def _partials_ahead():
    """Weight-gradient partials that may wait for their turn (_InOrder)."""
    return 2 * get_num_threads()


def _flipped_transposed(w, groups):
    """(C_out, C_in/g, KH, KW) -> (C_in, C_out/g, KH, KW), flipped in KH and KW: the weight of the forward
    convolution that computes a stride-1 input gradient."""
    c_out, c_in_per_group, kh, kw = w.shape
    per_group = w.reshape(groups, c_out // groups, c_in_per_group, kh, kw)[:, :, :, ::-1, ::-1]
    return np.ascontiguousarray(per_group.transpose(0, 2, 1, 3, 4)).reshape(groups * c_in_per_group, -1, kh, kw)


def _input_as_forward(forward):
    """A stride-1 input gradient as the forward convolution `forward` of grad_output with the flipped
    kernel: one GEMM shape for both directions, no col2im."""
    def input_gradient(gy, w, p):
        return forward(gy, _flipped_transposed(w, p.groups), None, p.input_gradient_as_forward())

    return input_gradient


_input_gemm_as_forward = _input_as_forward(_forward_gemm)


def _input_gemm(gy, w, p):
    if p.input_gradient_as_forward() is not None:
        return _input_gemm_as_forward(gy, w, p)
    wg = _group_matrices(w, p.groups, w[0].size)
    gx = np.zeros(p.input_shape, gy.dtype)

    def work(unfolding, index, unit):
        images, rows = unit
        gyt, dcols = _grad_output_unit(unfolding, gy, images, rows), unfolding.columns(images, rows)
        dcolsg, gytg = _group_matrices(dcols, p.groups, gyt[0].size), _group_matrices(gyt, p.groups, gyt[0].size)
        np.matmul(wg.transpose(0, 2, 1), gytg, out=dcolsg)
        unfolding.fold(dcols, gx, images, rows)

    _for_each_unit(p, gy.dtype, work, folds=True)
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


def max_pool2d_backward(gy, indices, p):
    """A scatter-add by index; np.ravel_multi_index rejects an index outside its plane in the same pass
    that turns plane-local indices into flat ones."""
    input_shape = p.input_shape
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


def _pointwise_applicable(op, p, dtype):
    return None if _is_pointwise(p) else "1x1, stride 1, unpadded convolutions only"


def _row_shifted_applicable(op, p, dtype):
    if p.stride != (1, 1):
        return "stride 1 only"
    if p.kernel_height == 1:
        return "kernels of more than one row only"
    if op == "conv2d_backward_input" and p.input_gradient_as_forward() is None:
        return "input gradient only where the padding is at most the kernel's span"
    return None


ALGORITHMS = (
    Algorithm("gemm", {"conv2d_forward": _forward_gemm, "conv2d_backward_input": _input_gemm,
                       "conv2d_backward_weight": _weight_gemm}),
    Algorithm("rowshift", {"conv2d_forward": _forward_row_shifted,
                           "conv2d_backward_input": _input_as_forward(_forward_row_shifted),
                           "conv2d_backward_weight": _weight_row_shifted}, _row_shifted_applicable),
    Algorithm("pointwise", {"conv2d_forward": _forward_pointwise,
                            "conv2d_backward_input": _input_as_forward(_forward_pointwise),
                            "conv2d_backward_weight": _weight_pointwise}, _pointwise_applicable),
    Algorithm("pool", {"max_pool2d_forward": max_pool2d_forward, "max_pool2d_backward": max_pool2d_backward}),
)


def preferred(op, p, dtype):
    """The default order of this backend's algorithms for a call (measuring off): the pointwise path where
    it applies, row-shifted where it wins (_row_shifted_wins), else im2col + GEMM."""
    if op in POOL_OPS:
        return ("pool",)
    shape = p.input_gradient_as_forward() if op == "conv2d_backward_input" else p
    if shape is not None and _is_pointwise(shape):
        return ("pointwise", "gemm")
    if shape is not None and _row_shifted_wins(shape):
        return ("rowshift", "gemm")
    return ("gemm",)
