/* col2im's inner loop, the adjoint of im2col on a run of rows: each row of a column matrix added into a row of
 * the input gradient. With `avx512` (the caller runs its AVX-512 kernels) contiguous rows go in 256-bit
 * vectors with AVX-512's masked ends, where the CPU has AVX-512 VL: small layers' rows are a few elements
 * long, and a compiled loop over them spends more on its prologue and epilogue than on the adds (256 bits, not
 * 512: a masked 512-bit store holds back a load of the next row whenever the two vectors' 64 bytes overlap,
 * though their lanes do not). Otherwise in the CPU's widest vectors (FASTCONV_CLONES). */
#ifndef FASTCONV_COL_ROWS_H
#define FASTCONV_COL_ROWS_H
#include <stddef.h>

#include "clones.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define COL_ROWS_X86 1
#endif

/* dst[i * dst_plane + r * dst_row + j * dst_step] += src[i * src_plane + r * src_row + j] for i < planes,
 * r < rows, j < n (contiguous where dst_step is 1). */
#define COL_ROWS_ADD_LOOPS(NAME, T, ATTRIBUTES)                                                                 \
    ATTRIBUTES static void NAME(T *dst, ptrdiff_t dst_plane, ptrdiff_t dst_row, ptrdiff_t dst_step,            \
                                const T *src, ptrdiff_t src_plane, ptrdiff_t src_row, int planes, int rows, int n) \
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
COL_ROWS_ADD_LOOPS(add_rows_float_loops, float, FASTCONV_CLONES)
COL_ROWS_ADD_LOOPS(add_rows_double_loops, double, FASTCONV_CLONES)

#ifdef COL_ROWS_X86
/* The contiguous rows in whole vectors, the last one masked (LANES per vector). */
#define COL_ROWS_ADD_AVX512(NAME, T, LANES, MASK, VEC, LOAD, STORE, ADD)                                       \
    __attribute__((target("avx512f,avx512vl"))) static void NAME(T *dst, ptrdiff_t dst_plane, ptrdiff_t dst_row, \
                                                                 const T *src, ptrdiff_t src_plane,             \
                                                                 ptrdiff_t src_row, int planes, int rows, int n) \
    {                                                                                                          \
        for (int i = 0; i < planes; i++)                                                                       \
            for (int r = 0; r < rows; r++) {                                                                   \
                T *d = dst + i * dst_plane + r * dst_row;                                                      \
                const T *s = src + i * src_plane + r * src_row;                                                \
                for (int j = 0; j < n; j += LANES) {                                                           \
                    MASK lanes = n - j >= LANES ? (MASK)-1 : (MASK)((1u << (n - j)) - 1);                     \
                    VEC sum = ADD(LOAD(lanes, d + j), LOAD(lanes, s + j));                                     \
                    STORE(d + j, lanes, sum);                                                                  \
                }                                                                                              \
            }                                                                                                  \
    }
COL_ROWS_ADD_AVX512(add_rows_float_avx512, float, 8, __mmask8, __m256, _mm256_maskz_loadu_ps,
                    _mm256_mask_storeu_ps, _mm256_add_ps)
COL_ROWS_ADD_AVX512(add_rows_double_avx512, double, 4, __mmask8, __m256d, _mm256_maskz_loadu_pd,
                    _mm256_mask_storeu_pd, _mm256_add_pd)
#endif

#ifdef COL_ROWS_X86
#define COL_ROWS_CONTIGUOUS_AVX512(NAME)                                                                       \
    if (avx512 && dst_step == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) { \
        NAME##_avx512(dst, dst_plane, dst_row, src, src_plane, src_row, planes, rows, n);                      \
        return;                                                                                                \
    }
#else
#define COL_ROWS_CONTIGUOUS_AVX512(NAME)
#endif

#define COL_ROWS_ADD(NAME, T)                                                                                   \
    static void NAME(T *dst, ptrdiff_t dst_plane, ptrdiff_t dst_row, ptrdiff_t dst_step, const T *src,        \
                     ptrdiff_t src_plane, ptrdiff_t src_row, int planes, int rows, int n, int avx512)          \
    {                                                                                                          \
        (void)avx512;                                                                                          \
        COL_ROWS_CONTIGUOUS_AVX512(NAME)                                                                       \
        NAME##_loops(dst, dst_plane, dst_row, dst_step, src, src_plane, src_row, planes, rows, n);            \
    }
COL_ROWS_ADD(add_rows_float, float)
COL_ROWS_ADD(add_rows_double, double)

#endif
