"""Random cases and measures shared by the tests (TESTING.md): valid combinations drawn independently."""
import numpy as np

from fastconv.params import conv_params, pool_params


def rel_err(got, ref):
    """||got - ref|| / ||ref|| in float64 (absolute when ref is all zeros)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = np.linalg.norm(ref)
    return np.linalg.norm(got - ref) / (scale if scale > 0 else 1.0)


TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def _draw_conv(rng):
    groups = int(rng.choice([1, 1, 1, 2, 3]))
    depthwise = rng.random() < 0.15
    c_in = groups * int(rng.integers(1, 4))
    c_out = c_in if depthwise else groups * int(rng.integers(1, 4))
    if depthwise:
        groups = c_in
    kh, kw = (int(k) for k in rng.integers(1, 6, size=2))
    stride = tuple(int(s) for s in rng.choice([1, 1, 2, 3, 5], size=2))
    dilation = tuple(int(d) for d in rng.choice([1, 1, 2, 3], size=2))
    kind = rng.random()
    if kind < 0.15 and stride == (1, 1):
        padding = "same"
    elif kind < 0.25:
        padding = "valid"
    elif kind < 0.6:
        padding = int(rng.integers(0, 4))
    else:
        padding = tuple(int(p) for p in rng.integers(0, 4, size=2))
    return dict(
        x_shape=(int(rng.integers(1, 4)), c_in, int(rng.integers(1, 12)), int(rng.integers(1, 12))),
        w_shape=(c_out, c_in // groups, kh, kw),
        bias=bool(rng.random() < 0.7),
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )


def _draw_wide_conv(rng):
    """Stride 1 with more channels than _draw_conv draws: the backends' stride-1 fast paths (register tiles
    that fill, overflow and are cut short; kernel rows of many taps), on planes long and short against a
    tile, in batches that are cut into row bands or chunks of images."""
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 9)), groups * int(rng.integers(1, 13))
    kh, kw = (int(k) for k in rng.integers(1, 6, size=2))
    dilation = tuple(int(d) for d in rng.choice([1, 1, 2], size=2))
    padding = "same" if rng.random() < 0.3 else tuple(int(p) for p in rng.integers(0, 4, size=2))
    size = [int(s) for s in rng.integers(1, 21, size=2)]
    size = [max(s, (k - 1) * d + 1) for s, k, d in zip(size, (kh, kw), dilation)]  # room for the kernel
    return dict(
        x_shape=(int(rng.choice([1, 2, 5, 9])), c_in, *size),
        w_shape=(c_out, c_in // groups, kh, kw),
        bias=bool(rng.random() < 0.7),
        stride=1, padding=padding, dilation=dilation, groups=groups,
    )


def _draw_wide_strided_conv(rng):
    """Strides of 2 to 4 (one axis may be 1) with as many channels as _draw_wide_conv: the stride-phase split
    of the direct path (phases of uneven lengths, kernels shorter and longer than the stride, dilations that
    put every tap in one phase), on planes large enough to be cut into row bands."""
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 9)), groups * int(rng.integers(1, 13))
    kh, kw = (int(k) for k in rng.integers(1, 8, size=2))
    stride = tuple(int(s) for s in rng.choice([1, 2, 2, 3, 4], size=2))
    if stride == (1, 1):
        stride = (2, 2)
    dilation = tuple(int(d) for d in rng.choice([1, 1, 2], size=2))
    size = [int(s) for s in rng.integers(1, 41, size=2)]
    size = [max(s, (k - 1) * d + 1) for s, k, d in zip(size, (kh, kw), dilation)]  # room for the kernel
    return dict(
        x_shape=(int(rng.choice([1, 2, 5, 9])), c_in, *size),
        w_shape=(c_out, c_in // groups, kh, kw),
        bias=bool(rng.random() < 0.7),
        stride=stride, padding=tuple(int(p) for p in rng.integers(0, 4, size=2)), dilation=dilation, groups=groups,
    )


def _draw_deep_conv(rng):
    """Groups of 16 to 40 input channels, a vector and more: the direct path's channels-last weight gradient
    (channels padded to whole vectors, output channels short of a block), any stride."""
    groups = int(rng.choice([1, 1, 2]))
    c_in, c_out = groups * int(rng.integers(16, 41)), groups * int(rng.integers(1, 21))
    kh, kw = (int(k) for k in rng.integers(1, 5, size=2))
    dilation = tuple(int(d) for d in rng.choice([1, 1, 2], size=2))
    size = [int(s) for s in rng.integers(1, 15, size=2)]
    size = [max(s, (k - 1) * d + 1) for s, k, d in zip(size, (kh, kw), dilation)]  # room for the kernel
    return dict(
        x_shape=(int(rng.choice([1, 2, 3])), c_in, *size),
        w_shape=(c_out, c_in // groups, kh, kw),
        bias=bool(rng.random() < 0.7),
        stride=tuple(int(s) for s in rng.choice([1, 1, 2, 3], size=2)),
        padding=tuple(int(p) for p in rng.integers(0, 3, size=2)), dilation=dilation, groups=groups,
    )


def _draw_pointwise(rng):
    """1x1, stride 1, unpadded: a plain GEMM on the input (im2col:pointwise), with groups and wide channels."""
    groups = int(rng.choice([1, 1, 2, 4]))
    c_in, c_out = groups * int(rng.integers(1, 17)), groups * int(rng.integers(1, 17))
    return dict(
        x_shape=(int(rng.choice([1, 2, 3, 9])), c_in, int(rng.integers(1, 14)), int(rng.integers(1, 14))),
        w_shape=(c_out, c_in // groups, 1, 1),
        bias=bool(rng.random() < 0.7),
        stride=1, padding=[0, "valid", "same"][int(rng.integers(0, 3))],
        dilation=int(rng.choice([1, 2])), groups=groups,
    )


def conv_cases(count, seed, draw=_draw_conv):
    """`count` valid random convolutions, each a dict of shapes and keyword arguments."""
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < count:
        case = draw(rng)
        try:
            conv_params(case["x_shape"], case["w_shape"], case["stride"], case["padding"],
                        case["dilation"], case["groups"])
        except ValueError:
            continue
        cases.append(case)
    return cases


def _draw_pool(rng):
    kernel = tuple(int(k) for k in rng.integers(1, 5, size=2))
    return dict(
        x_shape=(int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 13)), int(rng.integers(1, 13))),
        kernel_size=kernel if rng.random() < 0.7 else kernel[0],
        stride=None if rng.random() < 0.3 else tuple(int(s) for s in rng.integers(1, 4, size=2)),
        padding=tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel),
        dilation=tuple(int(d) for d in rng.choice([1, 1, 2, 3], size=2)),
        ceil_mode=bool(rng.random() < 0.5),
    )


def _draw_wide_pool(rng):
    """The CNN poolings (2x2/2, 3x3/2, their padded and ceil_mode forms) on rows of up to 80 columns: windows
    enough for the vector loops of a row, and their tails."""
    kernel = (int(rng.integers(1, 4)), int(rng.choice([2, 3])))
    return dict(
        x_shape=(int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 12)), int(rng.integers(2, 81))),
        kernel_size=kernel, stride=(int(rng.integers(1, 3)), 2),
        padding=tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel),
        dilation=(int(rng.choice([1, 2])), 1), ceil_mode=bool(rng.random() < 0.5),
    )


def pool_cases(count, seed, draw=_draw_pool):
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < count:
        case = draw(rng)
        try:
            pool_params(case["x_shape"], case["kernel_size"], case["stride"], case["padding"],
                        case["dilation"], case["ceil_mode"])
        except ValueError:
            continue
        cases.append(case)
    return cases


def wide_pool_cases(count, seed):
    return pool_cases(count, seed, _draw_wide_pool)


def pool_input(case, dtype, seed=0):
    """Normal values with ties (a coarse grid), NaNs and -inf sprinkled in: every rule gets exercised."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal(case["x_shape"]) * 2) / 2
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.05] = -np.inf
    return x.astype(dtype)


def conv_kwargs(case):
    return {k: case[k] for k in ("stride", "padding", "dilation", "groups")}


def pool_kwargs(case):
    return {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}


def pointwise_cases(count, seed):
    return conv_cases(count, seed, _draw_pointwise)


def wide_conv_cases(count, seed):
    """`count` valid random stride-1 convolutions with many channels (see _draw_wide_conv)."""
    return conv_cases(count, seed, _draw_wide_conv)


def wide_strided_conv_cases(count, seed):
    """`count` valid random strided convolutions with many channels (see _draw_wide_strided_conv)."""
    return conv_cases(count, seed, _draw_wide_strided_conv)


def deep_conv_cases(count, seed):
    """`count` valid random convolutions with 16 to 40 input channels per group (see _draw_deep_conv)."""
    return conv_cases(count, seed, _draw_deep_conv)


def case_params(case):
    return conv_params(case["x_shape"], case["w_shape"], case["stride"], case["padding"], case["dilation"],
                       case["groups"])


def conv_arrays(case, dtype, seed=0):
    """Standard-normal input, weight, bias (or None) and an upstream gradient of the output's shape."""
    rng = np.random.default_rng(seed)
    p = case_params(case)
    x = rng.standard_normal(case["x_shape"]).astype(dtype)
    w = rng.standard_normal(case["w_shape"]).astype(dtype)
    b = rng.standard_normal(case["w_shape"][0]).astype(dtype) if case["bias"] else None
    gy = rng.standard_normal(p.output_shape).astype(dtype)
    return x, w, b, gy


def case_id(case):
    return "-".join(f"{v}" for v in case.values()).replace(" ", "")
