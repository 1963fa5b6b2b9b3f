"""Every bad input gets a ValueError or TypeError whose message names the argument and the shapes."""
import numpy as np
import pytest

import fastconv

X = np.zeros((2, 4, 8, 8), np.float32)
W = np.zeros((6, 2, 3, 3), np.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input=X[0]), ValueError, r"input must be 4-D .*\(4, 8, 8\).*unbatched"),
    (dict(input=X[0, 0]), ValueError, r"input must be 4-D .*\(8, 8\)"),
    (dict(weight=W[0]), ValueError, r"weight must be 4-D .*\(2, 3, 3\)"),
    (dict(groups=1), ValueError, r"input has 4 channels but weight \(6, 2, 3, 3\) with groups=1 expects 2"),
    (dict(weight=np.zeros((5, 2, 3, 3), np.float32)), ValueError, r"out_channels 5 .*groups=2"),
    (dict(groups=0), ValueError, r"groups must be >= 1"),
    (dict(groups=2.0), TypeError, r"groups must be an int"),
    (dict(weight=np.zeros((6, 2, 9, 3), np.float32)), ValueError, r"kernel \(9, 3\).*padded input \(8, 8\)"),
    (dict(dilation=4), ValueError, r"kernel \(3, 3\) with dilation \(4, 4\) spans \(9, 9\)"),
    (dict(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    (dict(stride=(1, -2)), ValueError, r"stride must be >= 1"),
    (dict(dilation=(0, 1)), ValueError, r"dilation must be >= 1"),
    (dict(padding=-1), ValueError, r"padding must be >= 0"),
    (dict(padding=(1, 2, 3)), TypeError, r"padding must be an int or a pair"),
    (dict(stride=1.5), TypeError, r"stride must be an int or a pair"),
    (dict(padding="full"), ValueError, r"padding must be an int, a pair, 'same' or 'valid'"),
    (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
    (dict(bias=np.zeros(5, np.float32)), ValueError, r"bias must have shape \(6,\).*got \(5,\)"),
    (dict(bias=np.zeros((6, 1), np.float32)), ValueError, r"bias must have shape \(6,\)"),
    (dict(input=X.astype(np.int32)), TypeError, r"input must be float32 or float64, got int32"),
    (dict(input=X.astype(np.float16)), TypeError, r"input must be float32 or float64, got float16"),
    (dict(weight=W.astype(np.float64)), TypeError, r"input float32, weight float64"),
    (dict(bias=np.zeros(6)), TypeError, r"bias float64"),
    (dict(input=np.zeros((2, 0, 8, 8), np.float32)), ValueError, r"no empty axis"),
])
def test_conv2d_rejects(kwargs, error, match):
    args = dict(input=X, weight=W, groups=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastconv.conv2d(**args)


@pytest.mark.parametrize("grad_output, match", [
    (np.zeros((2, 6, 6, 5), np.float32), r"grad_output must have the output's shape \(2, 6, 6, 6\).*\(2, 6, 6, 5\)"),
    (np.zeros((2, 6, 6, 6)), r"grad_output float64, input float32"),
    (np.zeros((6, 6, 6), np.float32), r"grad_output must have the output's shape"),
])
def test_conv2d_backward_rejects(grad_output, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastconv.conv2d_backward(grad_output, X, W, groups=2)


def test_conv2d_backward_rejects_bad_mask():
    with pytest.raises(TypeError, match="output_mask"):
        fastconv.conv2d_backward(np.zeros((2, 6, 6, 6), np.float32), X, W, groups=2, output_mask=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input=X[0]), ValueError, r"input must be 4-D.*\(4, 8, 8\)"),
    (dict(input=X.astype(np.int64)), TypeError, r"input must be float32 or float64, got int64"),
    (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
    (dict(kernel_size=(2, 2, 2)), TypeError, r"kernel_size must be an int or a pair"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(dilation=0), ValueError, r"dilation must be >= 1"),
    (dict(padding=-1), ValueError, r"padding must be >= 0"),
    (dict(kernel_size=3, padding=2), ValueError, r"padding \(2, 2\) must be at most half of kernel_size \(3, 3\)"),
    (dict(kernel_size=9), ValueError, r"input \(2, 4, 8, 8\).*empty output"),
    (dict(input=np.zeros((1, 1, 1, 1), np.float32), kernel_size=2, stride=1, padding=1, dilation=2), ValueError,
     r"window 0 along H covers only padding"),
    (dict(ceil_mode="yes"), TypeError, r"ceil_mode must be a bool"),
])
def test_max_pool2d_rejects(kwargs, error, match):
    args = dict(input=X, kernel_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastconv.max_pool2d(**args)


G = np.zeros((2, 4, 4, 4), np.float32)
IDX = np.zeros((2, 4, 4, 4), np.int64)


@pytest.mark.parametrize("grad_output, indices, input_shape, error, match", [
    (G, IDX[..., :3], X.shape, ValueError, r"indices shape \(2, 4, 4, 3\) must equal grad_output shape \(2, 4, 4, 4\)"),
    (G, IDX.astype(np.float64), X.shape, TypeError, r"indices must be an integer array"),
    (G[0], IDX[0], X.shape, ValueError, r"grad_output must be 4-D"),
    (G, IDX, (2, 3, 8, 8), ValueError, r"must agree on \(N, C\)"),
    (G, IDX, (2, 4, 8), ValueError, r"input_shape must be \(N, C, H, W\)"),
    (G, IDX, 5, TypeError, r"input_shape must be a sequence"),
    (G.astype(np.int32), IDX, X.shape, TypeError, r"grad_output must be float32 or float64"),
])
def test_max_pool2d_backward_rejects(grad_output, indices, input_shape, error, match):
    with pytest.raises(error, match=match):
        fastconv.max_pool2d_backward(grad_output, indices, input_shape)


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"unknown backend or algorithm 'nope'; backends: auto, naive.*"
                                         r"algorithms: naive, im2col:gemm"):
        fastconv.conv2d(X, W, groups=2, backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        fastconv.set_backend("nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        fastconv.set_backend(3)


@pytest.mark.parametrize("n", [0, -1])
def test_thread_count_must_be_positive(n):
    with pytest.raises(ValueError, match="must be >= 1"):
        fastconv.set_num_threads(n)
    with pytest.raises(ValueError, match="must be >= 1"):
        with fastconv.threads(n):
            pass
