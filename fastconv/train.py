"""`fastconv train`: a small CNN trained with fastconv.nn on the handwritten digits that ship with
scikit-learn (8x8, 1,797 images, no download), with a progress bar per epoch and a plot of the curves.

Needs the `train` extra (scikit-learn, matplotlib, tqdm): pip install -e ".[train]". With --workers N (a
LocalCluster) or --scheduler ADDRESS, the training is data-parallel on Dask (fastconv.dask.fit; the dask extra).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time

import numpy as np

from . import nn
from .dispatch import available_backends, get_backend
from .threads import threads

EXTRA = ("sklearn", "matplotlib", "tqdm")


def missing_extra():
    """A message naming the train extra's missing packages, or None if all are installed."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"fastconv train needs {', '.join(missing)} (not installed): "
            f'pip install -e ".[train]" (or pip install "fastconv[train]")')


def load_digits(seed, test_size=0.2, dtype=np.float32):
    """scikit-learn's digits as (N, 1, 8, 8) images scaled to [0, 1], split (stratified) into train and test."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(dtype)[:, None]  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_size, random_state=seed, stratify=digits.target)
    return x_train, y_train, x_test, y_test


def digits_cnn(rng, dtype=np.float32, backend=None):
    """conv 3x3 pad 1 (1->16) -> ReLU -> max-pool 2 -> conv 3x3 pad 1 (16->32) -> ReLU -> max-pool 2 -> linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, rng=rng, dtype=dtype, backend=backend),
        nn.ReLU(),
        nn.MaxPool2d(2, backend=backend),
        nn.Conv2d(16, 32, 3, padding=1, rng=rng, dtype=dtype, backend=backend),
        nn.ReLU(),
        nn.MaxPool2d(2, backend=backend),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10, rng=rng, dtype=dtype),
    )


def train_step(model, loss_fn, optimizer, x, y):
    """One SGD step on a batch; returns the batch's loss."""
    loss = loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward(), input_grad=False)  # the data needs no gradient
    optimizer.step()
    return loss


def evaluate(model, loss_fn, x, y):
    """(mean loss, accuracy) on a whole set, in one batch; NaNs without one."""
    if x is None:
        return math.nan, math.nan
    logits = model.predict(x)
    return loss_fn.forward(logits, y), float(np.mean(logits.argmax(axis=1) == y))


def fit(model, data, *, epochs, batch_size, lr, momentum=0.9, weight_decay=5e-4, seed=0, progress=True,
        log=print, step=None, callback=None):
    """Train `model` on data = (x_train, y_train, x_test, y_test), batches reshuffled every epoch; returns
    the history: per epoch the mean training loss, test loss, test accuracy and seconds of training.

    step(model, loss_fn, optimizer, batch) -> the batch's loss: one SGD step on the training images at
    `batch` (indices); by default train_step on this process's arrays (fastconv.dask.fit passes one that
    computes the gradients on a cluster). callback(epoch, step, loss), if given, runs after every step."""
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    if step is None:
        def step(model, loss_fn, optimizer, batch):
            return train_step(model, loss_fn, optimizer, x_train[batch], y_train[batch])

    loss_fn, optimizer = nn.SoftmaxCrossEntropy(), nn.SGD(model.params(), lr, momentum, weight_decay)
    rng = np.random.default_rng(seed)
    history = {"loss": [], "test_loss": [], "test_accuracy": [], "seconds": []}
    steps = 0
    for epoch in range(1, epochs + 1):
        # Cosine annealing: lr falls smoothly to near zero, which steadies the last epochs' accuracy.
        optimizer.lr = lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        start, total_loss = time.perf_counter(), 0.0
        order = rng.permutation(len(x_train))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=not progress):
            loss = step(model, loss_fn, optimizer, batch)
            total_loss += loss * len(batch)
            steps += 1
            if callback is not None:
                callback(epoch, steps, loss)
        seconds = time.perf_counter() - start
        test_loss, test_accuracy = evaluate(model, loss_fn, x_test, y_test)
        for key, value in zip(history, (total_loss / len(x_train), test_loss, test_accuracy, seconds)):
            history[key].append(value)
        log(f"epoch {epoch:2d}/{epochs}  loss {history['loss'][-1]:.4f}  test loss {test_loss:.4f}  "
            f"test accuracy {test_accuracy:.2%}  ({seconds:.2f} s, {len(x_train) / seconds:,.0f} images/s)")
    return history


def save_plot(history, path):
    """Loss and test-accuracy curves per epoch, as a PNG (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = range(1, len(history["loss"]) + 1)
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, history["loss"], marker="o", label="training")
    loss_axes.plot(epochs, history["test_loss"], marker="o", label="test")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    loss_axes.legend()
    accuracy_axes.plot(epochs, np.array(history["test_accuracy"]) * 100, marker="o", color="C2")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    accuracy_axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def run(args):
    """Train the digits CNN as the parsed arguments say; a missing package or a bad argument exits with
    a message."""
    choices = ("auto",) + available_backends()
    if args.backend is not None and args.backend not in choices:
        raise SystemExit(f"unknown or unavailable backend {args.backend!r}; available: {', '.join(choices)}")
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    problem = missing_extra()
    if problem:
        raise SystemExit(problem)
    data = load_digits(args.seed)
    model = digits_cnn(np.random.default_rng(args.seed), backend=args.backend)
    print(f"digits: {len(data[0])} training and {len(data[2])} test images; backend {args.backend or get_backend()}, "
          f"{args.threads} thread(s), batch {args.batch_size}, lr {args.lr} (cosine), "
          f"momentum {args.momentum}, weight decay {args.weight_decay}, seed {args.seed}")
    start = time.perf_counter()
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, seed=args.seed)
    if args.workers is not None or args.scheduler:
        history = _fit_on_cluster(model, data, args, settings)
    else:
        with threads(args.threads):
            history = fit(model, data, **settings)
    print(f"final test accuracy {history['test_accuracy'][-1]:.2%} after {args.epochs} epochs in "
          f"{time.perf_counter() - start:.1f} s ({sum(history['seconds']):.1f} s training)")
    save_plot(history, args.out)
    print(f"curves saved to {args.out}")


def _fit_on_cluster(model, data, args, settings):
    """fit on Dask workers (fastconv.dask.fit): a LocalCluster of --workers single-threaded processes on the
    loopback address, each running its kernels on --threads threads, or the cluster at --scheduler."""
    try:
        from distributed import Client, LocalCluster

        from . import dask as fastconv_dask
    except ImportError:
        raise SystemExit('fastconv train --workers/--scheduler needs the dask extra: '
                         'pip install -e ".[dask]"') from None
    x_train, y_train, x_test, y_test = data
    if args.scheduler:
        cluster, where = None, args.scheduler
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", env={"FASTCONV_NUM_THREADS": str(args.threads)})
        where = cluster
    try:
        with Client(where) as client:
            workers = len(client.scheduler_info()["workers"])
            print(f"training on {workers} Dask worker(s) at {client.scheduler.address}")
            return fastconv_dask.fit(model, x_train, y_train, client=client, validation=(x_test, y_test),
                                     **settings)
    finally:
        if cluster is not None:
            cluster.close()


def add_arguments(parser):
    parser.add_argument("--backend", help="kernels for conv and pool: auto or a backend's name "
                        "(default: fastconv's default, auto unless FASTCONV_BACKEND says otherwise)")
    parser.add_argument("--epochs", type=int, default=15, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="initial learning rate, cosine-annealed (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="default: %(default)s")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="weights, split and shuffling (default: %(default)s)")
    # One thread by default: these layers are too small for a second one to pay much, and a parallel region
    # per layer stalls badly when another process holds a core.
    parser.add_argument("--threads", type=int, default=1, help="threads for the kernels (default: %(default)s)")
    parser.add_argument("--out", default="digits-training.png", help="plot of the curves (default: %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="train data-parallel on a LocalCluster of this many worker "
                       "processes (1 thread each; --threads kernel threads per worker; the dask extra)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="train data-parallel on the Dask cluster whose "
                       "scheduler is at ADDRESS (e.g. tcp://scheduler:8786; the dask extra)")


def add_parser(commands):
    """The `train` subcommand of the `fastconv` command (commands: argparse subparsers)."""
    parser = commands.add_parser("train", description=__doc__,
                                 help="Train a small CNN on scikit-learn's digits and plot its curves (train extra).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastconv.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
