"""Train a small CNN on scikit-learn's handwritten digits with fastconv.nn: the layers, the loss and SGD
written out by hand over fastconv's conv2d / max_pool2d and their backward functions.

    pip install -e ".[train]" && python examples/train_digits.py [backend]

`fastconv train` does the same with a progress bar, more options and a plot of the curves.
"""
import math
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastconv
from fastconv import nn

backend = sys.argv[1] if len(sys.argv) > 1 else None  # None: fastconv's default, "auto" unless set
rng = np.random.default_rng(0)
fastconv.set_num_threads(1)  # layers this small gain little from a second thread, and lose much on a busy machine

digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                                    stratify=digits.target)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1, rng=rng, backend=backend), nn.ReLU(), nn.MaxPool2d(2, backend=backend),
    nn.Conv2d(16, 32, 3, padding=1, rng=rng, backend=backend), nn.ReLU(), nn.MaxPool2d(2, backend=backend),
    nn.Flatten(), nn.Linear(32 * 2 * 2, 10, rng=rng),
)
loss_fn = nn.SoftmaxCrossEntropy()
optimizer = nn.SGD(model.params(), lr=0.05, momentum=0.9, weight_decay=5e-4)

epochs, batch_size = 15, 32
for epoch in range(epochs):
    optimizer.lr = 0.05 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))  # cosine annealing
    order = rng.permutation(len(x_train))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        loss = loss_fn.forward(model.forward(x_train[batch]), y_train[batch])
        model.backward(loss_fn.backward(), input_grad=False)  # the images need no gradient
        optimizer.step()
    accuracy = np.mean(model.forward(x_test).argmax(axis=1) == y_test)
    print(f"epoch {epoch + 1:2d}  last batch loss {loss:.4f}  test accuracy {accuracy:.2%}")
