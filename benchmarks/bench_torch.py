"""Whole training steps of two PyTorch models, PyTorch alone against fastconv.torch.convert's model
(fastconv/report/training.py: the report's figures; skipped where PyTorch is not installed)."""
from .common import fastconv

try:
    import torch

    from fastconv.report import training
except ImportError:  # no PyTorch, or a version of fastconv without its adapter
    torch = training = None


class TrainingStep:
    params = (["VGG-style, CIFAR-sized", "LeNet, digits-sized"], ["PyTorch", "fastconv.torch"],
              ["float32", "float64"])
    param_names = ["model", "side", "dtype"]
    timeout = 300
    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0

    def setup(self, model, side, dtype):
        if torch is None or fastconv is None:
            raise NotImplementedError("needs PyTorch and fastconv.torch")
        self.step = training.steps(torch, model, dtype)[side]
        self.step()  # warm-up: JIT compilation, auto's choices, workspaces

    def time_training_step(self, model, side, dtype):
        self.step()
