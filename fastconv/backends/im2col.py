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
3x3, and a squarer GEMM, which OpenBLAS runs faster. The units of work, their workers and workspaces are
in _im2col_units.py.
"""
import numpy as np

from ..ops import POOL_OPS, Algorithm
from ..params import index_out_of_plane, taps
from ..threads import get_num_threads
from ._im2col_units import _for_each_unit, _InOrder, _workspace
from ._im2col_units import set_workspace_limit as set_workspace_limit  # the cap, public here


def describe():
    return f"NumPy {np.__version__} matmul, one BLAS thread per worker thread, column cap {_workspace['limit']} B"


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
        index, unfolding.row_shifted_weight_gradient(gy, x, *unit)), row_shifted=True, reduction=total)
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

    _for_each_unit(p, x.dtype, work, workspace=False, reduction=total)
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

    _for_each_unit(p, x.dtype, work, reduction=total)
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
    rows = taps(p.kernel_height, p.in_height, p.stride[0], p.padding[0], p.dilation[0], 0, p.out_height)
    cols = taps(p.kernel_width, p.in_width, p.stride[1], p.padding[1], p.dilation[1], 0, p.out_width)
    best = np.full(shape, np.nan, x.dtype)  # every cell is overwritten by its window's first in-bounds tap
    seen = np.zeros(shape, bool)  # whether a window's first in-bounds tap has come
    indices = np.empty(shape, np.int64) if p.with_indices else None
    mask = np.empty(shape, bool)
    for i_lo, i_hi, in_rows in rows:
        for j_lo, j_hi, in_cols in cols:
            if i_hi <= i_lo or j_hi <= j_lo:
                continue
            values = x[:, :, in_rows, in_cols]
            window = (slice(None), slice(None), slice(i_lo, i_hi), slice(j_lo, j_hi))
            b, m, first = best[window], mask[window], ~seen[window]
            np.greater(values, b, out=m)
            m |= np.isnan(values)
            m |= first
            seen[window] = True
            np.copyto(b, values, where=m)
            if indices is not None:
                flat = (np.arange(in_rows.start, in_rows.stop, in_rows.step)[:, None] * p.in_width
                        + np.arange(in_cols.start, in_cols.stop, in_cols.step))
                np.copyto(indices[window], flat, where=m)
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
