/* Register-tiled GEMM micro-kernels in AVX-512 and AVX2 + FMA, chosen at run time from what the CPU offers
 * (the build stays generic: no -march needed), for the algorithms of kernels/ that multiply small matrices
 * themselves (Winograd's per-point products) instead of calling BLAS, whose kernel choice varies with
 * OpenBLAS's build and environment.
 *
 * A micro-kernel computes one MR x NR block
 *     c[i * c_row + j]  =  (accumulate ? c[i * c_row + j] : 0)
 *                          + sum over run < runs, then kk < depth, of
 *                            a[i * a_row + run * a_run + kk * a_step] * b[run * b_run + kk * b_step + j]
 * for i < MR and j < NR (NR = NV vectors): every accumulator stays in a register across the whole sum and the
 * terms are added in (run, kk) order, so a result depends on its inputs only. Runs let one sum cover depths
 * that are not evenly spaced (a band's output rows, each row's pixels evenly spaced). `a` is read by broadcasts: it may be
 * packed (a_row = 1, a_step = MR) or any strided matrix (a_row = its row length, a_step = 1); each row of b is
 * NR contiguous elements. The AVX-512 blocks are 8 rows x 3 vectors (24 of the 32 registers accumulate), the
 * AVX2 ones 4 x 3 (12 of 16); blocks of 1 and 2 vectors finish a row whose length is not a multiple of 3, and
 * blocks of MR / 2 rows (the `short` kernels) a matrix whose last block would be half empty or more. */
#ifndef FASTCONV_MICRO_GEMM_H
#define FASTCONV_MICRO_GEMM_H
#include <stddef.h>
#include <string.h>

#define MICRO_PASTE_(a, b) a##b
#define MICRO_PASTE(a, b) MICRO_PASTE_(a, b)
#define MICRO_NV 3  /* vectors per row of a full block */

typedef void (*micro_float_fn)(int runs, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_step,
                               ptrdiff_t a_run, const float *b, ptrdiff_t b_step, ptrdiff_t b_run, float *c,
                               ptrdiff_t c_row, int accumulate);
typedef void (*micro_double_fn)(int runs, int depth, const double *a, ptrdiff_t a_row, ptrdiff_t a_step,
                                ptrdiff_t a_run, const double *b, ptrdiff_t b_step, ptrdiff_t b_run, double *c,
                                ptrdiff_t c_row, int accumulate);

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define MICRO_X86 1

#define MT_NAME micro_float_avx512_1
#define MT_T float
#define MT_LANES 16
#define MT_MR 8
#define MT_NV 1
#define MT_TARGET "avx512f,fma"
#include "micro_tile.h"

#define MT_NAME micro_float_avx512_2
#define MT_T float
#define MT_LANES 16
#define MT_MR 8
#define MT_NV 2
#define MT_TARGET "avx512f,fma"
#include "micro_tile.h"

#define MT_NAME micro_float_avx512_3
#define MT_T float
#define MT_LANES 16
#define MT_MR 8
#define MT_NV 3
#define MT_TARGET "avx512f,fma"
#include "micro_tile.h"

#define MT_NAME micro_double_avx512_1
#define MT_T double
#define MT_LANES 8
#define MT_MR 8
#define MT_NV 1
#define MT_TARGET "avx512f,fma"
#include "micro_tile.h"

#define MT_NAME micro_double_avx512_2
#define MT_T double
#define MT_LANES 8
#define MT_MR 8
#define MT_NV 2
#define MT_TARGET "avx512f,fma"
#include "micro_tile.h"

#define MT_NAME micro_double_avx512_3
#define MT_T double
#define MT_LANES 8
#define MT_MR 8
#define MT_NV 3
#define MT_TARGET "avx512f,fma"
#include "micro_tile.h"

#define MT_NAME micro_float_avx2_1
#define MT_T float
#define MT_LANES 8
#define MT_MR 4
#define MT_NV 1
#define MT_TARGET "avx2,fma"
#include "micro_tile.h"

#define MT_NAME micro_float_avx2_2
#define MT_T float
#define MT_LANES 8
#define MT_MR 4
#define MT_NV 2
#define MT_TARGET "avx2,fma"
#include "micro_tile.h"

#define MT_NAME micro_float_avx2_3
#define MT_T float
#define MT_LANES 8
#define MT_MR 4
#define MT_NV 3
#define MT_TARGET "avx2,fma"
#include "micro_tile.h"

#define MT_NAME micro_double_avx2_1
#define MT_T double
#define MT_LANES 4
#define MT_MR 4
#define MT_NV 1
#define MT_TARGET "avx2,fma"
#include "micro_tile.h"

#define MT_NAME micro_double_avx2_2
#define MT_T double
#define MT_LANES 4
#define MT_MR 4
#define MT_NV 2
#define MT_TARGET "avx2,fma"
#include "micro_tile.h"

#define MT_NAME micro_double_avx2_3
#define MT_T double
#define MT_LANES 4
#define MT_MR 4
#define MT_NV 3
#define MT_TARGET "avx2,fma"
#include "micro_tile.h"

#endif

/* One instruction set's micro-kernels and their shapes. */
typedef struct {
    const char *name;               /* "avx512", "avx2" or "none" (nothing here serves) */
    micro_float_fn float_kernels[MICRO_NV + 1];    /* by vectors per row: [MICRO_NV] the full block */
    micro_double_fn double_kernels[MICRO_NV + 1];
    int mr;                         /* rows of a block */
    int lanes_float, lanes_double;  /* elements of a vector: a full block is MICRO_NV of them wide */
    micro_float_fn short_float_kernels[MICRO_NV + 1];  /* blocks of mr / 2 rows, for a run's last few */
    micro_double_fn short_double_kernels[MICRO_NV + 1];
} micro_kernels;

/* The micro-kernels of the named instruction set, with .name "none" when the CPU cannot run them. */
static micro_kernels micro_find(const char *name)
{
    micro_kernels none = {"none", {NULL}, {NULL}, 0, 0, 0, {NULL}, {NULL}};
#ifdef MICRO_X86
    __builtin_cpu_init();
    if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) {
        micro_kernels k = {"avx512", {NULL, micro_float_avx512_1, micro_float_avx512_2, micro_float_avx512_3},
                           {NULL, micro_double_avx512_1, micro_double_avx512_2, micro_double_avx512_3}, 8, 16, 8,
                           {NULL, micro_float_avx512_1_short, micro_float_avx512_2_short, micro_float_avx512_3_short},
                           {NULL, micro_double_avx512_1_short, micro_double_avx512_2_short,
                            micro_double_avx512_3_short}};
        return k;
    }
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        micro_kernels k = {"avx2", {NULL, micro_float_avx2_1, micro_float_avx2_2, micro_float_avx2_3},
                           {NULL, micro_double_avx2_1, micro_double_avx2_2, micro_double_avx2_3}, 4, 8, 4,
                           {NULL, micro_float_avx2_1_short, micro_float_avx2_2_short, micro_float_avx2_3_short},
                           {NULL, micro_double_avx2_1_short, micro_double_avx2_2_short, micro_double_avx2_3_short}};
        return k;
    }
#endif
    (void)name;
    return none;
}
#endif
