"""Numba kernels of the `numba` backend; the wrappers in numba.py pack the weights and lay out the arrays.

Every convolution runs as one stride-1 "correlation" over a *source* image laid out so that the input window
of each kernel tap is one contiguous run:

    out[co, t] = sum_k weights[co, k] * source[offsets[k] + t],      t = oh * row + ow

The source is the padded input (forward, weight gradient) or the zero-upsampled, padded output gradient
(input gradient), split into stride phases: element (v, u) of the padded image goes to sub-image
(v % sh, u % sw) at (v // sh, u // sw). A tap (kh, kw) then reads one sub-image shifted by
(kh*dh // sh, kw*dw // sw) for every stride and dilation, and consecutive output columns are consecutive
elements. Each output row is computed `row` wide (the sub-image width): the few extra columns read the next
row and are discarded. Small planes put several images side by side in each source row (`fold`), so the
runs stay long. The forward correlation keeps a block of output channels times a run of t in vector
registers (_simd.py) over all taps; the weight gradient's dot products are contiguous t loops that LLVM
vectorizes.

The weight gradient's padded taps (k beyond the real ones, to fill a block) point at a zero tail of each
source image, so they add exact zeros even when the input holds inf or NaN.
"""
import numpy as np
from numba import njit, prange

from ._simd import lanes, vfma, vload, vsplat, vstore

# No nnan/ninf: NaN and inf must propagate (pooling compares with NaN).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
TILE_VECTORS = 6  # vectors of outputs per row of the forward/input-gradient register tile (see _tile)
TAPS_WEIGHT = 3  # taps per block in the weight-gradient kernel
WEIGHT_CHUNK = 4  # images per weight-gradient partial sum: fixed, so results do not depend on threads

jit = njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
inline_jit = njit(nogil=True, fastmath=FASTMATH, cache=True)


@jit
def build_source(a, source, up_h, up_w, pad_top, pad_left, sh, sw, sub_h, sub_w, fold, count_non_finite):
    """source[m] <- images m*fold .. m*fold + fold-1 of a (N, C, H, W), side by side (segment b of each
    sub-image row holds image m*fold + b): each upsampled by (up_h, up_w), shifted by the (possibly
    negative) padding, split into sh*sw stride phases of sub_h x sub_w each, zeros elsewhere; then a zero
    tail. Columns are either upsampled or split into phases (up_w == 1 or sw == 1), each as strided runs.
    Returns the number of non-finite values in the source if count_non_finite, else 0."""
    n_img, channels, height, width = a.shape
    wide = fold * sub_w
    sub = sub_h * wide
    per_channel = sh * sw * sub
    non_finite = 0
    for item in prange(source.shape[0] * channels):
        m, c = item // channels, item % channels
        block = source[m, c * per_channel:(c + 1) * per_channel]
        block[:] = 0
        for n in range(m * fold, min(n_img, (m + 1) * fold)):
            segment = (n - m * fold) * sub_w
            for h in range(height):
                v = h * up_h + pad_top
                if v < 0 or v >= sub_h * sh:
                    continue
                row, line = (v % sh) * sw * sub + (v // sh) * wide + segment, a[n, c, h]
                if sw == 1:  # column w at w * up_w + pad_left; a loop: a slice costs more than these short rows
                    lo = max(0, (-pad_left + up_w - 1) // up_w)
                    hi = min(width, (sub_w - 1 - pad_left) // up_w + 1)
                    for w in range(lo, hi):
                        block[row + w * up_w + pad_left] = line[w]
                else:  # up_w == 1: column w at u = w + pad_left, in phase u % sw at u // sw (strided slices)
                    lo, hi = max(0, -pad_left), min(width, sub_w * sw - pad_left)
                    for phase in range(sw):
                        first = lo + (phase - pad_left - lo) % sw
                        if first < hi:
                            count = (hi - 1 - first) // sw + 1
                            start = row + phase * sub + (first + pad_left) // sw
                            block[start:start + count] = line[first:first + (count - 1) * sw + 1:sw]
        block_non_finite = 0  # the prange reduction itself must not sit under a condition: Numba drops it
        if count_non_finite:
            for value in block:
                block_non_finite += not np.isfinite(value)
        non_finite += block_non_finite
    for m in range(source.shape[0]):
        source[m, channels * per_channel:] = 0
    return non_finite


@inline_jit
def _tile(img, offsets, weights, acc, n):
    """acc[0:4, :n] = weights (K, 4) correlated with img: acc[r, t] = sum_k weights[k, r] * img[offsets[k] + t],
    for n a multiple of TILE_VECTORS vectors. A register tile of 4 output channels x 6 vectors of outputs
    (24 of the 32 vector registers) takes every tap before it is stored: per tap, 6 loads and 4 broadcasts
    feed 24 multiply-adds, and no accumulator goes through memory."""
    width = lanes(img)
    for t in range(0, n, TILE_VECTORS * width):
        s00 = s01 = s02 = s03 = s04 = s05 = s10 = s11 = s12 = s13 = s14 = s15 = vsplat(img, 0)
        s20 = s21 = s22 = s23 = s24 = s25 = s30 = s31 = s32 = s33 = s34 = s35 = s00
        for k in range(offsets.size):
            o, w = offsets[k] + t, weights[k]
            x0, x1, x2 = vload(img, o), vload(img, o + width), vload(img, o + 2 * width)
            x3, x4, x5 = vload(img, o + 3 * width), vload(img, o + 4 * width), vload(img, o + 5 * width)
            w0, w1, w2, w3 = vsplat(img, w[0]), vsplat(img, w[1]), vsplat(img, w[2]), vsplat(img, w[3])
            s00, s01, s02 = vfma(w0, x0, s00), vfma(w0, x1, s01), vfma(w0, x2, s02)
            s03, s04, s05 = vfma(w0, x3, s03), vfma(w0, x4, s04), vfma(w0, x5, s05)
            s10, s11, s12 = vfma(w1, x0, s10), vfma(w1, x1, s11), vfma(w1, x2, s12)
            s13, s14, s15 = vfma(w1, x3, s13), vfma(w1, x4, s14), vfma(w1, x5, s15)
            s20, s21, s22 = vfma(w2, x0, s20), vfma(w2, x1, s21), vfma(w2, x2, s22)
            s23, s24, s25 = vfma(w2, x3, s23), vfma(w2, x4, s24), vfma(w2, x5, s25)
            s30, s31, s32 = vfma(w3, x0, s30), vfma(w3, x1, s31), vfma(w3, x2, s32)
            s33, s34, s35 = vfma(w3, x3, s33), vfma(w3, x4, s34), vfma(w3, x5, s35)
        for r, (v0, v1, v2, v3, v4, v5) in enumerate(((s00, s01, s02, s03, s04, s05), (s10, s11, s12, s13, s14, s15),
                                                     (s20, s21, s22, s23, s24, s25), (s30, s31, s32, s33, s34, s35))):
            row = acc[r]
            vstore(row, t, v0)
            vstore(row, t + width, v1)
            vstore(row, t + 2 * width, v2)
            vstore(row, t + 3 * width, v3)
            vstore(row, t + 4 * width, v4)
            vstore(row, t + 5 * width, v5)


@jit
def correlate(source, weights, offsets, bias, out, row, fold, tile_elements):
    """out[m*fold + b, g*Cg + co, oh, ow] = bias[..] + sum_k weights[g, co // 4, k, co % 4] *
    source[m, offsets[g, k] + oh*row + b*(row // fold) + ow]: `fold` images side by side in each source row.

    weights (G, Cg rounded up to 4 / 4, K, 4) and offsets (G, K) come packed from the wrapper. Work items are
    (source image, group, block of 4 output channels, tile of output rows of about tile_elements outputs):
    both cores stay busy at batch 1, and each output is written by one item, so the thread count never
    matters. Each tile is computed rounded up to whole register tiles: the source has a tail for the overrun."""
    n_img, out_channels, out_h, out_w = out.shape
    groups, blocks = weights.shape[:2]
    per_group = out_channels // groups
    segment = row // fold
    step = TILE_VECTORS * lanes(source[0])
    tiles = -(-out_h * row // tile_elements)
    tile_rows = -(-out_h // tiles)  # tiles of equal height: balanced work items
    tiles = -(-out_h // tile_rows)
    for item in prange(source.shape[0] * groups * blocks * tiles):
        m, rest = item // (groups * blocks * tiles), item % (groups * blocks * tiles)
        g, block, tile = rest // (blocks * tiles), (rest // tiles) % blocks, rest % tiles
        co0 = block * 4
        oh0 = tile * tile_rows
        oh1 = min(out_h, oh0 + tile_rows)
        length = -(-(oh1 - oh0) * row // step) * step
        acc = np.empty((4, length), source.dtype)
        _tile(source[m, oh0 * row:], offsets[g], weights[g, block], acc, length)
        for r in range(4):
            co = co0 + r
            if co < per_group:
                channel = g * per_group + co
                b = bias[channel]
                for n in range(m * fold, min(n_img, (m + 1) * fold)):
                    for oh in range(oh0, oh1):
                        start = (oh - oh0) * row + (n - m * fold) * segment
                        line, products = out[n, channel, oh], acc[r, start:]
                        for ow in range(out_w):  # a loop: slice arithmetic would allocate a temporary per row
                            line[ow] = products[ow] + b


@jit
def spread_rows(a, out, row, fold):
    """out[m, g, co, oh*row + b*(row // fold) + ow] = a[m*fold + b, g, co, oh, ow]: the output gradient
    (N, G, Cg, H_out, W_out) laid out as the source (images side by side), zeros in the extra columns, in
    the missing images of the last source image and in the rows that pad Cg."""
    n_src, groups, rows_padded, _ = out.shape
    n_img, per_group, out_h, out_w = a.shape[0], a.shape[2], a.shape[3], a.shape[4]
    segment = row // fold
    for item in prange(n_src * groups * rows_padded):
        m, g, co = item // (groups * rows_padded), (item // rows_padded) % groups, item % rows_padded
        dest = out[m, g, co]
        dest[:] = 0
        if co < per_group:
            for n in range(m * fold, min(n_img, (m + 1) * fold)):
                for oh in range(out_h):
                    start = oh * row + (n - m * fold) * segment
                    dest[start:start + out_w] = a[n, g, co, oh]


@inline_jit
def _dots4x3(g0, g1, g2, g3, x0, x1, x2):
    """The 12 dot products of four output-gradient runs with three tap runs (vectorized reductions)."""
    zero = g0.dtype.type(0)
    s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = zero
    for t in range(g0.size):
        v0, v1, v2 = x0[t], x1[t], x2[t]
        y0, y1, y2, y3 = g0[t], g1[t], g2[t], g3[t]
        s00 += y0 * v0
        s01 += y0 * v1
        s02 += y0 * v2
        s10 += y1 * v0
        s11 += y1 * v1
        s12 += y1 * v2
        s20 += y2 * v0
        s21 += y2 * v1
        s22 += y2 * v2
        s30 += y3 * v0
        s31 += y3 * v1
        s32 += y3 * v2
    return s00, s01, s02, s10, s11, s12, s20, s21, s22, s30, s31, s32


@jit
def weight_partials(source, grad_rows, offsets, partials, runs, run_step, run_length):
    """partials[chunk, g, co, k] = sum over the chunk's images of sum_t grad_rows[n, g*Cg + co, t] *
    source[n, offsets[g, k] + t], in float64, t over `runs` runs of run_length starting every run_step.

    One run over all wide rows is fastest; one run per output row skips the extra columns, whose zero
    gradient would turn an inf or NaN of the source into a NaN that does not belong (inf * 0).
    grad_rows (N, G, Cg rounded up to 4, T); partials (chunks, G, Cg rounded up to 4, K rounded up
    to 3). Each image's sum over t runs in the working dtype (vectorized, so many short partial sums), images
    are added in float64; the wrapper adds the chunks in order. Items: (chunk, group, block of 4 channels)."""
    n_img = source.shape[0]
    chunks, groups, rows_padded, taps = partials.shape
    blocks = rows_padded // 4
    for item in prange(chunks * groups * blocks):
        chunk, g, block = item // (groups * blocks), (item // blocks) % groups, item % blocks
        co = block * 4
        part, offs = partials[chunk, g], offsets[g]
        part[co:co + 4, :] = 0
        for n in range(chunk * WEIGHT_CHUNK, min(n_img, (chunk + 1) * WEIGHT_CHUNK)):
            for run in range(runs):
                t0 = run * run_step
                img, gy = source[n, t0:], grad_rows[n, g]
                t1 = t0 + run_length  # each run sliced from a row: contiguous, so the dots vectorize
                g0, g1, g2, g3 = gy[co, t0:t1], gy[co + 1, t0:t1], gy[co + 2, t0:t1], gy[co + 3, t0:t1]
                for k in range(0, taps, TAPS_WEIGHT):
                    s = _dots4x3(g0, g1, g2, g3, img[offs[k]:][:run_length], img[offs[k + 1]:][:run_length],
                                 img[offs[k + 2]:][:run_length])
                    for r in range(4):
                        for j in range(3):
                            part[co + r, k + j] += s[r * 3 + j]


@inline_jit
def _window(xp, width, r0, s0, i_lo, i_hi, kw, dh, dw):
    """(best, flat index) of one window clipped to the input rows [i_lo, i_hi) of the kernel, by PyTorch's
    rule: row-major over in-bounds cells, a cell wins if greater than the best or NaN, the first one starts."""
    j_lo = max(0, (-s0 + dw - 1) // dw)
    j_hi = min(kw, (width - s0 + dw - 1) // dw)
    best_r, best_s = r0 + i_lo * dh, s0 + j_lo * dw
    best = xp[best_r, best_s]
    for a in range(i_lo, i_hi):
        r = r0 + a * dh
        for b in range(j_lo, j_hi):
            s = s0 + b * dw
            value = xp[r, s]
            take = (value > best) | np.isnan(value)  # selects, not branches: random data mispredicts
            best = value if take else best
            best_r = r if take else best_r
            best_s = s if take else best_s
    return best, best_r * width + best_s


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _scan_window_row(y_run, index_run, x_run, index_base, first, kw, sw, dw):
    """One window row of the windows j < y_run.size, all inside the input: cell b of window j is
    x_run[j*sw + b*dw], at flat index index_base + j*sw + b*dw; `first` starts the windows with cell 0.
    Indices only grow from 0 with the loop, so with constant kw, sw, dw the loads vectorize."""
    for j in range(y_run.size):
        best, best_at = y_run[j], index_run[j]
        for b in range(kw):
            at = j * sw + b * dw
            value = x_run[at]
            take = (first & (b == 0)) | (value > best) | np.isnan(value)
            best = value if take else best
            best_at = index_base + at if take else best_at
        y_run[j], index_run[j] = best, best_at


@jit
def max_pool_forward(x, y, indices, kh, kw, sh, sw, ph, pw, dh, dw):
    """PyTorch's rule (see _window), parallel over the N*C planes. The windows inside the input columns
    run window row by window row over a whole output row (vectorized); the few border ones one by one."""
    n_img, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    # Output columns whose windows lie inside the input columns: [inner_lo, inner_hi).
    inner_lo = min(out_w, (pw + sw - 1) // sw)
    inner_hi = max(inner_lo, min(out_w, (width - 1 - (kw - 1) * dw + pw) // sw + 1))
    for plane in prange(n_img * channels):
        n, c = plane // channels, plane % channels
        xp, yp, ip = x[n, c], y[n, c], indices[n, c]
        x_flat = xp.reshape(height * width)
        for i in range(out_h):
            r0 = i * sh - ph
            i_lo = max(0, (-r0 + dh - 1) // dh)
            i_hi = min(kh, (height - r0 + dh - 1) // dh)
            for j in range(inner_lo):
                yp[i, j], ip[i, j] = _window(xp, width, r0, j * sw - pw, i_lo, i_hi, kw, dh, dw)
            for j in range(inner_hi, out_w):
                yp[i, j], ip[i, j] = _window(xp, width, r0, j * sw - pw, i_lo, i_hi, kw, dh, dw)
            y_run, index_run = yp[i, inner_lo:inner_hi], ip[i, inner_lo:inner_hi]
            for a in range(i_lo, i_hi):
                start = (r0 + a * dh) * width + inner_lo * sw - pw
                x_run, first = x_flat[start:], a == i_lo
                # Constant shapes for the common kernels let LLVM vectorize their strided loads.
                if kw == 2 and sw == 2 and dw == 1:
                    _scan_window_row(y_run, index_run, x_run, start, first, 2, 2, 1)
                elif kw == 3 and sw == 2 and dw == 1:
                    _scan_window_row(y_run, index_run, x_run, start, first, 3, 2, 1)
                elif kw == 3 and sw == 1 and dw == 1:
                    _scan_window_row(y_run, index_run, x_run, start, first, 3, 1, 1)
                else:
                    _scan_window_row(y_run, index_run, x_run, start, first, kw, sw, dw)


@jit
def max_pool_backward(grad_output, indices, grad_input, bad):
    """grad_input[n, c].flat[indices] += grad_output, plane by plane (planes are independent: no races).
    Each plane is zeroed and scattered by one task while it is hot in cache. An index outside the plane
    is recorded in bad[plane] (bad[plane, 0] = 1, bad[plane, 1] = the index) and stops that plane's scatter."""
    n_img, channels, height, width = grad_input.shape
    size = height * width
    for plane in prange(n_img * channels):
        n, c = plane // channels, plane % channels
        gx = grad_input[n, c].reshape(size)
        gy, idx = grad_output[n, c].ravel(), indices[n, c].ravel()
        gx[:] = 0
        for e in range(gy.size):
            index = idx[e]
            if index < 0 or index >= size:
                bad[plane, 0], bad[plane, 1] = 1, index
                break
            gx[index] += gy[e]
