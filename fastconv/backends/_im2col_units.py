"""im2col's units of work and their workspaces: the plan that cuts a call into units (chunks of images, or
bands of output rows of one image, so memory does not grow with the batch and a small batch still feeds
every worker), the workers that run them, the in-order sum of their partials, and _Unfolding, one worker's
column buffer with the unfold (im2col) and fold (col2im) of a unit.

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

from ..params import taps
from ..threads import is_tiny, single_threaded_blas, threads_for

_workspace = {"limit": int(os.environ.get("FASTCONV_IM2COL_WORKSPACE_BYTES", 16 << 20))}
_executor = {"pool": None}
_executor_lock = threading.Lock()


def set_workspace_limit(nbytes: int) -> None:
    """Cap the column buffers of one call, all threads together (default 16 MiB; env
    FASTCONV_IM2COL_WORKSPACE_BYTES)."""
    if nbytes < 1:
        raise ValueError(f"nbytes must be >= 1, got {nbytes}")
    _workspace["limit"] = int(nbytes)



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


def _for_each_unit(p, dtype, work, row_shifted=False, folds=False, workspace=True, reduction=None):
    """work(unfolding, index, unit) for every unit, in parallel over groups of units; each worker thread
    owns one _Unfolding (its workspace, for im2col or for the row-shifted path; None without `workspace`).
    Units are numbered in order; claimed in order. BLAS runs single-threaded inside the workers: OpenBLAS's
    own threads would keep spinning for a while after each call and slow whatever runs next, in any
    library. The first error of any worker (an interrupt of the caller included) stops the others, the
    `reduction` (an _InOrder the units add to) is abandoned so that no worker waits for a partial that
    will never come, and the error is raised here once every worker has stopped."""
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
        with contextlib.nullcontext() if is_tiny(p.work) else single_threaded_blas():
            for group in numbered:
                for index, unit in group:
                    work(unfolding, index, unit)
        return
    claim, lock, errors = iter(numbered), threading.Lock(), []

    def worker():
        try:
            work_through()
        except _Abandoned:
            return
        except BaseException as error:
            with lock:
                errors.append(error)
            if reduction is not None:
                reduction.abandon()

    def work_through():
        unfolding = new_unfolding()
        while not errors:
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
    with single_threaded_blas():
        # The calling thread is one of the workers: a thread asleep takes long to wake in a virtual machine.
        helpers = [_executor["pool"].submit(worker) for _ in range(min(workers, len(groups)) - 1)]
        worker()
        for future in helpers:  # the helpers are done with the caller's arrays before it returns, or raises
            future.result()
    if errors:
        raise errors[0]


class _Abandoned(Exception):
    """An _InOrder whose call failed: nothing more will be added."""


class _InOrder:
    """Adds per-unit partial sums into a total in unit order, whichever worker finishes first: the sum
    does not depend on the thread count or on timing. A partial that arrives before its turn waits in
    `pending` and the worker goes on (waiting for the turn made the workers step in lockstep); a worker
    waits only when it is `ahead` units in front of the next partial due, which bounds the memory."""

    def __init__(self, total, ahead):
        self.total, self.ahead, self.next, self.pending, self.turn = total, ahead, 0, {}, threading.Condition()
        self.abandoned = False

    def abandon(self):
        """The call failed: wake every waiting worker, which then stops (_Abandoned)."""
        with self.turn:
            self.abandoned = True
            self.turn.notify_all()

    def add(self, index, partial):
        with self.turn:
            self.turn.wait_for(lambda: self.abandoned or index - self.next < self.ahead)
            if self.abandoned:
                raise _Abandoned
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

    def _stridedtaps(self, rows):
        """Every kernel tap (kh, kw) with its valid output rows and columns and the input slices they read."""
        p = self.p
        tap_rows = taps(p.kernel_height, p.in_height, p.stride[0], p.padding[0], p.dilation[0], rows.start, rows.stop)
        tap_cols = taps(p.kernel_width, p.in_width, p.stride[1], p.padding[2], p.dilation[1], 0, p.out_width)
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
        for kh, kw, (i_lo, i_hi, in_rows), (j_lo, j_hi, in_cols) in self._stridedtaps(rows):
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
        for kh, kw, (i_lo, i_hi, in_rows), (j_lo, j_hi, in_cols) in self._stridedtaps(rows):
            dst[:, :, in_rows, in_cols] += dcols[:, kh, kw, :, i_lo:i_hi, j_lo:j_hi]
