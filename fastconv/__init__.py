"""fastconv: fast CPU kernels for 2-D convolution and max-pooling, forward and backward, behind one
PyTorch-compatible API with interchangeable backends and algorithms."""
from importlib import metadata as _metadata

from .api import (
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    explain,
    max_pool2d,
    max_pool2d_backward,
)
from .dispatch import (
    algorithms,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    use_backend,
)
from .ops import UnsupportedError
from .threads import get_num_threads, set_num_threads, threads

try:
    __version__ = _metadata.version("fastconv")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward", "max_pool2d",
    "max_pool2d_backward", "explain",
    "algorithms", "available_backends", "backend_status", "get_backend", "set_backend", "use_backend",
    "UnsupportedError", "get_num_threads", "set_num_threads", "threads",
]
