"""max_pool2d forward (with indices) and backward, through the public API with an explicit backend or algorithm."""
from .common import BACKENDS, fastconv, normal, require, warm_up

# name: (input shape, kernel, stride, padding)
SHAPES = {
    "4x8x32x32 2x2/2": ((4, 8, 32, 32), 2, 2, 0),
    "64x64x32x32 2x2/2": ((64, 64, 32, 32), 2, 2, 0),
    "32x64x112x112 3x3/2/p1": ((32, 64, 112, 112), 3, 2, 1),
}
SMALL_SHAPES = ("4x8x32x32 2x2/2",)  # naive (a Python loop per window cell) and float64 only here
OPS = ("forward", "backward")


class MaxPool2d:
    params = (list(SHAPES), list(OPS), BACKENDS, ["float32", "float64"])
    param_names = ["shape", "op", "backend", "dtype"]
    timeout = 300
    # Inputs are built and warmed up in setup; one round of up to 5 samples keeps recording a commit
    # to minutes.
    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0

    def setup(self, shape, op, backend, dtype):
        require(backend)
        if (backend == "naive" or dtype == "float64") and shape not in SMALL_SHAPES:
            raise NotImplementedError("naive and float64 only on the small shape")
        input_shape, kernel, stride, padding = SHAPES[shape]
        x = normal(input_shape, dtype)
        pool = dict(kernel_size=kernel, stride=stride, padding=padding)
        y, indices = fastconv.max_pool2d(x, return_indices=True, **pool)
        pool["backend"] = backend
        gy = normal(y.shape, dtype, seed=1)
        self.run = {
            "forward": lambda: fastconv.max_pool2d(x, return_indices=True, **pool),
            "backward": lambda: fastconv.max_pool2d_backward(gy, indices, x.shape, backend=backend),
        }[op]
        warm_up(self.run)

    def time_max_pool2d(self, shape, op, backend, dtype):
        self.run()

    def peakmem_max_pool2d(self, shape, op, backend, dtype):
        self.run()
