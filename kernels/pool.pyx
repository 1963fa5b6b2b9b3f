# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Max-pooling kernels, parallel over the N*C planes: each plane belongs to one thread, so the backward
scatter needs no atomics and adds each plane's gradients in a fixed order."""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport int64_t
from libc.string cimport memset


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define prefetch_for_writing(address) __builtin_prefetch((address), 1)
    #else
    #define prefetch_for_writing(address) ((void)(address))
    #endif
    """
    void prefetch_for_writing(const void* address) noexcept nogil

cdef extern from "pool_rows.h" nogil:
    ctypedef void (*pool_rows_float_fn)(const float* row, int count, int cells, int rows, ptrdiff_t row_stride,
                                        int skip, float* best, int64_t* indices, int64_t origin)
    ctypedef void (*pool_rows_double_fn)(const double* row, int count, int cells, int rows, ptrdiff_t row_stride,
                                         int skip, double* best, int64_t* indices, int64_t origin)
    ctypedef struct pool_rows:
        pool_rows_float_fn rows_float
        pool_rows_double_fn rows_double
    pool_rows pool_rows_select(const char* name)

VECTOR_ISAS = ("avx512", "none")  # the window rows of pool_rows.h, best first ("none": pool.pyx's own loops)
cdef pool_rows rows_in_use = pool_rows_select(b"none")
cdef const char* rows_name = b"none"


def use_vector_isa(name):
    """Use the named window rows for the 2- and 3-cell stride-2 windows (VECTOR_ISAS; the best the CPU runs by
    default). Returns False, changing nothing, when the CPU cannot run them."""
    global rows_in_use, rows_name
    cdef pool_rows found = pool_rows_select(name.encode())
    if name != "none" and found.rows_float == NULL:
        return False
    rows_in_use, rows_name = found, (b"avx512" if name == "avx512" else b"none")
    return True


def vector_isa():
    return rows_name.decode()


for _isa in VECTOR_ISAS:
    if use_vector_isa(_isa):
        break


cdef enum:
    TILE = 64
# Planes go to the threads in this many runs per thread, taken as threads come free: a thread slowed by the
# machine's other load leaves its later runs to the others.
cdef enum:
    CHUNKS_PER_THREAD = 16


cdef struct Pool:
    int height, width, out_h, out_w, kernel_h, kernel_w
    int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w


cdef inline int ceil_div(int a, int b) noexcept nogil:
    return (a + b - 1) // b  # a >= 0


cdef inline void window_taps(int start, int size, int kernel, int dilation, int* low, int* high) noexcept nogil:
    """Taps [low, high) of a window starting at `start` (< size, by the output-size rule) inside [0, size)."""
    if start >= 0 and start + (kernel - 1) * dilation < size:  # inside: no division
        low[0], high[0] = 0, kernel
        return
    low[0] = 0 if start >= 0 else (-start + dilation - 1) // dilation
    high[0] = min(kernel, (size - start + dilation - 1) // dilation)


cdef inline void pool_window(const floating* x, const Pool* q, int h0, int kh_low, int kh_high, int ow,
                             floating* y, int64_t* indices) noexcept nogil:
    """One window, PyTorch's rule: scan the in-bounds taps row-major; a tap wins if greater or NaN."""
    cdef int w0 = ow * q.stride_w - q.pad_w, kh, kw, kw_low, kw_high
    cdef int64_t best_index, index
    cdef floating best, value
    window_taps(w0, q.width, q.kernel_w, q.dilation_w, &kw_low, &kw_high)
    best_index = <int64_t>(h0 + kh_low * q.dilation_h) * q.width + w0 + kw_low * q.dilation_w
    best = x[best_index]
    for kh in range(kh_low, kh_high):
        for kw in range(kw_low, kw_high):
            index = <int64_t>(h0 + kh * q.dilation_h) * q.width + w0 + kw * q.dilation_w
            value = x[index]
            if value > best or value != value:
                best, best_index = value, index
    y[ow] = best
    if indices != NULL:
        indices[ow] = best_index


cdef inline void scan_window_row(const floating* row, int row_at, int count, int kernel_w, int stride_w,
                                 int dilation_w, bint first, floating* best, unsigned* best_at) noexcept nogil:
    """One window row of `count` windows lying inside the input columns: cell b of window j is
    row[j*stride_w + b*dilation_w], at offset row_at + j*stride_w + b*dilation_w; `first` starts each window
    from its cell 0. Selects, not branches (random data mispredicts); inlined with constant shapes, the loop
    over the windows vectorizes (strided loads, float values and 32-bit offsets of the same width)."""
    cdef int j, b, at
    cdef unsigned current_at
    cdef floating value, current
    cdef bint take
    for j in range(count):
        if first:  # loop-invariant (the compiler unswitches it); best is not read: it is not written yet
            current, current_at = row[j * stride_w], row_at + j * stride_w  # cell 0 again below is a no-op
        else:
            current, current_at = best[j], best_at[j]
        for b in range(kernel_w):
            at = j * stride_w + b * dilation_w
            value = row[at]
            take = (value > current) | (value != value)
            current = value if take else current
            current_at = row_at + at if take else current_at
        best[j], best_at[j] = current, current_at


cdef inline void scan_window_row_values(const floating* row, int count, int kernel_w, int stride_w,
                                        int dilation_w, bint first, floating* best) noexcept nogil:
    """scan_window_row without the offsets: the same selects on the values alone."""
    cdef int j, b
    cdef floating value, current
    for j in range(count):
        current = row[j * stride_w] if first else best[j]
        for b in range(kernel_w):
            value = row[j * stride_w + b * dilation_w]
            current = value if (value > current) | (value != value) else current
        best[j] = current


cdef inline bint vector_rows(const Pool* q, const pool_rows* rows) noexcept nogil:
    """Whether the window rows of pool_rows.h serve this pooling (2 or 3 cells at stride 2, on AVX-512)."""
    return rows.rows_float != NULL and q.stride_w == 2 and q.dilation_w == 1 and (q.kernel_w == 2 or q.kernel_w == 3)


cdef inline void scan_row(const floating* row, int row_at, int count, const Pool* q, bint first, floating* best,
                          unsigned* best_at) noexcept nogil:
    """One window row of a tile, values and offsets (best_at NULL: the values only): constant shapes for the
    common kernels let the compiler vectorize their strided loads."""
    if best_at == NULL:
        if q.kernel_w == 2 and q.stride_w == 2 and q.dilation_w == 1:
            scan_window_row_values(row, count, 2, 2, 1, first, best)
        elif q.kernel_w == 3 and q.stride_w == 2 and q.dilation_w == 1:
            scan_window_row_values(row, count, 3, 2, 1, first, best)
        elif q.kernel_w == 3 and q.stride_w == 1 and q.dilation_w == 1:
            scan_window_row_values(row, count, 3, 1, 1, first, best)
        else:
            scan_window_row_values(row, count, q.kernel_w, q.stride_w, q.dilation_w, first, best)
    elif q.kernel_w == 2 and q.stride_w == 2 and q.dilation_w == 1:
        scan_window_row(row, row_at, count, 2, 2, 1, first, best, best_at)
    elif q.kernel_w == 3 and q.stride_w == 2 and q.dilation_w == 1:
        scan_window_row(row, row_at, count, 3, 2, 1, first, best, best_at)
    elif q.kernel_w == 3 and q.stride_w == 1 and q.dilation_w == 1:
        scan_window_row(row, row_at, count, 3, 1, 1, first, best, best_at)
    else:
        scan_window_row(row, row_at, count, q.kernel_w, q.stride_w, q.dilation_w, first, best, best_at)


cdef void pool_plane(const floating* x, const Pool* q, const pool_rows* rows, floating* y,
                     int64_t* indices) noexcept nogil:
    """Each output row: the windows whose columns all lie inside the input go to pool_rows.h's window rows
    where they serve, else window row by window row across a tile of the output row (vectorized, see
    scan_window_row); the edge windows one by one. indices NULL: the values only."""
    cdef int oh, ow, h0, kh, kh_low, kh_high, row_at
    cdef int inner_low = min(q.out_w, ceil_div(q.pad_w, q.stride_w))
    cdef int last_start = q.width - 1 - (q.kernel_w - 1) * q.dilation_w + q.pad_w  # of an inner window, padded
    cdef int inner_high = inner_low if last_start < 0 else max(inner_low, min(q.out_w, last_start // q.stride_w + 1))
    # A tile of windows: their best values go straight to y, their offsets from the tile's first cell to a
    # local array (in L1), 32-bit: as wide as float32 values, and small whatever the plane size.
    cdef unsigned tile_at[TILE]  # unsigned: widens to int64 without sign work
    cdef int tile, tile_size
    cdef int64_t tile_origin
    cdef int64_t* tile_indices
    cdef bint vectors = vector_rows(q, rows)
    # the window rows also take the first window where only its first column lies in the padding
    cdef bint skip = vectors and q.pad_w == 1 and inner_low == 1 and inner_high > 1
    cdef int first = 0 if skip else inner_low  # the first window of the window rows' run
    for oh in range(q.out_h):
        h0 = oh * q.stride_h - q.pad_h
        window_taps(h0, q.height, q.kernel_h, q.dilation_h, &kh_low, &kh_high)
        for ow in range(first if vectors else inner_low):
            pool_window(x, q, h0, kh_low, kh_high, ow, y, indices)
        for ow in range(inner_high, q.out_w):
            pool_window(x, q, h0, kh_low, kh_high, ow, y, indices)
        tile = inner_low
        if vectors and inner_low < inner_high:  # the whole run of inner windows, every window row at once
            tile_origin = <int64_t>(h0 + kh_low * q.dilation_h) * q.width + first * q.stride_w - q.pad_w
            if floating is float:
                rows.rows_float(x + tile_origin, inner_high - first, q.kernel_w, kh_high - kh_low,
                                <ptrdiff_t>q.dilation_h * q.width, skip, y + first,
                                indices + first if indices != NULL else NULL, tile_origin)
            else:
                rows.rows_double(x + tile_origin, inner_high - first, q.kernel_w, kh_high - kh_low,
                                 <ptrdiff_t>q.dilation_h * q.width, skip, y + first,
                                 indices + first if indices != NULL else NULL, tile_origin)
            tile = inner_high
        while tile < inner_high:
            tile_size = min(TILE, inner_high - tile)
            tile_origin = <int64_t>(h0 + kh_low * q.dilation_h) * q.width + tile * q.stride_w - q.pad_w
            for kh in range(kh_low, kh_high):
                row_at = (kh - kh_low) * q.dilation_h * q.width
                scan_row(x + tile_origin + row_at, row_at, tile_size, q, kh == kh_low, y + tile,
                         tile_at if indices != NULL else NULL)
            if indices != NULL:
                # Indexed from a pointer (with -fwrapv a 32-bit `tile + ow` need not be contiguous): vectorizes.
                tile_indices = indices + tile
                for ow in range(tile_size):
                    tile_indices[ow] = tile_origin + tile_at[ow]
            tile += TILE
        y += q.out_w
        if indices != NULL:
            indices += q.out_w


def max_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] y, int64_t[:, :, :, ::1] indices,
                       p, int threads):
    """y = max-pooling of x, and its argmax indices unless `indices` is None."""
    cdef Pool q
    q.height, q.width, q.out_h, q.out_w = p.in_height, p.in_width, p.out_height, p.out_width
    q.kernel_h, q.kernel_w = p.kernel_height, p.kernel_width
    q.stride_h, q.stride_w = p.stride
    q.pad_h, q.pad_w = p.padding
    q.dilation_h, q.dilation_w = p.dilation
    cdef Py_ssize_t planes = <Py_ssize_t>x.shape[0] * x.shape[1], k
    cdef Py_ssize_t plane = <Py_ssize_t>q.height * q.width, out_plane = <Py_ssize_t>q.out_h * q.out_w
    cdef int64_t* all_indices = NULL if indices is None else &indices[0, 0, 0, 0]
    cdef pool_rows rows = rows_in_use  # this call's, whatever is selected while it runs
    cdef Py_ssize_t chunk = max(1, planes // (CHUNKS_PER_THREAD * threads))
    for k in prange(planes, nogil=True, schedule="dynamic", chunksize=chunk, num_threads=threads):
        pool_plane(&x[0, 0, 0, 0] + k * plane, &q, &rows, &y[0, 0, 0, 0] + k * out_plane,
                   NULL if all_indices == NULL else all_indices + k * out_plane)


cdef enum:
    SCATTER_BLOCK = 16  # outputs of the backward scattered between two parts of the next plane's prefetch


cdef inline void prefetch_part_for_writing(const void* region, Py_ssize_t size, Py_ssize_t part,
                                           Py_ssize_t parts) noexcept nogil:
    """Fetches for writing the cache lines of part `part` of `parts` of region[0:size] (bytes)."""
    cdef Py_ssize_t lines = (size + 63) // 64, line
    for line in range(lines * part // parts, lines * (part + 1) // parts):
        prefetch_for_writing(<const char*>region + line * 64)


cdef Py_ssize_t scatter_plane(const floating* gy, const int64_t* indices, Py_ssize_t outputs, Py_ssize_t plane,
                              floating* gx, const floating* next_gx) noexcept nogil:
    """gx = 0, then gx[indices[j]] += gy[j]; stops at the first index outside [0, plane) and returns its
    position j (-1 if none), so nothing is ever written out of bounds. Block by block of outputs, a part of
    next_gx (the plane after this one, NULL if none) is fetched for writing: the memory fills those lines
    while this plane's scatter runs, where the next plane's zero-fill would wait for each line."""
    cdef Py_ssize_t j, start = 0, blocks = (outputs + SCATTER_BLOCK - 1) // SCATTER_BLOCK
    cdef int64_t index
    memset(gx, 0, plane * sizeof(floating))
    while start < outputs:
        if next_gx != NULL:
            prefetch_part_for_writing(next_gx, plane * sizeof(floating), start // SCATTER_BLOCK, blocks)
        for j in range(start, min(outputs, start + SCATTER_BLOCK)):
            index = indices[j]
            if index < 0 or index >= plane:
                return j
            gx[index] += gy[j]
        start += SCATTER_BLOCK
    return -1


def max_pool2d_backward(const floating[:, :, :, ::1] gy, const int64_t[:, :, :, ::1] indices,
                        floating[:, :, :, ::1] gx, int threads):
    """gx = the gradient of max-pooling; returns None, or an index found outside its plane (gx is then
    incomplete, never written out of bounds)."""
    cdef Py_ssize_t planes = <Py_ssize_t>gy.shape[0] * gy.shape[1], k
    cdef Py_ssize_t plane = <Py_ssize_t>gx.shape[2] * gx.shape[3], outputs = <Py_ssize_t>gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t[::1] bad_position = np.empty(planes, np.intp)
    cdef Py_ssize_t chunk = max(1, planes // (CHUNKS_PER_THREAD * threads))
    for k in prange(planes, nogil=True, schedule="dynamic", chunksize=chunk, num_threads=threads):
        bad_position[k] = scatter_plane(&gy[0, 0, 0, 0] + k * outputs, &indices[0, 0, 0, 0] + k * outputs, outputs,
                                        plane, &gx[0, 0, 0, 0] + k * plane,
                                        &gx[0, 0, 0, 0] + (k + 1) * plane if k + 1 < planes else NULL)
    for k in range(planes):
        if bad_position[k] >= 0:
            return int(np.asarray(indices).reshape(planes, outputs)[k, bad_position[k]])
    return None
