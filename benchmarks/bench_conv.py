"""conv2d forward and both gradients, through the public API with an explicit backend or algorithm."""
from .common import BACKENDS, fastconv, normal, require, warm_up

# name: (input shape, output channels, kernel, stride, padding). Fewer than the report's suite, so that
# `asv run --quick` stays within minutes on two cores.
SHAPES = {
    "8x16x32x32->32 3x3 p1": ((8, 16, 32, 32), 32, 3, 1, 1),
    "64x64x32x32->64 3x3 p1": ((64, 64, 32, 32), 64, 3, 1, 1),
    "1x64x56x56->64 3x3 p1": ((1, 64, 56, 56), 64, 3, 1, 1),
    "32x256x14x14->256 1x1": ((32, 256, 14, 14), 256, 1, 1, 0),
    "128x1x28x28->6 5x5": ((128, 1, 28, 28), 6, 5, 1, 0),
}
NAIVE_SHAPES = ("8x16x32x32->32 3x3 p1", "128x1x28x28->6 5x5")  # naive is a Python loop per pixel
FLOAT64_SHAPES = ("8x16x32x32->32 3x3 p1", "64x64x32x32->64 3x3 p1")
OPS = ("forward", "grad_input", "grad_weight")


class Conv2d:
    params = (list(SHAPES), list(OPS), BACKENDS, ["float32", "float64"])
    param_names = ["shape", "op", "backend", "dtype"]
    timeout = 300  # the first call of a JIT backend compiles, in setup
    # Inputs are built and warmed up in setup; one round of up to 5 samples keeps recording a commit
    # to minutes.
    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0

    def setup(self, shape, op, backend, dtype):
        require(backend)
        if backend == "naive" and shape not in NAIVE_SHAPES:
            raise NotImplementedError("naive runs only on small shapes")
        if dtype == "float64" and shape not in FLOAT64_SHAPES:
            raise NotImplementedError("float64 only on a few shapes")
        input_shape, out_channels, kernel, stride, padding = SHAPES[shape]
        x = normal(input_shape, dtype, seed=0)
        w = normal((out_channels, input_shape[1], kernel, kernel), dtype, seed=1)
        conv = dict(stride=stride, padding=padding, backend=backend)
        gy = normal(fastconv.conv2d(x, w, stride=stride, padding=padding).shape, dtype, seed=2)
        self.run = {
            "forward": lambda: fastconv.conv2d(x, w, **conv),
            "grad_input": lambda: fastconv.conv2d_backward(gy, x, w, output_mask=(True, False, False), **conv),
            "grad_weight": lambda: fastconv.conv2d_backward(gy, x, w, output_mask=(False, True, False), **conv),
        }[op]
        warm_up(self.run)  # JIT compilation, caches and workspaces stay out of the timing

    def time_conv2d(self, shape, op, backend, dtype):
        self.run()

    def peakmem_conv2d(self, shape, op, backend, dtype):
        self.run()
