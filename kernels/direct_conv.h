/* Register tiles for the direct convolution of kernels/conv_direct.pyx, in AVX-512 and AVX2 + FMA, chosen at
 * run time from what the CPU offers (the build itself stays generic: no -march needed). Where neither exists
 * (another architecture or compiler, an old CPU), the tiles are "none" and the direct algorithm serves nothing.
 *
 * A forward tile is the tile's output channels by its width of consecutive output positions of a padded band
 * (see conv_direct.pyx); its accumulators fill most of the vector registers: 8 x 3 vectors of the 32 AVX-512
 * registers, 4 x 3 of the 16 AVX2 ones. Channel counts are mostly multiples of 8, so few tiles go to waste. A
 * weight-gradient tile is the tile's output channels by WEIGHT_TAPS kernel taps, each accumulator a vector of
 * partial sums over output columns; groups of a vector of input channels or more take the micro-kernels of
 * micro_gemm.h of the same instruction set instead. */
#include <stddef.h>
#include <string.h>

#include "micro_gemm.h"

#define WEIGHT_TAPS 3
#define TILE_PASTE_(a, b) a##b
#define TILE_PASTE(a, b) TILE_PASTE_(a, b)

typedef void (*direct_tile_float_fn)(const float *, ptrdiff_t, int, const ptrdiff_t *, int, const float *, float *);
typedef void (*direct_tile_double_fn)(const double *, ptrdiff_t, int, const ptrdiff_t *, int, const double *,
                                      double *);
typedef void (*direct_weight_float_fn)(const float *, ptrdiff_t, ptrdiff_t, const float *, ptrdiff_t,
                                       const ptrdiff_t *, int, int, int, float *);
typedef void (*direct_weight_double_fn)(const double *, ptrdiff_t, ptrdiff_t, const double *, ptrdiff_t,
                                        const ptrdiff_t *, int, int, int, double *);

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DIRECT_X86 1

__attribute__((target("avx2,fma"))) static inline __m256 load_first_float_avx2(const float *p, int n)
{
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

__attribute__((target("avx2,fma"))) static inline __m256d load_first_double_avx2(const double *p, int n)
{
    return _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)));
}

/* dst[j] = src[2 * j] for j < n: a stride-2 phase of an input row. Only src[0 .. 2n - 2] is read (what lies
 * past it may lie past the row, and past the array): the last vectors are masked loads and stores. */
__attribute__((target("avx512f"))) static inline __mmask16 first_lanes16(int n)
{
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

__attribute__((target("avx512f"))) static void evens_float_avx512(float *dst, const float *src, int n)
{
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int j = 0; j < n; j += 16) {
        int reads = 2 * (n - j) - 1;  /* elements of src from src + 2j on that may be read */
        __m512 low = _mm512_maskz_loadu_ps(first_lanes16(reads), src + 2 * j);
        __m512 high = _mm512_maskz_loadu_ps(first_lanes16(reads - 16), src + 2 * j + 16);
        _mm512_mask_storeu_ps(dst + j, first_lanes16(n - j), _mm512_permutex2var_ps(low, even, high));
    }
}

__attribute__((target("avx512f"))) static void evens_double_avx512(double *dst, const double *src, int n)
{
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    for (int j = 0; j < n; j += 8) {
        int reads = 2 * (n - j) - 1;
        __m512d low = _mm512_maskz_loadu_pd((__mmask8)first_lanes16(reads < 8 ? reads : 8), src + 2 * j);
        __m512d high = _mm512_maskz_loadu_pd((__mmask8)first_lanes16(reads - 8 < 8 ? reads - 8 : 8), src + 2 * j + 8);
        _mm512_mask_storeu_pd(dst + j, (__mmask8)first_lanes16(n - j < 8 ? n - j : 8),
                              _mm512_permutex2var_pd(low, even, high));
    }
}

__attribute__((target("avx2,fma"))) static void evens_float_avx2(float *dst, const float *src, int n)
{
    int j = 0;
    for (; j + 8 < n; j += 8) {  /* per 128-bit lane e0 e1 | e2 e3, then the 64-bit pairs in order */
        __m256 pairs = _mm256_shuffle_ps(_mm256_loadu_ps(src + 2 * j), _mm256_loadu_ps(src + 2 * j + 8),
                                         _MM_SHUFFLE(2, 0, 2, 0));
        _mm256_storeu_ps(dst + j, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8)));
    }
    for (; j < n; j++) dst[j] = src[2 * j];
}

__attribute__((target("avx2,fma"))) static void evens_double_avx2(double *dst, const double *src, int n)
{
    int j = 0;
    for (; j + 4 < n; j += 4)
        _mm256_storeu_pd(dst + j, _mm256_permute4x64_pd(_mm256_unpacklo_pd(_mm256_loadu_pd(src + 2 * j),
                                                                           _mm256_loadu_pd(src + 2 * j + 4)), 0xD8));
    for (; j < n; j++) dst[j] = src[2 * j];
}

#define TILE_NAME tile_float_avx512
#define TILE_WEIGHT_NAME weight_float_avx512
#define TILE_LOAD_FIRST(p, n) _mm512_maskz_loadu_ps((__mmask16)((1u << (n)) - 1), (p))
#define TILE_T float
#define TILE_VEC __m512
#define TILE_LANES 16
#define TILE_CHANNELS 8
#define TILE_VECTORS 3
#define TILE_TARGET "avx512f"
#define TILE_LOAD _mm512_loadu_ps
#define TILE_STORE _mm512_storeu_ps
#define TILE_BROADCAST _mm512_set1_ps
#define TILE_FMA _mm512_fmadd_ps
#define TILE_ZERO _mm512_setzero_ps
#include "direct_tile.h"

#define TILE_NAME tile_double_avx512
#define TILE_WEIGHT_NAME weight_double_avx512
#define TILE_LOAD_FIRST(p, n) _mm512_maskz_loadu_pd((__mmask8)((1u << (n)) - 1), (p))
#define TILE_T double
#define TILE_VEC __m512d
#define TILE_LANES 8
#define TILE_CHANNELS 8
#define TILE_VECTORS 3
#define TILE_TARGET "avx512f"
#define TILE_LOAD _mm512_loadu_pd
#define TILE_STORE _mm512_storeu_pd
#define TILE_BROADCAST _mm512_set1_pd
#define TILE_FMA _mm512_fmadd_pd
#define TILE_ZERO _mm512_setzero_pd
#include "direct_tile.h"

#define TILE_NAME tile_float_avx2
#define TILE_WEIGHT_NAME weight_float_avx2
#define TILE_LOAD_FIRST(p, n) load_first_float_avx2((p), (n))
#define TILE_T float
#define TILE_VEC __m256
#define TILE_LANES 8
#define TILE_CHANNELS 4
#define TILE_VECTORS 3
#define TILE_TARGET "avx2,fma"
#define TILE_LOAD _mm256_loadu_ps
#define TILE_STORE _mm256_storeu_ps
#define TILE_BROADCAST _mm256_set1_ps
#define TILE_FMA _mm256_fmadd_ps
#define TILE_ZERO _mm256_setzero_ps
#include "direct_tile.h"

#define TILE_NAME tile_double_avx2
#define TILE_WEIGHT_NAME weight_double_avx2
#define TILE_LOAD_FIRST(p, n) load_first_double_avx2((p), (n))
#define TILE_T double
#define TILE_VEC __m256d
#define TILE_LANES 4
#define TILE_CHANNELS 4
#define TILE_VECTORS 3
#define TILE_TARGET "avx2,fma"
#define TILE_LOAD _mm256_loadu_pd
#define TILE_STORE _mm256_storeu_pd
#define TILE_BROADCAST _mm256_set1_pd
#define TILE_FMA _mm256_fmadd_pd
#define TILE_ZERO _mm256_setzero_pd
#include "direct_tile.h"
#endif


/* dst[j * dst_row + i] = src[i * src_row + j] (+ add[j] unless add is NULL) for i < rows and j < cols: a
 * transposed copy (a micro-kernel block of pixels x output channels to the output's channel planes, the input's
 * channel planes to a channels-last band). SSE2 (every x86-64 CPU has it) moves 4 x 4 floats (the last 1-3
 * rows of floats as 4 x 4 with zero rows) or 2 x 2 doubles at a time; the other edges go one by one. */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static void transpose_float(const float *src, ptrdiff_t src_row, int rows, int cols, const float *add, float *dst,
                            ptrdiff_t dst_row)
{
    int i = 0;
#if defined(__SSE2__)
    for (; i + 4 <= rows; i += 4) {
        int j = 0;
        for (; j + 4 <= cols; j += 4) {
            const float *in = src + i * src_row + j;
            __m128 r0 = _mm_loadu_ps(in), r1 = _mm_loadu_ps(in + src_row);
            __m128 r2 = _mm_loadu_ps(in + 2 * src_row), r3 = _mm_loadu_ps(in + 3 * src_row);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            if (add) {
                r0 = _mm_add_ps(r0, _mm_set1_ps(add[j])), r1 = _mm_add_ps(r1, _mm_set1_ps(add[j + 1]));
                r2 = _mm_add_ps(r2, _mm_set1_ps(add[j + 2])), r3 = _mm_add_ps(r3, _mm_set1_ps(add[j + 3]));
            }
            float *out = dst + j * dst_row + i;
            _mm_storeu_ps(out, r0), _mm_storeu_ps(out + dst_row, r1);
            _mm_storeu_ps(out + 2 * dst_row, r2), _mm_storeu_ps(out + 3 * dst_row, r3);
        }
        for (; j < cols; j++)
            for (int k = i; k < i + 4; k++) {
                float v = src[k * src_row + j];
                dst[j * dst_row + k] = add ? v + add[j] : v;
            }
    }
    if (i < rows) {  /* the last 1-3 rows (a few input channels): 4 columns at a time, the missing rows zero */
        int left = rows - i, j = 0;
        for (; j + 4 <= cols; j += 4) {
            const float *in = src + i * src_row + j;
            __m128 r[4] = {_mm_loadu_ps(in), left > 1 ? _mm_loadu_ps(in + src_row) : _mm_setzero_ps(),
                           left > 2 ? _mm_loadu_ps(in + 2 * src_row) : _mm_setzero_ps(), _mm_setzero_ps()};
            _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
            for (int k = 0; k < 4; k++) {  /* output row j + k: its first `left` elements */
                __m128 v = add ? _mm_add_ps(r[k], _mm_set1_ps(add[j + k])) : r[k];
                float *out = dst + (j + k) * dst_row + i;
                if (left == 1) {
                    _mm_store_ss(out, v);
                } else {
                    _mm_storel_pi((__m64 *)out, v);
                    if (left == 3)
                        _mm_store_ss(out + 2, _mm_movehl_ps(v, v));
                }
            }
        }
        for (; j < cols; j++)
            for (int k = i; k < rows; k++) {
                float v = src[k * src_row + j];
                dst[j * dst_row + k] = add ? v + add[j] : v;
            }
        i = rows;
    }
#endif
    for (; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            float v = src[i * src_row + j];
            dst[j * dst_row + i] = add ? v + add[j] : v;
        }
}

static void transpose_double(const double *src, ptrdiff_t src_row, int rows, int cols, const double *add,
                             double *dst, ptrdiff_t dst_row)
{
    int i = 0;
#if defined(__SSE2__)
    for (; i + 2 <= rows; i += 2) {
        int j = 0;
        for (; j + 2 <= cols; j += 2) {
            const double *in = src + i * src_row + j;
            __m128d r0 = _mm_loadu_pd(in), r1 = _mm_loadu_pd(in + src_row);
            __m128d c0 = _mm_unpacklo_pd(r0, r1), c1 = _mm_unpackhi_pd(r0, r1);
            if (add) c0 = _mm_add_pd(c0, _mm_set1_pd(add[j])), c1 = _mm_add_pd(c1, _mm_set1_pd(add[j + 1]));
            _mm_storeu_pd(dst + j * dst_row + i, c0), _mm_storeu_pd(dst + (j + 1) * dst_row + i, c1);
        }
        for (; j < cols; j++)
            for (int k = i; k < i + 2; k++) {
                double v = src[k * src_row + j];
                dst[j * dst_row + k] = add ? v + add[j] : v;
            }
    }
#endif
    for (; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            double v = src[i * src_row + j];
            dst[j * dst_row + i] = add ? v + add[j] : v;
        }
}

#ifdef DIRECT_X86
/* transpose_float of a micro-kernel block of 8 pixels x 16 output channels, in registers: 8 rows of 16 to 16
 * of 8 by unpacks and shuffles within 128-bit lanes, then across lanes (the SSE2 4 x 4 blocks take twice the
 * instructions). */
__attribute__((target("avx512f"))) static inline void transpose_8x16_float_avx512(const float *src, ptrdiff_t src_row,
                                                                                 const float *add, float *dst,
                                                                                 ptrdiff_t dst_row)
{
    __m512 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_loadu_ps(src + i * src_row);
        if (add)
            r[i] = _mm512_add_ps(r[i], _mm512_loadu_ps(add));
    }
    for (int i = 0; i < 8; i += 2) {  /* lane L of t[i]: pixels i, i + 1 of channels 4L, 4L + 1; t[i + 1]: 4L + 2, 3 */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4)  /* lane L of u[h + k]: pixels h .. h + 3 of channel 4L + k */
        for (int k = 0; k < 4; k += 2) {
            u[h + k] = _mm512_shuffle_ps(t[h + k / 2], t[h + 2 + k / 2], _MM_SHUFFLE(1, 0, 1, 0));
            u[h + k + 1] = _mm512_shuffle_ps(t[h + k / 2], t[h + 2 + k / 2], _MM_SHUFFLE(3, 2, 3, 2));
        }
    for (int k = 0; k < 4; k++)
        for (int half = 0; half < 2; half++) {  /* channels 8 * half + k (low 256 bits) and 8 * half + 4 + k */
            __m512 pair = half ? _mm512_shuffle_f32x4(u[k], u[k + 4], _MM_SHUFFLE(3, 2, 3, 2))
                               : _mm512_shuffle_f32x4(u[k], u[k + 4], _MM_SHUFFLE(1, 0, 1, 0));
            pair = _mm512_shuffle_f32x4(pair, pair, _MM_SHUFFLE(3, 1, 2, 0));
            _mm256_storeu_ps(dst + (8 * half + k) * dst_row, _mm512_castps512_ps256(pair));
            _mm256_storeu_ps(dst + (8 * half + 4 + k) * dst_row,
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pair), 1)));
        }
}

/* transpose_float on AVX-512: blocks of 8 rows by 16 columns in registers, the rest as transpose_float. */
__attribute__((target("avx512f"))) static void transpose_float_avx512(const float *src, ptrdiff_t src_row, int rows,
                                                                      int cols, const float *add, float *dst,
                                                                      ptrdiff_t dst_row)
{
    int i = 0;
    for (; i + 8 <= rows; i += 8) {
        const float *in = src + i * src_row;
        int j = 0;
        for (; j + 16 <= cols; j += 16)
            transpose_8x16_float_avx512(in + j, src_row, add ? add + j : NULL, dst + j * dst_row + i, dst_row);
        if (j < cols)
            transpose_float(in + j, src_row, 8, cols - j, add ? add + j : NULL, dst + j * dst_row + i, dst_row);
    }
    if (i < rows)
        transpose_float(src + i * src_row, src_row, rows - i, cols, add, dst + i, dst_row);
}
#endif

/* The register tiles in use: a direct plan copies this table once (direct_current), so a switch of tiles
 * (direct_select) never reaches a call already running with buffers sized for the others. */
typedef struct {
    const char *name;
    direct_tile_float_fn tile_float;
    direct_tile_double_fn tile_double;
    direct_weight_float_fn weight_float;
    direct_weight_double_fn weight_double;
    int channels;                   /* output channels per tile */
    int width_float, width_double;  /* output positions per tile */
    micro_kernels micro;            /* the weight gradient of wide layers: channels x input channels blocks */
    void (*evens_float)(float *, const float *, int);  /* a stride-2 phase of an input row */
    void (*evens_double)(double *, const double *, int);
    /* transpose_float in this instruction set's vectors */
    void (*transpose_float)(const float *, ptrdiff_t, int, int, const float *, float *, ptrdiff_t);
} direct_tiles;

static direct_tiles direct_isa = {"none", NULL, NULL, NULL, NULL, 0, 0, 0, {"none", {NULL}, {NULL}, 0, 0, 0},
                                  NULL, NULL, transpose_float};

/* 1 if the CPU runs the named tiles ("avx512", "avx2" or "none"); they are then the ones used. */
static int direct_select(const char *name)
{
    if (strcmp(name, "none") == 0) {
        direct_isa.name = "none";
        direct_isa.tile_float = NULL, direct_isa.tile_double = NULL;
        direct_isa.weight_float = NULL, direct_isa.weight_double = NULL;
        direct_isa.channels = direct_isa.width_float = direct_isa.width_double = 0;
        direct_isa.micro = micro_find("none");
        direct_isa.evens_float = NULL, direct_isa.evens_double = NULL;
        direct_isa.transpose_float = transpose_float;
        return 1;
    }
#ifdef DIRECT_X86
    __builtin_cpu_init();
    if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) {
        direct_isa.name = "avx512";
        direct_isa.tile_float = tile_float_avx512, direct_isa.tile_double = tile_double_avx512;
        direct_isa.weight_float = weight_float_avx512, direct_isa.weight_double = weight_double_avx512;
        direct_isa.channels = tile_float_avx512_channels;
        direct_isa.width_float = tile_float_avx512_width, direct_isa.width_double = tile_double_avx512_width;
        direct_isa.micro = micro_find("avx512");
        direct_isa.evens_float = evens_float_avx512, direct_isa.evens_double = evens_double_avx512;
        direct_isa.transpose_float = transpose_float_avx512;
        return 1;
    }
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        direct_isa.name = "avx2";
        direct_isa.tile_float = tile_float_avx2, direct_isa.tile_double = tile_double_avx2;
        direct_isa.weight_float = weight_float_avx2, direct_isa.weight_double = weight_double_avx2;
        direct_isa.channels = tile_float_avx2_channels;
        direct_isa.width_float = tile_float_avx2_width, direct_isa.width_double = tile_double_avx2_width;
        direct_isa.micro = micro_find("avx2");
        direct_isa.evens_float = evens_float_avx2, direct_isa.evens_double = evens_double_avx2;
        direct_isa.transpose_float = transpose_float;
        return 1;
    }
#endif
    return 0;
}

static direct_tiles direct_current(void) { return direct_isa; }
