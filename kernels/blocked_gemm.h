/* A single-threaded GEMM on the micro-kernels of micro_gemm.h, so that the im2col + GEMM algorithm runs at the
 * same speed whatever OpenBLAS's build or kernel choice (OPENBLAS_CORETYPE). BLIS's blocking: for each block
 * of GEMM_NC columns and GEMM_KC terms, B's block is packed into panels of one full micro-kernel width (a
 * core's L2 cache holds it), then each panel of MR rows of A (in L1) meets every panel of B. Panels are
 * zero-padded at the edges, whose blocks go through a small tile: nothing is read or written outside the
 * matrices.
 *
 *     C[i, j] = (accumulate ? C[i, j] : 0) + sum over p < depth of A[i, p] * B[p, j],  i < m, j < n
 *     A[i, p] = a[i * a_row + p * a_col],  B[p, j] = b[p * b_row + j * b_col],  C[i, j] = c[i * c_row + j]
 *
 * with B's and C's columns in runs of `segment` where the matrices are several images side by side (see
 * blocked_gemm_float in blocked_gemm_body.h).
 *
 * Each result adds its terms in p order within a block of GEMM_KC, the blocks in order: the bits of a result
 * depend on the shapes only. `work` holds GEMM_WORK elements. */
#ifndef FASTCONV_BLOCKED_GEMM_H
#define FASTCONV_BLOCKED_GEMM_H
#include "clones.h"
#include "micro_gemm.h"

#define GEMM_KC 256
#define GEMM_NC 480  /* a multiple of every full micro-kernel width (48, 24, 12) */
#define GEMM_MAX_MR 8
#define GEMM_IN_PLACE_ROWS 128  /* the most rows of A for which B's panels are read in place (see _blocks) */
#define GEMM_MAX_TILE (GEMM_MAX_MR * 48)
#define GEMM_WORK (GEMM_KC * GEMM_NC + GEMM_MAX_MR * GEMM_KC + GEMM_MAX_TILE)

#define BG_NAME blocked_gemm_float
#define BG_T float
#define BG_KERNELS float_kernels
#define BG_LANES lanes_float
#include "blocked_gemm_body.h"

#define BG_NAME blocked_gemm_double
#define BG_T double
#define BG_KERNELS double_kernels
#define BG_LANES lanes_double
#include "blocked_gemm_body.h"

#endif
