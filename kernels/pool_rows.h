/* AVX-512 window rows for the max-pooling forward of kernels/pool.pyx: windows of 2 or 3 cells at stride 2,
 * dilation 1 (the 2x2/2 and 3x3/2 poolings of CNNs), 16 float or 8 double windows at a time. The stride-2
 * cells come from two loads and in-register permutes, where the compiler's own vectorization of the strided
 * loads (pool.pyx, built for the generic instruction set) takes several instructions per cell. Chosen at run
 * time: pool_rows_select("avx512") gives NULL functions on CPUs without AVX-512 (pool.pyx then keeps its own
 * loops), as pool_rows_select("none") does on any.
 *
 * A call is scan_window_row of pool.pyx for these shapes: for the `count` windows j of one window row, cell b
 * of window j is row[2 * j + b], at offset row_at + 2 * j + b; `first` starts each window from its cell 0,
 * otherwise from best[j] (and best_at[j]). A cell wins if it is greater or NaN, cells in order: PyTorch's
 * rule. best_at NULL: the values only. indices not NULL (a window's last row): the winners' offsets go out as
 * indices[j] = origin + offset (int64) instead of into best_at. Only row[0 .. 2 * count + cells - 3] is read. */
#ifndef FASTCONV_POOL_ROWS_H
#define FASTCONV_POOL_ROWS_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef void (*pool_rows_float_fn)(const float *row, unsigned row_at, int count, int cells, int first, float *best,
                                   unsigned *best_at, int64_t *indices, int64_t origin);
typedef void (*pool_rows_double_fn)(const double *row, unsigned row_at, int count, int cells, int first,
                                    double *best, unsigned *best_at, int64_t *indices, int64_t origin);

typedef struct {
    pool_rows_float_fn rows_float;
    pool_rows_double_fn rows_double;
} pool_rows;

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

__attribute__((target("avx512f,avx512vl"))) static inline __mmask16 pool_lanes(int n)
{
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

__attribute__((target("avx512f,avx512vl"), always_inline))
static inline void pool_rows_float_body(const float *row, unsigned row_at, int count, int cells, int first,
                                        float *best, unsigned *best_at, int64_t *indices, int64_t origin)
{
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i next = _mm512_add_epi32(even, _mm512_set1_epi32(2));  /* lane 15 wraps to element 0 */
    const __m512i lane_at = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 1);
    for (int j = 0; j < count; j += 16) {
        const float *cell = row + 2 * j;
        int readable = 2 * (count - j) + cells - 2;  /* elements from cell on that belong to these windows */
        __mmask16 active = pool_lanes(count - j);
        __m512 low = _mm512_maskz_loadu_ps(pool_lanes(readable), cell);
        __m512 high = _mm512_maskz_loadu_ps(pool_lanes(readable - 16), cell + 16);
        __m512 v[3];
        v[0] = _mm512_permutex2var_ps(low, even, high);
        v[1] = _mm512_permutex2var_ps(low, odd, high);
        if (cells == 3) {
            v[2] = _mm512_permutex2var_ps(low, next, high);
            if (readable > 32)  /* window j + 15's last cell, element 32 */
                v[2] = _mm512_mask_broadcastss_ps(v[2], (__mmask16)0x8000, _mm_load_ss(cell + 32));
        }
        __m512i base = _mm512_add_epi32(_mm512_set1_epi32((int)(row_at + 2u * (unsigned)j)), lane_at);
        __m512 current = first ? v[0] : _mm512_maskz_loadu_ps(active, best + j);
        __m512i current_at = best_at == NULL || first ? base : _mm512_maskz_loadu_epi32(active, best_at + j);
        for (int b = first ? 1 : 0; b < cells; b++) {
            __mmask16 take = _mm512_cmp_ps_mask(v[b], current, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v[b], v[b], _CMP_UNORD_Q);
            current = _mm512_mask_mov_ps(current, take, v[b]);
            if (best_at != NULL)
                current_at = _mm512_mask_mov_epi32(current_at, take, _mm512_add_epi32(base, _mm512_set1_epi32(b)));
        }
        _mm512_mask_storeu_ps(best + j, active, current);
        if (indices != NULL) {
            __m512i at = _mm512_set1_epi64(origin);
            _mm512_mask_storeu_epi64(indices + j, (__mmask8)active,
                                     _mm512_add_epi64(at, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(current_at))));
            _mm512_mask_storeu_epi64(indices + j + 8, (__mmask8)(active >> 8),
                                     _mm512_add_epi64(at, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(current_at, 1))));
        } else if (best_at != NULL) {
            _mm512_mask_storeu_epi32(best_at + j, active, current_at);
        }
    }
}

__attribute__((target("avx512f,avx512vl"), always_inline))
static inline void pool_rows_double_body(const double *row, unsigned row_at, int count, int cells, int first,
                                         double *best, unsigned *best_at, int64_t *indices, int64_t origin)
{
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_add_epi64(even, _mm512_set1_epi64(1));
    const __m512i next = _mm512_add_epi64(even, _mm512_set1_epi64(2));  /* lane 7 wraps to element 0 */
    const __m256i lane_at = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    for (int j = 0; j < count; j += 8) {
        const double *cell = row + 2 * j;
        int readable = 2 * (count - j) + cells - 2;
        __mmask8 active = (__mmask8)pool_lanes(count - j);  /* the low 8 lanes of a 16-lane mask */
        __m512d low = _mm512_maskz_loadu_pd((__mmask8)pool_lanes(readable), cell);
        __m512d high = _mm512_maskz_loadu_pd((__mmask8)pool_lanes(readable - 8), cell + 8);
        __m512d v[3];
        v[0] = _mm512_permutex2var_pd(low, even, high);
        v[1] = _mm512_permutex2var_pd(low, odd, high);
        if (cells == 3) {
            v[2] = _mm512_permutex2var_pd(low, next, high);
            if (readable > 16)  /* window j + 7's last cell, element 16 */
                v[2] = _mm512_mask_broadcastsd_pd(v[2], (__mmask8)0x80, _mm_load_sd(cell + 16));
        }
        __m256i base = _mm256_add_epi32(_mm256_set1_epi32((int)(row_at + 2u * (unsigned)j)), lane_at);
        __m512d current = first ? v[0] : _mm512_maskz_loadu_pd(active, best + j);
        __m256i current_at = best_at == NULL || first ? base : _mm256_maskz_loadu_epi32(active, best_at + j);
        for (int b = first ? 1 : 0; b < cells; b++) {
            __mmask8 take = _mm512_cmp_pd_mask(v[b], current, _CMP_GT_OQ) | _mm512_cmp_pd_mask(v[b], v[b], _CMP_UNORD_Q);
            current = _mm512_mask_mov_pd(current, take, v[b]);
            if (best_at != NULL)
                current_at = _mm256_mask_mov_epi32(current_at, take, _mm256_add_epi32(base, _mm256_set1_epi32(b)));
        }
        _mm512_mask_storeu_pd(best + j, active, current);
        if (indices != NULL)
            _mm512_mask_storeu_epi64(indices + j, active,
                                     _mm512_add_epi64(_mm512_set1_epi64(origin), _mm512_cvtepu32_epi64(current_at)));
        else if (best_at != NULL)
            _mm256_mask_storeu_epi32(best_at + j, active, current_at);
    }
}
/* The bodies above with constant cells, first and offsets-or-not: no branch left in their loops. */
#define POOL_ROWS_DISPATCH(T)                                                                                  \
    __attribute__((target("avx512f,avx512vl")))                                                               \
    static void pool_rows_##T##_avx512(const T *row, unsigned row_at, int count, int cells, int first, T *best, \
                                       unsigned *best_at, int64_t *indices, int64_t origin)                    \
    {                                                                                                          \
        if (best_at == NULL) {                                                                                 \
            if (cells == 3) {                                                                                  \
                if (first) pool_rows_##T##_body(row, row_at, count, 3, 1, best, NULL, NULL, 0);                \
                else pool_rows_##T##_body(row, row_at, count, 3, 0, best, NULL, NULL, 0);                      \
            } else {                                                                                           \
                if (first) pool_rows_##T##_body(row, row_at, count, 2, 1, best, NULL, NULL, 0);                \
                else pool_rows_##T##_body(row, row_at, count, 2, 0, best, NULL, NULL, 0);                      \
            }                                                                                                  \
        } else if (cells == 3) {                                                                               \
            if (first) pool_rows_##T##_body(row, row_at, count, 3, 1, best, best_at, indices, origin);         \
            else pool_rows_##T##_body(row, row_at, count, 3, 0, best, best_at, indices, origin);               \
        } else {                                                                                               \
            if (first) pool_rows_##T##_body(row, row_at, count, 2, 1, best, best_at, indices, origin);         \
            else pool_rows_##T##_body(row, row_at, count, 2, 0, best, best_at, indices, origin);               \
        }                                                                                                      \
    }
POOL_ROWS_DISPATCH(float)
POOL_ROWS_DISPATCH(double)
#define POOL_ROWS_X86 1
#endif

/* The named window rows ("avx512" or "none") where the CPU runs them, else NULL functions. */
static pool_rows pool_rows_select(const char *name)
{
    pool_rows none = {NULL, NULL};
#ifdef POOL_ROWS_X86
    __builtin_cpu_init();
    if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
        pool_rows k = {pool_rows_float_avx512, pool_rows_double_avx512};
        return k;
    }
#endif
    (void)name;
    return none;
}
#endif
