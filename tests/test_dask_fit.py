"""fastconv.dask.fit: data-parallel training on a LocalCluster the tests start on the loopback address
(2 worker processes x 1 thread), against fastconv.train.fit in this process on the same global batches."""
import copy
import os
import warnings

import numpy as np
import pytest
from distributed import Client, LocalCluster

import fastconv.dask as fd
from fastconv import cli, train

pytestmark = pytest.mark.filterwarnings("ignore:Couldn't detect a suitable IP address:RuntimeWarning")

SETTINGS = dict(epochs=2, batch_size=32, lr=0.05, seed=0, progress=False, log=lambda line: None)


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Couldn't detect a suitable IP address", RuntimeWarning)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0")
    with Client(cluster) as client:
        yield client
    cluster.close()


def normal_images(n=160, seed=0):
    """Images without ties: pooling then routes every gradient the same way whatever the algorithm, and
    algorithms differ only in the last bits (see test_pinned_algorithm_trains_digits_alike)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)), rng.integers(0, 10, n)


def weights(model):
    return [param for param, _ in model.params()]


def assert_same_weights(a, b, tolerance=1e-10):
    for x, y in zip(weights(a), weights(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=tolerance)


def test_two_workers_train_as_one_process(client):
    x, y = normal_images()
    model = train.digits_cnn(np.random.default_rng(1), dtype=np.float64)
    local, distributed = copy.deepcopy(model), copy.deepcopy(model)
    local_history = train.fit(local, (x, y, x[:40], y[:40]), **SETTINGS)
    history = fd.fit(distributed, x, y, client=client, validation=(x[:40], y[:40]), **SETTINGS)
    assert_same_weights(local, distributed)
    assert not np.allclose(weights(model)[0], weights(local)[0])  # it trained
    np.testing.assert_allclose(history["loss"], local_history["loss"], rtol=1e-10)
    np.testing.assert_allclose(history["test_accuracy"], local_history["test_accuracy"])


def test_more_shards_than_a_tree_node_and_bitwise_repeatable(client):
    """Five shards summed by a tree of 2 per node: the same weights as one process, and bitwise the same in
    a second run (the sums' order depends only on the shards)."""
    import dask.array as da

    x, y = normal_images(seed=2)
    model = train.digits_cnn(np.random.default_rng(3), dtype=np.float64)
    runs = []
    for _ in range(2):
        runs.append(copy.deepcopy(model))
        fd.fit(runs[-1], da.from_array(x, chunks=32), da.from_array(y, chunks=32), client=client,
               split_every=2, **SETTINGS)
    local = copy.deepcopy(model)
    train.fit(local, (x, y, None, None), **SETTINGS)
    assert_same_weights(local, runs[0])
    for a, b in zip(weights(runs[0]), weights(runs[1])):
        assert np.array_equal(a, b)


async def _exit_process():
    os._exit(1)


def test_a_lost_worker_loses_nothing(client):
    """A worker killed during training: its shard and its gradients are recomputed on the worker left, and
    the weights are those of an undisturbed run."""
    x, y = normal_images(seed=4)
    model = train.digits_cnn(np.random.default_rng(5), dtype=np.float64)
    undisturbed, disturbed = copy.deepcopy(model), copy.deepcopy(model)
    fd.fit(undisturbed, x, y, client=client, **SETTINGS)
    victim = sorted(client.scheduler_info()["workers"])[0]

    steps_without_it = []

    def kill_a_worker(epoch, step, loss):
        if step == 3:
            client.run(_exit_process, workers=[victim], wait=False)
        elif step > 3 and victim not in client.scheduler_info()["workers"]:
            steps_without_it.append(step)

    fd.fit(disturbed, x, y, client=client, callback=kill_a_worker, **SETTINGS)
    assert steps_without_it  # training went on after the loss (the victim's nanny starts another worker)
    assert_same_weights(undisturbed, disturbed)


def test_pinned_algorithm_trains_digits_alike(client):
    """The digits' blank background gives pooling windows of exactly tied values. An algorithm whose result
    for an image does not depend on its batch (here numba's) trains the same on shards as on whole
    batches; `auto` may take another algorithm for a shard than for the whole batch (Winograd's result on a
    blank patch differs from the bias in the last bit), and a tie then routes a gradient elsewhere."""
    pytest.importorskip("sklearn")
    x, y, _, _ = train.load_digits(seed=0, dtype=np.float64)
    x, y = x[:192], y[:192]
    model = train.digits_cnn(np.random.default_rng(6), dtype=np.float64, backend="numba")
    local, distributed = copy.deepcopy(model), copy.deepcopy(model)
    train.fit(local, (x, y, None, None), **SETTINGS)
    fd.fit(distributed, x, y, client=client, **SETTINGS)
    assert_same_weights(local, distributed)


def test_bad_training_data():
    x, y = normal_images(8)
    with pytest.raises(ValueError, match="y must be 1-D with one label per image"):
        fd._shards(x, y[:5], 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fd._shards(x[:, 0], y, 2)
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        fd._shards(x, y.astype(float), 2)


def test_training_data_of_another_dtype_than_the_model(client):
    x, y = normal_images(8)
    with pytest.raises(TypeError, match="arrays must share one dtype"):
        fd.fit(train.digits_cnn(np.random.default_rng(0)), x, y, client=client, **SETTINGS)


def test_train_command_on_workers(tmp_path, capsys):
    for name in train.EXTRA:
        pytest.importorskip(name)
    out = tmp_path / "curves.png"
    cli.main(["train", "--workers", "2", "--epochs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "training on 2 Dask worker(s)" in printed and "images/s" in printed and "test accuracy" in printed
    assert out.read_bytes().startswith(b"\x89PNG")


def test_train_command_on_an_existing_cluster(tmp_path, capsys, client):
    for name in train.EXTRA:
        pytest.importorskip(name)
    address = client.scheduler.address
    cli.main(["train", "--scheduler", address, "--epochs", "1", "--out", str(tmp_path / "curves.png")])
    assert f"training on 2 Dask worker(s) at {address}" in capsys.readouterr().out


def test_train_command_refuses_no_workers():
    with pytest.raises(SystemExit, match="--workers must be >= 1"):
        cli.main(["train", "--workers", "0"])
