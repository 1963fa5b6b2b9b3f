"""One module per backend (implementation technology), each declaring (DESIGN.md section 3):

ALGORITHMS: a tuple of fastconv.ops.Algorithm, each named within the backend ("direct", "gemm", ...) with
the functions of the ops it implements and its `supports(op, p, dtype)`; optionally preferred(op, p, dtype)
-> algorithm names in the order to try when nothing is measured (default: the order of ALGORITHMS), and
describe() -> str, a line for `fastconv info` (threading layer, OpenMP, BLAS...). Arrays arrive validated
and C-contiguous, and are never written to.
"""
