"""fastconv.dask on LocalClusters the tests start on the loopback address (no network): worker processes
(2 x 1 thread) and one in-process worker with 2 threads (concurrent kernel calls in one process). Every
distributed result is computed on the cluster and compared with the single-process call: float64 within
1e-12, pooling values and indices equal."""
import pickle
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

import fastconv
import fastconv.dask as fd
from fastconv import nn
from fastconv.train import digits_cnn

pytestmark = pytest.mark.filterwarnings("ignore:Couldn't detect a suitable IP address:RuntimeWarning")

TOLERANCE = {np.float64: 1e-12, np.float32: 2e-5}

# (batch, H, W) chunks: batch only, then H and W cut unevenly, with blocks smaller than a 5x5 window's halo.
CHUNKINGS = {
    "batch": ((3, 2), (13,), (12,)),
    "spatial": ((5,), (6, 7), (5, 4, 3)),
    "both": ((2, 3), (2, 4, 7), (12,)),
}


def _cluster(kind, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Couldn't detect a suitable IP address", RuntimeWarning)
        if kind == "processes":
            return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                dashboard_address="127.0.0.1:0", **kwargs)
        return LocalCluster(n_workers=1, threads_per_worker=2, processes=False, host="127.0.0.1", protocol="tcp",
                            dashboard_address="127.0.0.1:0", **kwargs)


@pytest.fixture(scope="module", params=["processes", "threads"])
def client(request):
    cluster = _cluster(request.param)
    with Client(cluster) as client:
        yield client
    cluster.close()


def compute_on(client, *arrays):
    """Compute on the cluster; every fastconv task must have run on one of its workers (those known before or
    after the compute: a worker the nanny restarts on a loaded machine comes back at a new address)."""
    workers = set(client.scheduler_info()["workers"])
    with get_task_stream(client) as stream:
        values = client.compute(list(arrays), sync=True)
    workers |= set(client.scheduler_info()["workers"])
    ran = [record for record in stream.data if "fastconv-" in str(record["key"])]
    assert ran and all(record["worker"] in workers for record in ran)
    return values


def assert_close(actual, expected, dtype):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def dask_array(a, chunking):
    return da.from_array(a, chunks=(chunking[0], (a.shape[1],), *chunking[1:]))


CONV_CASES = [(3, 1, 1, 1), (5, 1, 2, 1), (3, 2, 1, 1), (5, 1, "same", 1), (3, 1, 2, 2), (1, 1, 0, 1)]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("kernel, stride, padding, dilation", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv2d_and_backward(client, chunking, kernel, stride, padding, dilation, dtype):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.standard_normal((5, 4, 13, 12)).astype(dtype)
    w = rng.standard_normal((6, 4, kernel, kernel)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    y_expected = fastconv.conv2d(x, w, b, **conv)
    gy = rng.standard_normal(y_expected.shape).astype(dtype)
    expected = fastconv.conv2d_backward(gy, x, w, **conv)

    xd = dask_array(x, CHUNKINGS[chunking])
    y = fd.conv2d(xd, w, b, **conv)
    assert isinstance(y, da.Array) and y.shape == y_expected.shape and y.dtype == dtype
    assert y.chunks[0] == xd.chunks[0] and y.chunks[1] == (6,)
    gyd = da.from_array(gy, chunks=y.chunks)
    grads = fd.conv2d_backward(gyd, xd, w, **conv)
    assert grads[0].chunks == xd.chunks
    computed = compute_on(client, y, *grads)
    assert_close(computed[0], y_expected, dtype)
    for actual, wanted in zip(computed[1:], expected):
        assert_close(actual, wanted, dtype)


def test_backward_with_grad_output_chunked_otherwise(client):
    """grad_output in chunks of its own (batch realigned to the input's; H and W any)."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((6, 3, 14, 14)), rng.standard_normal((5, 3, 3, 3))
    gy = rng.standard_normal((6, 5, 14, 14))
    expected = fastconv.conv2d_backward(gy, x, w, padding=1)
    grads = fd.conv2d_backward(da.from_array(gy, chunks=(4, 5, 3, 9)), da.from_array(x, chunks=(2, 3, 7, 14)), w,
                               padding=1)
    for actual, wanted in zip(compute_on(client, *grads), expected):
        assert_close(actual, wanted, np.float64)


def test_output_mask_and_weights_as_dask_arrays(client):
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((4, 2, 9, 9)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    xd = da.from_array(x, chunks=(2, 2, 5, 9))
    y = fd.conv2d(xd, da.from_array(w, chunks=(1, 2, 3, 3)), da.from_array(b, chunks=2))
    assert_close(compute_on(client, y)[0], fastconv.conv2d(x, w, b), np.float64)
    gy = rng.standard_normal(y.shape)
    grad_input, grad_weight, grad_bias = fd.conv2d_backward(da.from_array(gy), xd, w, output_mask=(False, True, False))
    assert grad_input is None and grad_bias is None
    assert_close(compute_on(client, grad_weight)[0], fastconv.conv2d_backward(gy, x, w)[1], np.float64)


def test_weight_gradient_depends_only_on_the_chunking(client):
    """The tree sum has one order: the same chunks give bitwise the same weight gradient, whichever worker
    computed which share."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((16, 3, 10, 10)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((16, 4, 10, 10)).astype(np.float32)
    xd, gyd = da.from_array(x, chunks=(2, 3, 5, 10)), da.from_array(gy, chunks=(2, 4, 5, 10))
    runs = [compute_on(client, *fd.conv2d_backward(gyd, xd, w, padding=1, split_every=3)[1:])
            for _ in range(3)]
    for grad_weight, grad_bias in runs[1:]:
        assert np.array_equal(grad_weight, runs[0][0]) and np.array_equal(grad_bias, runs[0][1])


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode",
                         [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 0, 1, True), (3, 1, 1, 2, False)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool2d_and_backward(client, chunking, kernel, stride, padding, dilation, ceil_mode, dtype):
    rng = np.random.default_rng(kernel + stride)
    x = rng.standard_normal((5, 3, 13, 12)).astype(dtype)
    x[0, 0, :3, :3] = -np.inf  # windows whose cells are all -inf: the first cell inside the plane wins
    x[1, 1, 5:7, 4:6] = np.round(x[1, 1, 5:7, 4:6])  # ties across chunk edges
    x[2, 2, 6, 5] = np.nan
    pool = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    y_expected, indices_expected = fastconv.max_pool2d(x, **pool, return_indices=True)
    gy = rng.standard_normal(y_expected.shape).astype(dtype)
    grad_expected = fastconv.max_pool2d_backward(gy, indices_expected, x.shape)

    y, indices = fd.max_pool2d(dask_array(x, CHUNKINGS[chunking]), **pool, return_indices=True)
    assert indices.dtype == np.int64 and y.chunks == indices.chunks
    grad = fd.max_pool2d_backward(da.from_array(gy, chunks=y.chunks), indices, x.shape)
    y, indices, grad = compute_on(client, y, indices, grad)
    np.testing.assert_array_equal(y, y_expected)
    np.testing.assert_array_equal(indices, indices_expected)
    np.testing.assert_array_equal(grad, grad_expected)


def test_max_pool2d_without_indices_is_one_array():
    x = da.from_array(np.random.default_rng(6).standard_normal((2, 2, 8, 8)), chunks=(1, 2, 4, 8))
    y = fd.max_pool2d(x, 2)
    assert isinstance(y, da.Array) and y.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(y.compute(scheduler="sync"), fastconv.max_pool2d(x.compute(), 2))


@pytest.mark.parametrize("stride, padding, output_padding, dilation", [(1, 1, 0, 1), (2, 1, 1, 1), (2, 0, 0, 2)])
def test_conv_transpose2d_and_backward(client, stride, padding, output_padding, dilation):
    rng = np.random.default_rng(stride)
    x, w, b = rng.standard_normal((4, 4, 7, 8)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(3)
    conv = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    for chunks in [(2, 4, 7, 8), (4, 4, 3, 5)]:
        xd = da.from_array(x, chunks=chunks)
        y = fd.conv_transpose2d(xd, w, b, **conv)
        y_expected = fastconv.conv_transpose2d(x, w, b, **conv)
        gy = rng.standard_normal(y_expected.shape)
        grads = fd.conv_transpose2d_backward(da.from_array(gy, chunks=y.chunks), xd, w, **conv)
        assert grads[0].chunks == xd.chunks
        computed = compute_on(client, y, *grads)
        assert_close(computed[0], y_expected, np.float64)
        for actual, wanted in zip(computed[1:], fastconv.conv_transpose2d_backward(gy, x, w, **conv)):
            assert_close(actual, wanted, np.float64)


def test_weights_enter_the_graph_once():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 3, 3, 3))
    y = fd.conv2d(da.from_array(rng.standard_normal((64, 3, 16, 16)), chunks=(4, 3, 8, 16)), w, padding=1)
    graph = dict(y.__dask_graph__())
    holding = [key for key, value in graph.items() if isinstance(value, np.ndarray) and value.shape == w.shape]
    assert len(holding) == 1
    assert len(pickle.dumps(graph)) < w.nbytes + 200 * len(graph) + 64 * 3 * 16 * 16 * 8


def test_predict_runs_each_chunk_in_one_task(client):
    rng = np.random.default_rng(8)
    model = digits_cnn(rng, dtype=np.float64)
    x = rng.standard_normal((40, 1, 8, 8))
    model.forward(x)  # a trained model keeps its last forward's arrays: they must not travel
    assert len(pickle.dumps(model)) < 1.5 * 2 * sum(p.nbytes for p, _ in model.params()) + 4096
    xd = da.from_array(x, chunks=10)
    y = model.predict(xd)
    assert isinstance(y, da.Array) and y.shape == (40, 10) and y.chunks[0] == xd.chunks[0]
    with get_task_stream(client) as stream:
        (values,) = client.compute([y], sync=True)
    assert_close(values, model.predict(x), np.float64)
    predicted = [record for record in stream.data if "fastconv-predict" in str(record["key"])]
    assert len(predicted) == 4  # one task per chunk, every layer inside it


def test_predict_matches_forward():
    rng = np.random.default_rng(9)
    model, x = digits_cnn(rng), rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), model.forward(x))


def test_kernel_threads_in_a_worker():
    """One kernel thread per worker thread unless FASTCONV_NUM_THREADS is set for the worker."""
    for env, expected in [({}, 1), ({"FASTCONV_NUM_THREADS": "2"}, 2)]:
        cluster = _cluster("processes", env=env)
        with Client(cluster) as client:
            assert set(client.run(fd._kernel_threads).values()) == {expected}
        cluster.close()


def test_concurrent_calls_in_one_worker(client):
    """Every compiled backend called from both threads of one worker at once stays right."""
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((32, 4, 16, 16)), rng.standard_normal((8, 4, 3, 3))
    xd = da.from_array(x, chunks=(1, 4, 16, 16))
    for backend in ("numba", "cython", "im2col"):
        y = fd.conv2d(xd, w, padding=1, backend=backend)
        pooled = fd.max_pool2d(y, 2, backend=backend)
        np.testing.assert_allclose(compute_on(client, pooled)[0],
                                   fastconv.max_pool2d(fastconv.conv2d(x, w, padding=1), 2), rtol=0, atol=1e-12)


def test_bad_input_names_the_argument():
    x = da.zeros((4, 6, 8, 8), chunks=(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"input .* chunked along channels .*rechunk\(\{1: -1\}\)"):
        fd.conv2d(x, np.zeros((2, 6, 3, 3)))
    with pytest.raises(ValueError, match="bias must have shape"):
        fd.conv2d(x.rechunk({1: -1}), np.zeros((2, 6, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="input has 6 channels"):
        fd.conv2d(x.rechunk({1: -1}), np.zeros((2, 5, 3, 3)))
    with pytest.raises(TypeError, match="share one dtype"):
        fd.conv2d(x.rechunk({1: -1}), np.zeros((2, 6, 3, 3), np.float32))
    with pytest.raises(ValueError, match="grad_output must have the output's shape"):
        fd.conv2d_backward(da.zeros((4, 2, 5, 5)), x.rechunk({1: -1}), np.zeros((2, 6, 3, 3)))
    unknown = da.zeros((4, 6, 8, 8))[da.arange(4) < 2]
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        fd.max_pool2d(unknown, 2)
    with pytest.raises(ValueError, match=r"chunked along H or W .*rechunk\(\{2: -1, 3: -1\}\)"):
        fd.predict(digits_cnn(np.random.default_rng(0)), da.zeros((4, 1, 8, 8), np.float32, chunks=(2, 1, 4, 8)))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((3, 2, 7, 7)), rng.standard_normal((2, 2, 3, 3))
    x0, w0 = x.copy(), w.copy()
    y = fd.conv2d(da.from_array(x, chunks=(1, 2, 3, 4)), w, padding=1)
    fd.conv2d_backward(y, da.from_array(x, chunks=(1, 2, 3, 4)), w, padding=1)[0].compute(scheduler="sync")
    assert np.array_equal(x, x0) and np.array_equal(w, w0)


def test_sequential_predict_keeps_numpy_numpy():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    out = model.predict(np.array([[[[-1.0, 2.0]]]]))
    assert isinstance(out, np.ndarray) and out.tolist() == [[0.0, 2.0]]
    with dask.config.set(scheduler="sync"):
        assert model.predict(da.from_array(np.array([[[[-1.0, 2.0]]]]))).compute().tolist() == [[0.0, 2.0]]


def _random_chunks(rng, n):
    """1 to 4 uneven chunks summing to n."""
    cuts = sorted(rng.choice(np.arange(1, n), size=min(int(rng.integers(0, 4)), n - 1), replace=False))
    bounds = [0, *cuts, n]
    return tuple(int(b - a) for a, b in zip(bounds, bounds[1:]))


def _random_conv(rng):
    groups = int(rng.choice([1, 1, 2]))
    shape = (int(rng.integers(1, 5)), groups * int(rng.integers(1, 3)), int(rng.integers(3, 14)),
             int(rng.integers(3, 14)))
    weight = (groups * int(rng.integers(1, 3)), shape[1] // groups, int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    padding = rng.choice(["same", "valid", "pair"])
    if padding == "same":
        stride = (1, 1)
    elif padding == "pair":
        padding = (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    conv = dict(stride=stride, padding=padding, dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
                groups=groups)
    return shape, weight, conv


@pytest.mark.parametrize("seed", range(4))
def test_random_calls_equal_the_unchunked_call(seed):
    """Random convolutions (groups, strides, dilations, every padding form), transposed convolutions and
    poolings (ties, NaN, -inf, ceil_mode) on random uneven chunks along N, H and W: every result equals the
    unchunked call (Dask's synchronous scheduler: the cluster tests above cover the distribution)."""
    rng = np.random.default_rng(1000 + seed)
    checked = 0
    with dask.config.set(scheduler="sync"):
        while checked < 25:
            shape, weight, conv = _random_conv(rng)
            x, w, b = rng.standard_normal(shape), rng.standard_normal(weight), rng.standard_normal(weight[0])
            try:
                y = fastconv.conv2d(x, w, b, **conv)
            except ValueError:
                continue
            chunks = (_random_chunks(rng, shape[0]), (shape[1],), _random_chunks(rng, shape[2]),
                      _random_chunks(rng, shape[3]))
            xd = da.from_array(x, chunks=chunks)
            assert_close(fd.conv2d(xd, w, b, **conv).compute(), y, np.float64)
            gy = rng.standard_normal(y.shape)
            gyd = da.from_array(gy, chunks=(chunks[0], (y.shape[1],), _random_chunks(rng, y.shape[2]),
                                            _random_chunks(rng, y.shape[3])))
            for got, wanted in zip(fd.conv2d_backward(gyd, xd, w, **conv), fastconv.conv2d_backward(gy, x, w, **conv)):
                assert_close(got.compute(), wanted, np.float64)
            if not isinstance(conv["padding"], str):  # transposed convolutions take no string padding
                transposed = dict(conv, output_padding=(0, 0))
                wt = rng.standard_normal((shape[1], weight[0] // conv["groups"], *weight[2:]))
                try:
                    up = fastconv.conv_transpose2d(x, wt, **transposed)
                except ValueError:  # an output too small
                    up = None
                if up is not None:
                    assert_close(fd.conv_transpose2d(xd, wt, **transposed).compute(), up, np.float64)
            pool = dict(kernel_size=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                        stride=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                        dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))), ceil_mode=bool(rng.random() < 0.5))
            pool["padding"] = tuple(int(rng.integers(0, k // 2 + 1)) for k in pool["kernel_size"])
            xp = np.round(x * 2) / 2
            xp[rng.random(shape) < 0.05] = -np.inf
            xp[rng.random(shape) < 0.03] = np.nan
            try:
                values, indices = fastconv.max_pool2d(xp, **pool, return_indices=True)
            except ValueError:
                continue
            got_values, got_indices = fd.max_pool2d(da.from_array(xp, chunks=chunks), **pool, return_indices=True)
            np.testing.assert_array_equal(got_values.compute(), values)
            np.testing.assert_array_equal(got_indices.compute(), indices)
            np.testing.assert_array_equal(fd.max_pool2d(da.from_array(xp, chunks=chunks), **pool).compute(), values)
            checked += 1
