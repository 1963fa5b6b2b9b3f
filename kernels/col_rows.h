/* col2im's inner loop, the adjoint of im2col on a run of rows: each row of a column matrix added into a row of
 * the input gradient, in the CPU's widest vectors (FASTCONV_CLONES). */
#ifndef FASTCONV_COL_ROWS_H
#define FASTCONV_COL_ROWS_H
#include <stddef.h>

#include "clones.h"

/* dst[i * dst_plane + r * dst_row + j * dst_step] += src[i * src_plane + r * src_row + j] for i < planes,
 * r < rows, j < n (contiguous where dst_step is 1). */
#define COL_ROWS_ADD(NAME, T)                                                                                   \
    FASTCONV_CLONES static void NAME(T *dst, ptrdiff_t dst_plane, ptrdiff_t dst_row, ptrdiff_t dst_step,       \
                                     const T *src, ptrdiff_t src_plane, ptrdiff_t src_row, int planes, int rows, \
                                     int n)                                                                    \
    {                                                                                                          \
        for (int i = 0; i < planes; i++)                                                                       \
            for (int r = 0; r < rows; r++) {                                                                   \
                T *d = dst + i * dst_plane + r * dst_row;                                                      \
                const T *s = src + i * src_plane + r * src_row;                                                \
                if (dst_step == 1)                                                                             \
                    for (int j = 0; j < n; j++) d[j] += s[j];                                                  \
                else                                                                                           \
                    for (int j = 0; j < n; j++) d[j * dst_step] += s[j];                                       \
            }                                                                                                  \
    }

COL_ROWS_ADD(add_rows_float, float)
COL_ROWS_ADD(add_rows_double, double)

#endif
