"""One module per backend, each exposing the same functions (DESIGN.md section 3):

conv2d_forward(x, w, b, p) -> y; conv2d_backward_input(gy, w, p) -> gx; conv2d_backward_weight(gy, x, p)
-> gw; max_pool2d_forward(x, p) -> (y, indices); max_pool2d_backward(gy, indices, input_shape) -> gx;
supports(op, p, dtype) -> None or the reason it cannot; optionally describe() -> str, a line for
`fastconv info` (threading layer, OpenMP, BLAS...). Arrays arrive validated and C-contiguous, and
are never written to.
"""
