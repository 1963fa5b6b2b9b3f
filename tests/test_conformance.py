"""Every backend against the naive oracle run in float64, on a few hundred random valid cases.

Convolutions: relative 2-norm error <= 1e-5 in float32 and 1e-12 in float64. Pooling: values and indices
equal to the oracle's, no tolerance (pooling does no arithmetic)."""
import numpy as np
import pytest
from cases import (
    TOLERANCE,
    case_id,
    conv_arrays,
    conv_cases,
    conv_kwargs,
    pool_cases,
    pool_input,
    pool_kwargs,
    rel_err,
)

import fastconv

CONV_CASES = conv_cases(200, seed=2)
POOL_CASES = pool_cases(120, seed=3)
DTYPES = [np.float32, np.float64]


def _f64(a):
    return None if a is None else a.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_against_oracle(backend, case, dtype):
    x, w, b, gy = conv_arrays(case, dtype)
    kw = conv_kwargs(case)
    y = fastconv.conv2d(x, w, b, **kw, backend=backend)
    gx, gw, gb = fastconv.conv2d_backward(gy, x, w, **kw, backend=backend)
    y_ref = fastconv.conv2d(_f64(x), _f64(w), _f64(b), **kw, backend="naive")
    gx_ref, gw_ref, gb_ref = fastconv.conv2d_backward(_f64(gy), _f64(x), _f64(w), **kw, backend="naive")
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        assert got.dtype == dtype and got.flags.c_contiguous
        assert rel_err(got, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_against_oracle(backend, case, dtype):
    x = pool_input(case, dtype)
    y, idx = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=True, backend=backend)
    y_ref, idx_ref = fastconv.max_pool2d(x, **pool_kwargs(case), return_indices=True, backend="naive")
    assert y.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(y, y_ref)  # NaN == NaN here
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    gx = fastconv.max_pool2d_backward(gy, idx, x.shape, backend=backend)
    gx_ref = fastconv.max_pool2d_backward(_f64(gy), idx, x.shape, backend="naive")
    assert gx.dtype == dtype
    assert rel_err(gx, gx_ref) <= TOLERANCE[dtype]


def _views(a):
    """The same values as non-contiguous, Fortran-ordered, negative-stride and read-only arrays."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    flipped = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    readonly = a.copy()
    readonly.setflags(write=False)
    misaligned = np.zeros(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)  # one byte off
    misaligned[...] = a
    return {"sliced": wide[..., ::2], "fortran": np.asfortranarray(a), "negative": flipped, "readonly": readonly,
            "misaligned": misaligned}


@pytest.mark.parametrize("view", ["sliced", "fortran", "negative", "readonly", "misaligned"])
def test_views_give_contiguous_results(backend, view):
    case = dict(x_shape=(2, 4, 7, 6), w_shape=(6, 2, 3, 2), bias=True, stride=(2, 1), padding=1, dilation=1,
                groups=2)
    x, w, b, gy = conv_arrays(case, np.float64)
    kw = conv_kwargs(case)
    xv, wv, bv, gyv = (_views(a)[view] for a in (x, w, b[None, None, None], gy))
    bv = bv[0, 0, 0]
    np.testing.assert_array_equal(fastconv.conv2d(xv, wv, bv, **kw, backend=backend),
                                  fastconv.conv2d(x, w, b, **kw, backend=backend))
    for got, ref in zip(fastconv.conv2d_backward(gyv, xv, wv, **kw, backend=backend),
                        fastconv.conv2d_backward(gy, x, w, **kw, backend=backend)):
        np.testing.assert_array_equal(got, ref)
    y, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, backend=backend)
    yv, idxv = fastconv.max_pool2d(_views(x)[view], 3, 2, 1, return_indices=True, backend=backend)
    np.testing.assert_array_equal(yv, y)
    np.testing.assert_array_equal(idxv, idx)
    np.testing.assert_array_equal(
        fastconv.max_pool2d_backward(_views(y)[view], _views(idx)[view], x.shape, backend=backend),
        fastconv.max_pool2d_backward(y, idx, x.shape, backend=backend))


def test_inputs_are_never_modified(backend):
    case = dict(x_shape=(2, 3, 8, 8), w_shape=(4, 3, 3, 3), bias=True, stride=1, padding=1, dilation=1, groups=1)
    arrays = conv_arrays(case, np.float32)
    before = [a.copy() for a in arrays]
    x, w, b, gy = arrays
    fastconv.conv2d(x, w, b, padding=1, backend=backend)
    fastconv.conv2d_backward(gy, x, w, padding=1, backend=backend)
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True, backend=backend)
    y0, idx0 = y.copy(), idx.copy()
    fastconv.max_pool2d_backward(y, idx, x.shape, backend=backend)
    for a, a0 in zip(arrays + (y, idx), before + [y0, idx0]):
        np.testing.assert_array_equal(a, a0)


def test_repeated_calls_are_bitwise_equal(backend):
    case = dict(x_shape=(4, 8, 12, 12), w_shape=(8, 8, 3, 3), bias=True, stride=1, padding=1, dilation=1, groups=1)
    x, w, b, gy = conv_arrays(case, np.float32)
    first = [fastconv.conv2d(x, w, b, padding=1, backend=backend),
             *fastconv.conv2d_backward(gy, x, w, padding=1, backend=backend)]
    second = [fastconv.conv2d(x, w, b, padding=1, backend=backend),
              *fastconv.conv2d_backward(gy, x, w, padding=1, backend=backend)]
    for a, b_ in zip(first, second):
        np.testing.assert_array_equal(a, b_)


def test_empty_batch(backend):
    x, w = np.zeros((0, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32)
    assert fastconv.conv2d(x, w, backend=backend).shape == (0, 3, 3, 3)
    gx, gw, gb = fastconv.conv2d_backward(np.zeros((0, 3, 3, 3), np.float32), x, w, backend=backend)
    assert gx.shape == x.shape and not gw.any() and not gb.any()
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True, backend=backend)
    assert y.shape == idx.shape == (0, 2, 2, 2)
    assert fastconv.max_pool2d_backward(y, idx, x.shape, backend=backend).shape == x.shape


def test_output_mask_skips_gradients(backend):
    case = dict(x_shape=(1, 2, 5, 5), w_shape=(3, 2, 3, 3), bias=False, stride=1, padding=0, dilation=1, groups=1)
    x, w, _, gy = conv_arrays(case, np.float64)
    full = fastconv.conv2d_backward(gy, x, w, backend=backend)
    for mask in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        got = fastconv.conv2d_backward(gy, x, w, output_mask=mask, backend=backend)
        for wanted, g, ref in zip(mask, got, full):
            if wanted:
                np.testing.assert_array_equal(g, ref)
            else:
                assert g is None


def test_overlapping_pool_windows_accumulate(backend):
    """3x3 windows at stride 1 share elements: a single maximum collects the gradient of every window."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0
    y, idx = fastconv.max_pool2d(x, 3, stride=1, return_indices=True, backend=backend)
    assert (idx == 6).all()
    gx = fastconv.max_pool2d_backward(np.full(y.shape, 1.5), idx, x.shape, backend=backend)
    assert gx[0, 0, 1, 2] == 1.5 * y.size and gx.sum() == 1.5 * y.size


@pytest.mark.parametrize("bad", [-1, 16, 2**40, -2**40])
def test_pool_backward_rejects_index_outside_plane(backend, bad):
    gy, idx = np.ones((2, 3, 2, 2)), np.zeros((2, 3, 2, 2), np.int64)
    idx[1, 2, 1, 0] = bad
    with pytest.raises(ValueError, match="indices"):
        fastconv.max_pool2d_backward(gy, idx, (2, 3, 4, 4), backend=backend)


# Backends whose results must not depend on the thread count, bitwise. im2col's GEMMs run on BLAS's own
# threads, which block differently with 1 and 2 threads: it matches within tolerance only.
THREAD_INVARIANT = {"naive", "numba", "cython"}


def test_thread_count_does_not_change_results(backend):
    case = dict(x_shape=(3, 8, 14, 14), w_shape=(12, 4, 3, 3), bias=True, stride=1, padding=1, dilation=1, groups=2)
    x, w, b, gy = conv_arrays(case, np.float32)
    kw = conv_kwargs(case)
    results = []
    for n in (1, 2):
        with fastconv.threads(n):
            y, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, backend=backend)
            results.append([fastconv.conv2d(x, w, b, **kw, backend=backend),
                            *fastconv.conv2d_backward(gy, x, w, **kw, backend=backend),
                            y, idx, fastconv.max_pool2d_backward(y, idx, x.shape, backend=backend)])
    for one, two in zip(*results):
        if backend in THREAD_INVARIANT:
            np.testing.assert_array_equal(one, two)
        else:
            assert rel_err(one, two) <= TOLERANCE[np.float32]


@pytest.mark.parametrize("op", ["forward", "grad_input", "grad_weight"])
def test_float32_accuracy_on_a_large_layer(fast_backend, op):
    """Long sums: the weight gradient of 64x64x32x32 -> 64, 3x3, pad 1 sums 65,536 terms per weight.
    The reference is im2col in float64 (itself checked against the oracle above); naive, the oracle,
    is not a fast kernel and is not tuned for float32."""
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((64, 64, 32, 32)), rng.standard_normal((64, 64, 3, 3))
    gy = rng.standard_normal((64, 64, 32, 32))

    def run(dtype, name):
        xs, ws, gys = (a.astype(dtype) for a in (x, w, gy))
        if op == "forward":
            return fastconv.conv2d(xs, ws, padding=1, backend=name)
        mask = (op == "grad_input", op == "grad_weight", False)
        return next(g for g in fastconv.conv2d_backward(gys, xs, ws, padding=1, output_mask=mask, backend=name)
                    if g is not None)

    assert rel_err(run(np.float32, fast_backend), run(np.float64, "im2col")) <= TOLERANCE[np.float32]


@pytest.mark.parametrize("channels", [3, 8], ids=["3-channels", "8-channels"])  # 8: fast stride-1 paths too
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_inputs_propagate_as_in_the_oracle(backend, value, channels):
    """An inf or NaN in the input reaches exactly the outputs and gradients whose sums include it, as in
    PyTorch: no extra NaN from a computed-and-dropped column multiplying it by zero."""
    case = dict(x_shape=(2, channels, 9, 8), w_shape=(4, channels, 3, 3), bias=True, stride=1, padding=1,
                dilation=1, groups=1)
    for stride in (1, 2):
        case["stride"] = stride
        x, w, b, gy = conv_arrays(case, np.float64)
        x[0, 1, 4, 7] = x[1, 2, 0, 0] = x[1, channels - 1, 8, 6] = value
        kw = conv_kwargs(case)
        got, ref = ([fastconv.conv2d(x, w, b, **kw, backend=name),
                     *fastconv.conv2d_backward(gy, x, w, **kw, backend=name)] for name in (backend, "naive"))
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
            np.testing.assert_array_equal(np.isinf(g), np.isinf(r))
