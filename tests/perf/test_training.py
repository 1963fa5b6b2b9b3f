"""Training speed: one epoch of the digits CNN (`fastconv train`'s network) with fastconv.nn against the same
network in PyTorch (same batches, batch size, threads, initial weights and optimizer), and the per-call cost
of fastconv.conv2d on the seed note's 3x3 example, where the API's overhead is all there is.

Both sides use fastconv's thread count: FASTCONV_NUM_THREADS=1 matches `fastconv train`'s default.
Run: flock /tmp/fastconv-bench.lock env FASTCONV_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:\
glibc.malloc.trim_threshold=4294967296 pytest -m perf tests/perf/test_training.py --benchmark-enable
"""
import numpy as np
import pytest

import fastconv
from fastconv import nn, train

pytestmark = pytest.mark.perf

BATCH_SIZE, LR, MOMENTUM, WEIGHT_DECAY = 32, 0.05, 0.9, 5e-4
COMPILED = [name for name in ("cython", "numba", "im2col") if name in fastconv.available_backends()]


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    x_train, y_train, _, _ = train.load_digits(seed=0)
    order = np.random.default_rng(0).permutation(len(x_train))
    return x_train, y_train, [order[i:i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]


@pytest.mark.benchmark(group="training epoch: digits CNN, batch 32")
@pytest.mark.parametrize("backend", ["auto"] + COMPILED)
def test_epoch_fastconv(benchmark, digits, backend):
    x, y, batches = digits
    model = train.digits_cnn(np.random.default_rng(0), backend=backend)
    loss_fn, optimizer = nn.SoftmaxCrossEntropy(), nn.SGD(model.params(), LR, MOMENTUM, WEIGHT_DECAY)

    def epoch():
        for batch in batches:
            train.train_step(model, loss_fn, optimizer, x[batch], y[batch])

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="training epoch: digits CNN, batch 32")
def test_epoch_pytorch(benchmark, digits):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(fastconv.get_num_threads())
    x, y, batches = digits
    reference = train.digits_cnn(np.random.default_rng(0))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 2 * 2, 10),
    )
    with torch.no_grad():  # the same initial weights as fastconv's network
        for t_param, (param, _) in zip(model.parameters(), reference.params()):
            t_param.copy_(torch.from_numpy(param))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    batches = [torch.from_numpy(batch) for batch in batches]

    def epoch():
        for batch in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1)


# The seed note's worked example: X 3x3, F 2x2, float32.
SEED_X = np.arange(1.0, 10.0, dtype=np.float32).reshape(1, 1, 3, 3)
SEED_F = np.array([[[[2.0, -1.0], [3.0, 5.0]]]], np.float32)


@pytest.mark.benchmark(group="per call: conv2d on the seed's 3x3 example, float32")
@pytest.mark.parametrize("backend", ["auto"] + COMPILED)
def test_seed_conv2d_call(benchmark, backend):
    fastconv.conv2d(SEED_X, SEED_F, backend=backend)  # JIT and choice caches warm
    benchmark(fastconv.conv2d, SEED_X, SEED_F, backend=backend)


@pytest.mark.benchmark(group="per call: conv2d on the seed's 3x3 example, float32")
def test_seed_conv2d_call_pytorch(benchmark):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(fastconv.get_num_threads())
    x, f = torch.from_numpy(SEED_X), torch.from_numpy(SEED_F)
    benchmark(torch.nn.functional.conv2d, x, f)
