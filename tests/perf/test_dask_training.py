"""Data-parallel training on a 2-worker LocalCluster (processes, 1 thread each, 1 kernel thread) against this
process, with the bytes each step moves and the time per step (extra_info): an epoch of `fastconv train`'s
digits network (1,437 images, batch 32: 45 steps; here on 1 kernel thread, `fastconv train`'s default), and
one of the inference benchmark's CNN on 2,048 random 3x32x32 images in batches of 512 (4 steps; here on 2
kernel threads), float32.
Run: flock /tmp/fastconv-bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE GLIBC_TUNABLES=\\
glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 pytest -m perf \\
tests/perf/test_dask_training.py --benchmark-enable --benchmark-columns=min,median,max
"""
import warnings

import numpy as np
import pytest

import fastconv
from fastconv import train

pytestmark = pytest.mark.perf
distributed = pytest.importorskip("distributed")
fd = pytest.importorskip("fastconv.dask")
pytest.importorskip("sklearn")

GROUP = "training epoch: digits CNN, batch 32, 45 steps"
LARGE = "training epoch: small CNN, 2048 images 3x32x32, batch 512, 4 steps"
SETTINGS = dict(epochs=1, batch_size=32, lr=0.05, seed=0, progress=False, log=lambda line: None)
LARGE_SETTINGS = dict(SETTINGS, batch_size=512, lr=0.01)


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, _, _ = train.load_digits(seed=0)
    return x_train, y_train


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2048, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 2048)


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Couldn't detect a suitable IP address", RuntimeWarning)
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address="127.0.0.1:0", env={"FASTCONV_NUM_THREADS": "1"})
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


def record(benchmark, histories, images, settings, model, shards):
    """Milliseconds per step (the training loop alone, median over the rounds) and the bytes a step moves:
    each shard's task carries the weights out and brings its gradients back."""
    steps = -(-images // settings["batch_size"])
    benchmark.extra_info["ms_per_step"] = round(1000 * np.median([h["seconds"][0] for h in histories]) / steps, 2)
    benchmark.extra_info["bytes_per_step"] = 2 * shards * sum(param.nbytes for param, _ in model.params())


def run(benchmark, make_model, x, y, settings, client=None, kernel_threads=1):
    histories = []

    def epoch():
        model = make_model()
        if client is None:
            with fastconv.threads(kernel_threads):
                histories.append(train.fit(model, (x, y, None, None), **settings))
        else:
            histories.append(fd.fit(model, x, y, client=client, **settings))

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1)
    record(benchmark, histories, len(x), settings, make_model(), 0 if client is None else 2)


def digits_cnn():
    return train.digits_cnn(np.random.default_rng(0))


@pytest.mark.benchmark(group=GROUP)
def test_epoch_in_one_process(benchmark, digits):
    run(benchmark, digits_cnn, *digits, SETTINGS)


@pytest.mark.benchmark(group=GROUP)
def test_epoch_on_2_workers(benchmark, digits, client):
    run(benchmark, digits_cnn, *digits, SETTINGS, client)


@pytest.mark.benchmark(group=LARGE)
def test_large_batches_in_one_process(benchmark, images):
    from test_dask_inference import small_cnn

    run(benchmark, small_cnn, *images, LARGE_SETTINGS, kernel_threads=2)


@pytest.mark.benchmark(group=LARGE)
def test_large_batches_on_2_workers(benchmark, images, client):
    from test_dask_inference import small_cnn

    run(benchmark, small_cnn, *images, LARGE_SETTINGS, client)
