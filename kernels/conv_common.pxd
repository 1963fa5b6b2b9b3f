# The geometry every convolution algorithm of kernels/ shares, and the fixed-order sum of weight-gradient
# partials. cdef inline: nothing is lost to calls between modules.
from cython cimport floating
from cython.parallel cimport prange

# The fewest units of work a call is cut into where the batch is small (load balance: every core gets work).
cdef enum:
    MIN_UNITS = 8
# The weight gradient's sum over the batch is split into this many fixed partials at most, added in their
# order: it sets the bits of the result, so it never follows the thread count or the load balance.
cdef enum:
    WEIGHT_PARTIALS = 8


cdef struct Conv:
    int batch, channels, height, width, out_channels, kernel_h, kernel_w
    int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w
    int groups, out_h, out_w
    int group_in, group_out  # channels of one group, in and out
    int k                    # rows of a column matrix: group_in * kernel_h * kernel_w
    bint pointwise           # 1x1, stride 1, no padding: the input is its own column matrix


cdef inline int floor_div(int a, int b) noexcept nogil:
    return a // b if a >= 0 else -((-a + b - 1) // b)


cdef inline int ceil_div(int a, int b) noexcept nogil:
    return -floor_div(-a, b)


cdef inline int clamp(int a, int low, int high) noexcept nogil:
    return low if a < low else (high if a > high else a)


cdef inline Conv geometry(p):
    cdef Conv c
    c.batch, c.channels, c.height, c.width = p.input_shape
    c.out_channels, c.group_in, c.kernel_h, c.kernel_w = p.weight_shape
    c.stride_h, c.stride_w = p.stride
    c.pad_top, c.pad_left = p.padding[0], p.padding[2]
    c.dilation_h, c.dilation_w = p.dilation
    c.groups, c.out_h, c.out_w = p.groups, p.out_height, p.out_width
    c.group_out = c.out_channels // c.groups
    c.k = c.group_in * c.kernel_h * c.kernel_w
    c.pointwise = (c.kernel_h == 1 and c.kernel_w == 1 and p.stride == (1, 1) and p.padding == (0, 0, 0, 0))
    return c


cdef inline const floating* bias_pointer(const floating[::1] bias):
    if bias is None:
        return NULL
    return &bias[0]


cdef enum:
    SUM_BLOCK = 4096  # elements of the total summed at a time: the block stays in L1 while each partial is added


cdef inline void sum_partials(const floating[:, ::1] partials, floating[::1] total, int threads):
    """total = partials[0] + partials[1] + ..., in that order for every element; block by block, each partial
    added to the whole block at once (one contiguous, vectorized pass per partial)."""
    cdef Py_ssize_t n = total.shape[0], block, start, end, e
    cdef int later
    for block in prange((n + SUM_BLOCK - 1) // SUM_BLOCK, nogil=True, schedule="static", num_threads=threads):
        start = block * SUM_BLOCK
        end = min(n, start + SUM_BLOCK)
        for e in range(start, end):
            total[e] = partials[0, e]
        for later in range(1, partials.shape[0]):
            for e in range(start, end):
                total[e] = total[e] + partials[later, e]


cdef enum:
    ALIGNMENT = 64  # bytes: a cache line, and an AVX-512 vector


cdef inline object aligned_rows(Py_ssize_t rows, Py_ssize_t length, dtype, bint zeroed):
    """A C-contiguous (rows, length or a little more) array whose rows each start on an ALIGNMENT boundary
    (NumPy aligns its buffers to 16 bytes only), so that a buffer's whole vectors never split a cache line;
    zero-filled if `zeroed`."""
    import numpy
    cdef Py_ssize_t itemsize = numpy.dtype(dtype).itemsize, per_line = ALIGNMENT // itemsize
    cdef Py_ssize_t stride = (length + per_line - 1) // per_line * per_line
    raw = (numpy.zeros if zeroed else numpy.empty)(rows * stride + per_line, dtype)
    cdef Py_ssize_t skip = (-raw.ctypes.data % ALIGNMENT) // itemsize
    return raw[skip:skip + rows * stride].reshape(rows, stride)
