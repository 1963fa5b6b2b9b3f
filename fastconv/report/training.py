"""Whole training steps of two small PyTorch models, PyTorch alone against the same model after
fastconv.torch.convert: a VGG-style network on CIFAR-sized batches (64 x 3 x 32 x 32) and a LeNet on
digits-sized ones (64 x 1 x 8 x 8, as scikit-learn's digits), in float32 and float64. A step is
zero_grad, forward, cross-entropy, backward and an SGD step with momentum, on fixed random batches; the two
models start from the same weights and take turns step by step."""
from __future__ import annotations

import copy

from .._measure import time_calls

BATCH = 64


def vgg(torch):
    """Six 3x3 convolutions in three stages of 32, 64 and 128 channels, each stage ending in a 2x2 pooling."""
    layers, channels = [], 3
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
            channels = width
        layers.append(torch.nn.MaxPool2d(2))
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(128 * 4 * 4, 10)), (3, 32, 32)


def lenet(torch):
    """LeNet-5's shape for 8 x 8 digits: two 3x3 convolutions (6 and 16 channels) with 2x2 poolings, three
    linear layers."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(16 * 2 * 2, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
        torch.nn.Linear(84, 10)), (1, 8, 8)


MODELS = {"VGG-style, CIFAR-sized": vgg, "LeNet, digits-sized": lenet}


def training_step(torch, model, x, labels):
    """One step's call: the model's SGD optimizer is made once, here."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()

    return step


def steps(torch, name, dtype):
    """{"PyTorch": step, "fastconv.torch": step} for MODELS[name] in `dtype` ("float32"/"float64")."""
    from .. import torch as fastconv_torch

    torch.manual_seed(0)
    model, shape = MODELS[name](torch)
    model = model.to(getattr(torch, dtype))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *shape, dtype=getattr(torch, dtype), generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    converted = fastconv_torch.convert(copy.deepcopy(model))
    return {"PyTorch": training_step(torch, model, x, labels),
            "fastconv.torch": training_step(torch, converted, x, labels)}


def measure(torch, budget, min_repeats):
    """Rows of every model and dtype: each side's median step time, in the same turns."""
    rows = []
    for name in MODELS:
        for dtype in ("float32", "float64"):
            outcomes = time_calls(steps(torch, name, dtype), budget, min_repeats)
            times = {side: outcome[0].median for side, outcome in outcomes.items()}
            rows.append(dict(model=name, dtype=dtype, batch=BATCH, torch_s=times["PyTorch"],
                             fastconv_s=times["fastconv.torch"]))
    return rows
