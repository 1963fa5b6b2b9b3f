/* AVX-512 window rows for the max-pooling forward of kernels/pool.pyx: windows of 2 or 3 cells at stride 2,
 * dilation 1 (the 2x2/2 and 3x3/2 poolings of CNNs), 16 float or 8 double windows at a time. The stride-2
 * cells come from two loads and in-register permutes, where the compiler's own vectorization of the strided
 * loads (pool.pyx, built for the generic instruction set) takes several instructions per cell. Chosen at run
 * time: pool_rows_select("avx512") gives NULL functions on CPUs without AVX-512 (pool.pyx then keeps its own
 * loops), as pool_rows_select("none") does on any.
 *
 * A call pools `count` windows of one output row across `rows` window rows, all in registers: for window j,
 * cell b of window row r is row[r * row_stride + 2 * j + b], at offset r * row_stride + 2 * j + b; the first
 * cell wins, then a cell wins if it is greater or NaN, in row-major order: PyTorch's rule (for the values
 * alone, max(cell, current), which keeps current unless the cell is greater, then NaN cells taken: a max and
 * a blend in each cell's chain of dependent steps instead of a compare, a mask or and a blend). best[j] gets the
 * window's maximum and, unless indices is NULL, indices[j] = origin + the winner's offset (int64). Only
 * row[r * row_stride .. r * row_stride + 2 * count + cells - 3] is read of each window row, without its first
 * element when `skip` (window 0's first cell lies in the left padding: it takes part in nothing); each load also
 * prefetches the same columns two rows down, which the next output row reads at stride 2 (with the many
 * instructions of the indices, the out-of-order window alone keeps too few loads in flight). */
#ifndef FASTCONV_POOL_ROWS_H
#define FASTCONV_POOL_ROWS_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef void (*pool_rows_float_fn)(const float *row, int count, int cells, int rows, ptrdiff_t row_stride,
                                   int skip, float *best, int64_t *indices, int64_t origin);
typedef void (*pool_rows_double_fn)(const double *row, int count, int cells, int rows, ptrdiff_t row_stride,
                                    int skip, double *best, int64_t *indices, int64_t origin);

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
static inline void pool_rows_float_body(const float *row, int count, int cells, int rows, ptrdiff_t row_stride,
                                        int skip, float *best, int64_t *indices, int64_t origin)
{
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i next = _mm512_add_epi32(even, _mm512_set1_epi32(2));  /* lane 15 wraps to element 0 */
    for (int j = 0; j < count; j += 16) {
        int readable = 2 * (count - j) + cells - 2;  /* elements of a window row that belong to these windows */
        __mmask16 active = pool_lanes(count - j);
        __mmask16 padded = skip && j == 0 ? (__mmask16)1 : (__mmask16)0;  /* window 0 starts in the padding */
        __m512 current = _mm512_setzero_ps();
        __m512i current_at = _mm512_setzero_si512();
        for (int r = 0; r < rows; r++) {
            const float *cell = row + r * row_stride + 2 * j;
            _mm_prefetch((const char *)(cell + 2 * row_stride), _MM_HINT_T0);
            __m512 low = _mm512_maskz_loadu_ps(pool_lanes(readable) & ~padded, cell);
            __m512 high = _mm512_maskz_loadu_ps(pool_lanes(readable - 16), cell + 16);
            __m512 v[3];
            v[1] = _mm512_permutex2var_ps(low, odd, high);
            /* a padded cell 0 repeats cell 1 (scanning a cell twice changes nothing) */
            v[0] = _mm512_mask_mov_ps(_mm512_permutex2var_ps(low, even, high), padded, v[1]);
            if (cells == 3) {
                v[2] = _mm512_permutex2var_ps(low, next, high);
                if (readable > 32)  /* window j + 15's last cell, element 32 */
                    v[2] = _mm512_mask_broadcastss_ps(v[2], (__mmask16)0x8000, _mm_load_ss(cell + 32));
            }
            /* a window row without NaN: "greater" alone decides (a NaN already taken is greater than nothing) */
            const int clean = indices != NULL && !(_mm512_cmp_ps_mask(low, low, _CMP_UNORD_Q)
                                                   | _mm512_cmp_ps_mask(high, high, _CMP_UNORD_Q))
                              && !(cells == 3 && readable > 32 && cell[32] != cell[32]);
            __m512i at = _mm512_add_epi32(_mm512_set1_epi32((int)(r * row_stride + 2 * j)), _mm512_slli_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 1));
            for (int b = 0; b < cells; b++) {
                if (indices == NULL) {  /* max(a, b) is b unless a > b (b NaN included) */
                    current = r == 0 && b == 0 ? v[b] : _mm512_mask_mov_ps(
                        _mm512_max_ps(v[b], current), _mm512_cmp_ps_mask(v[b], v[b], _CMP_UNORD_Q), v[b]);
                    continue;
                }
                __mmask16 take = r == 0 && b == 0 ? (__mmask16)0xFFFF
                    : clean ? _mm512_cmp_ps_mask(v[b], current, _CMP_GT_OQ)
                    : _mm512_cmp_ps_mask(v[b], current, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v[b], v[b], _CMP_UNORD_Q);
                current = _mm512_mask_mov_ps(current, take, v[b]);
                current_at = _mm512_mask_mov_epi32(current_at, take, _mm512_add_epi32(at, _mm512_mask_mov_epi32(
                    _mm512_set1_epi32(b), b == 0 ? padded : (__mmask16)0, _mm512_set1_epi32(1))));
            }
        }
        if (active == (__mmask16)0xFFFF)  /* a whole store where every lane is real: masked stores cost more */
            _mm512_storeu_ps(best + j, current);
        else
            _mm512_mask_storeu_ps(best + j, active, current);
        if (indices != NULL) {
            __m512i base = _mm512_set1_epi64(origin);
            __m256i low_at = _mm512_castsi512_si256(current_at), high_at = _mm512_extracti64x4_epi64(current_at, 1);
            __m512i low_index = _mm512_add_epi64(base, _mm512_cvtepu32_epi64(low_at));
            __m512i high_index = _mm512_add_epi64(base, _mm512_cvtepu32_epi64(high_at));
            if (active == (__mmask16)0xFFFF) {
                _mm512_storeu_si512(indices + j, low_index);
                _mm512_storeu_si512(indices + j + 8, high_index);
            } else {
                _mm512_mask_storeu_epi64(indices + j, (__mmask8)active, low_index);
                _mm512_mask_storeu_epi64(indices + j + 8, (__mmask8)(active >> 8), high_index);
            }
        }
    }
}

__attribute__((target("avx512f,avx512vl"), always_inline))
static inline void pool_rows_double_body(const double *row, int count, int cells, int rows, ptrdiff_t row_stride,
                                         int skip, double *best, int64_t *indices, int64_t origin)
{
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_add_epi64(even, _mm512_set1_epi64(1));
    const __m512i next = _mm512_add_epi64(even, _mm512_set1_epi64(2));  /* lane 7 wraps to element 0 */
    for (int j = 0; j < count; j += 8) {
        int readable = 2 * (count - j) + cells - 2;
        __mmask8 active = (__mmask8)pool_lanes(count - j);  /* the low 8 lanes of a 16-lane mask */
        __mmask8 padded = skip && j == 0 ? (__mmask8)1 : (__mmask8)0;
        __m512d current = _mm512_setzero_pd();
        __m256i current_at = _mm256_setzero_si256();
        for (int r = 0; r < rows; r++) {
            const double *cell = row + r * row_stride + 2 * j;
            _mm_prefetch((const char *)(cell + 2 * row_stride), _MM_HINT_T0);
            __m512d low = _mm512_maskz_loadu_pd((__mmask8)pool_lanes(readable) & ~padded, cell);
            __m512d high = _mm512_maskz_loadu_pd((__mmask8)pool_lanes(readable - 8), cell + 8);
            __m512d v[3];
            v[1] = _mm512_permutex2var_pd(low, odd, high);
            v[0] = _mm512_mask_mov_pd(_mm512_permutex2var_pd(low, even, high), padded, v[1]);
            if (cells == 3) {
                v[2] = _mm512_permutex2var_pd(low, next, high);
                if (readable > 16)  /* window j + 7's last cell, element 16 */
                    v[2] = _mm512_mask_broadcastsd_pd(v[2], (__mmask8)0x80, _mm_load_sd(cell + 16));
            }
            const int clean = indices != NULL && !(_mm512_cmp_pd_mask(low, low, _CMP_UNORD_Q)
                                                   | _mm512_cmp_pd_mask(high, high, _CMP_UNORD_Q))
                              && !(cells == 3 && readable > 16 && cell[16] != cell[16]);
            __m256i at = _mm256_add_epi32(_mm256_set1_epi32((int)(r * row_stride + 2 * j)),
                                          _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
            for (int b = 0; b < cells; b++) {
                if (indices == NULL) {
                    current = r == 0 && b == 0 ? v[b] : _mm512_mask_mov_pd(
                        _mm512_max_pd(v[b], current), _mm512_cmp_pd_mask(v[b], v[b], _CMP_UNORD_Q), v[b]);
                    continue;
                }
                __mmask8 take = r == 0 && b == 0 ? (__mmask8)0xFF
                    : clean ? _mm512_cmp_pd_mask(v[b], current, _CMP_GT_OQ)
                    : _mm512_cmp_pd_mask(v[b], current, _CMP_GT_OQ) | _mm512_cmp_pd_mask(v[b], v[b], _CMP_UNORD_Q);
                current = _mm512_mask_mov_pd(current, take, v[b]);
                current_at = _mm256_mask_mov_epi32(current_at, take, _mm256_add_epi32(at, _mm256_mask_mov_epi32(
                    _mm256_set1_epi32(b), b == 0 ? padded : (__mmask8)0, _mm256_set1_epi32(1))));
            }
        }
        __m512i index = _mm512_add_epi64(_mm512_set1_epi64(origin), _mm512_cvtepu32_epi64(current_at));
        if (active == (__mmask8)0xFF) {
            _mm512_storeu_pd(best + j, current);
            if (indices != NULL)
                _mm512_storeu_si512(indices + j, index);
        } else {
            _mm512_mask_storeu_pd(best + j, active, current);
            if (indices != NULL)
                _mm512_mask_storeu_epi64(indices + j, active, index);
        }
    }
}
/* The bodies above with constant cells and values-or-indices: no branch left in their loops. */
#define POOL_ROWS_DISPATCH(T)                                                                                  \
    __attribute__((target("avx512f,avx512vl")))                                                               \
    static void pool_rows_##T##_avx512(const T *row, int count, int cells, int rows, ptrdiff_t row_stride,     \
                                       int skip, T *best, int64_t *indices, int64_t origin)                    \
    {                                                                                                          \
        if (indices == NULL) {                                                                                 \
            if (cells == 3) pool_rows_##T##_body(row, count, 3, rows, row_stride, skip, best, NULL, 0);        \
            else pool_rows_##T##_body(row, count, 2, rows, row_stride, skip, best, NULL, 0);                   \
        } else if (cells == 3) {                                                                               \
            pool_rows_##T##_body(row, count, 3, rows, row_stride, skip, best, indices, origin);                \
        } else {                                                                                               \
            pool_rows_##T##_body(row, count, 2, rows, row_stride, skip, best, indices, origin);                \
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
