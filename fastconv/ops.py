"""The five kernel operations, and what an algorithm is: the vocabulary shared by the backends and dispatch.

An algorithm is one way of computing some of the operations, inside one backend (DESIGN.md section 3).
Its functions are called only with validated, C-contiguous arrays of one float dtype and normalized params:

    conv2d_forward(x, w, b, p) -> y                 (b may be None)
    conv2d_backward_input(gy, w, p) -> gx
    conv2d_backward_weight(gy, x, p) -> gw
    max_pool2d_forward(x, p) -> (y, indices)         (indices None where p.with_indices is False)
    max_pool2d_backward(gy, indices, p) -> gx       (p: PoolBackwardParams; checks each index as it scatters)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

CONV_OPS = ("conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight")
POOL_OPS = ("max_pool2d_forward", "max_pool2d_backward")
OPS = CONV_OPS + POOL_OPS


class UnsupportedError(ValueError):
    """The algorithm asked for cannot serve this call; the message says why."""


def _always(op, p, dtype):
    return None


@dataclass(frozen=True)
class Algorithm:
    """One way of computing `ops` (op name -> function). `applicable(op, p, dtype)` answers, cheaply and
    honestly, None where the algorithm serves the call, else the reason it cannot ("stride 1 only")."""

    name: str
    ops: Mapping[str, Callable]
    applicable: Callable = field(default=_always)

    def supports(self, op, p, dtype):
        if op not in self.ops:
            return f"does not implement {op} (it implements {', '.join(self.ops)})"
        return self.applicable(op, p, dtype)
