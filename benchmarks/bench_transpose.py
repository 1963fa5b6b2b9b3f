"""conv_transpose2d forward and both gradients (a decoder's 2x upsampling), with an explicit backend."""
from .common import BACKENDS, fastconv, normal, require, warm_up

try:  # the report's cases (fastconv/suite.py); a commit without them has no conv_transpose2d either
    from fastconv.suite import TRANSPOSED as SHAPES
except ImportError:
    SHAPES = {}
OPS = ("forward", "grad_input", "grad_weight")


class ConvTranspose2d:
    params = (list(SHAPES), list(OPS), [b for b in BACKENDS if ":" not in b and b != "naive"])
    param_names = ["shape", "op", "backend"]
    timeout = 300
    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0

    def setup(self, shape, op, backend):
        require(backend)
        if not hasattr(fastconv, "conv_transpose2d"):
            raise NotImplementedError("conv_transpose2d is not in this version")
        input_shape, out_channels, kernel, stride, padding, output_padding = SHAPES[shape]
        x = normal(input_shape, "float32", seed=0)
        w = normal((input_shape[1], out_channels, kernel, kernel), "float32", seed=1)
        conv = dict(stride=stride, padding=padding, output_padding=output_padding, backend=backend)
        gy = normal(fastconv.conv_transpose2d(x, w, **conv).shape, "float32", seed=2)
        self.run = {
            "forward": lambda: fastconv.conv_transpose2d(x, w, **conv),
            "grad_input": lambda: fastconv.conv_transpose2d_backward(gy, x, w, output_mask=(True, False, False),
                                                                     **conv),
            "grad_weight": lambda: fastconv.conv_transpose2d_backward(gy, x, w, output_mask=(False, True, False),
                                                                      **conv),
        }[op]
        warm_up(self.run)

    def time_conv_transpose2d(self, shape, op, backend):
        self.run()
