"""Inference throughput of a small CNN over 4,096 images (3x32x32 float32, chunks of 256: 16 tasks of 3 MiB in,
10 KiB out): fastconv.dask on a 2-worker LocalCluster (processes, 1 thread each, one kernel thread per
worker), the same graph on Dask's threaded scheduler in this process, and the plain call in this process
(fastconv's threads: 2 unless FASTCONV_NUM_THREADS says otherwise), `auto` measuring on every side (the
warm-up round is when it measures). The images are made on the workers
(persisted there, as a dataset loaded by the cluster is); an empty graph of as many tasks measures what the
scheduler's round trips cost on their own.
Run: flock /tmp/fastconv-bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE GLIBC_TUNABLES=\
glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 pytest -m perf \
tests/perf/test_dask_inference.py --benchmark-enable (the workers inherit the allocator's settings)
"""
import os
import warnings

import numpy as np
import pytest

from fastconv import nn

pytestmark = pytest.mark.perf
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

IMAGES, CHUNK, SHAPE = 4096, 256, (3, 32, 32)
GROUP = f"inference: small CNN over {IMAGES} images {SHAPE}, chunks of {CHUNK}"


@pytest.fixture(scope="module", autouse=True)
def measured_auto():
    """`auto` measures here, as it does for a user (the test suite's conftest fixes its order)."""
    saved = os.environ.get("FASTCONV_AUTO")
    os.environ["FASTCONV_AUTO"] = "measure"
    yield
    if saved is None:
        del os.environ["FASTCONV_AUTO"]
    else:
        os.environ["FASTCONV_AUTO"] = saved


def small_cnn():
    """Three 3x3 conv + ReLU + 2x2 pool stages (3->16->32->64 channels), then a linear layer: 5.6 MFLOP/image."""
    rng = np.random.default_rng(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10, rng=rng),
    )


def images():
    return da.random.default_rng(0).standard_normal((IMAGES, *SHAPE), chunks=(CHUNK, *SHAPE), dtype=np.float32)


# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536 (freed memory goes back to the system at
# once, so every chunk's arrays are fresh pages); the second cluster keeps freed memory for reuse.
MALLOC = {"dask's default malloc": {}, "freed memory kept": {"MALLOC_TRIM_THRESHOLD_": str(1 << 32),
                                                              "MALLOC_MMAP_THRESHOLD_": str(1 << 32)}}


@pytest.fixture(scope="module", params=list(MALLOC))
def client(request):
    env = {"FASTCONV_NUM_THREADS": "1", "FASTCONV_AUTO": "measure", **MALLOC[request.param]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Couldn't detect a suitable IP address", RuntimeWarning)
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address="127.0.0.1:0", env=env)
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.mark.benchmark(group=GROUP)
def test_in_one_process(benchmark):
    model, x = small_cnn(), images().compute()
    benchmark.pedantic(lambda: [model.predict(x[i:i + CHUNK]) for i in range(0, IMAGES, CHUNK)], rounds=5,
                       warmup_rounds=1)


@pytest.mark.benchmark(group=GROUP)
def test_dask_threads_in_one_process(benchmark):
    model, x = small_cnn(), images().persist(scheduler="sync")
    benchmark.pedantic(lambda: model.predict(x).compute(scheduler="threads", num_workers=2), rounds=5,
                       warmup_rounds=1)


@pytest.mark.benchmark(group=GROUP)
def test_local_cluster_2_workers(benchmark, client):
    model, x = small_cnn(), client.persist(images())
    distributed.wait(x)
    benchmark.pedantic(lambda: client.compute(model.predict(x), sync=True), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group=f"scheduler round trips: an empty graph of {IMAGES // CHUNK} tasks")
def test_local_cluster_empty_graph(benchmark, client):
    x = client.persist(da.zeros((IMAGES // CHUNK, 1), chunks=1))
    distributed.wait(x)
    benchmark.pedantic(lambda: client.compute(x.map_blocks(np.negative), sync=True), rounds=10, warmup_rounds=1)


def test_the_sides_agree(client):
    """What is timed computes the same thing on every side."""
    model, x = small_cnn(), client.persist(images())
    local = x.compute()
    expected = np.concatenate([model.predict(local[i:i + CHUNK]) for i in range(0, IMAGES, CHUNK)])
    np.testing.assert_allclose(client.compute(model.predict(x), sync=True), expected, rtol=1e-5, atol=1e-5)
