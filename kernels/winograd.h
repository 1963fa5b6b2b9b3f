/* Winograd's minimal filtering for 3x3, stride-1 convolutions (Lavin & Gray, "Fast Algorithms for
 * Convolutional Neural Networks", 2016): F(m x m, 3 x 3) computes an m x m tile of outputs from an
 * (m + 2) x (m + 2) tile of inputs with (m + 2)^2 multiplications per channel pair instead of 9 m^2, as
 *     Y = A^T [ (G g G^T) .* (B^T d B) ] A,
 * so a convolution becomes a transform of the input tiles (V = B^T d B), one matrix product per point of the
 * transformed tile (M = U V over the channels, U = G g G^T the transformed weights) and an inverse transform
 * (Y = A^T M A). F(4x4, 3x3) (alpha = 6: 4x fewer multiplications) interpolates at 0, +-5/8, +-3/2 and
 * infinity, which measured 2.2x more accurate in float32 than Lavin's 0, +-1, +-2 at the same cost;
 * F(2x2, 3x3) (alpha = 4: 2.25x fewer) at 0, +-1 and infinity. The 1/f normalisation sits in G, which is
 * applied once per weight, in double precision; the entries of A and B are dyadic, exact in float32.
 *
 * The weight gradient is the transpose of the same bilinear map: dU = sum over tiles of (A dY A^T) .* V per
 * point, then dg = G^T dU G (F(3x3, m x m), in the transformed domain).
 *
 * This file holds the matrices and the tile geometry; winograd_tile.h the per-block work, compiled once per
 * (type, instruction set) on the micro-kernels of micro_gemm.h and chosen at run time. */
#ifndef FASTCONV_WINOGRAD_H
#define FASTCONV_WINOGRAD_H
#include <stddef.h>
#include <string.h>
#include "micro_gemm.h"

#define WINO_MAX_ALPHA 6

static const double WINO4_AT[4][6] = {
    {1, 1, 1, 1, 1, 0},
    {0, 5. / 8, -5. / 8, 3. / 2, -3. / 2, 0},
    {0, 25. / 64, 25. / 64, 9. / 4, 9. / 4, 0},
    {0, 125. / 512, -125. / 512, 27. / 8, -27. / 8, 1},
};
static const double WINO4_G[6][3] = {
    {256. / 225, 0, 0},
    {-2048. / 2975, -256. / 595, -32. / 119},
    {-2048. / 2975, 256. / 595, -32. / 119},
    {128. / 1071, 64. / 357, 32. / 119},
    {128. / 1071, -64. / 357, 32. / 119},
    {0, 0, 1},
};
static const double WINO4_BT[6][6] = {
    {225. / 256, 0, -169. / 64, 0, 1, 0},
    {0, -45. / 32, -9. / 4, 5. / 8, 1, 0},
    {0, 45. / 32, -9. / 4, -5. / 8, 1, 0},
    {0, -75. / 128, -25. / 64, 3. / 2, 1, 0},
    {0, 75. / 128, -25. / 64, -3. / 2, 1, 0},
    {0, 225. / 256, 0, -169. / 64, 0, 1},
};
static const double WINO2_AT[2][4] = {
    {1, 1, 1, 0},
    {0, 1, -1, 1},
};
static const double WINO2_G[4][3] = {
    {-1, 0, 0},
    {0.5, 0.5, 0.5},
    {0.5, -0.5, 0.5},
    {0, 0, 1},
};
static const double WINO2_BT[4][4] = {
    {-1, 0, 1, 0},
    {0, 1, 1, 0},
    {0, -1, 1, 0},
    {0, -1, 0, 1},
};

/* Entry (i, j) of F(m x m, 3 x 3)'s matrices for a constant m, read straight from the tables so that the compiler
 * folds every coefficient into the code and drops the zeros (the masks keep the branch not taken in bounds). */
#define WINO_BT(m, i, j) ((m) == 4 ? WINO4_BT[i][j] : WINO2_BT[(i) & 3][(j) & 3])
#define WINO_AT(m, i, j) ((m) == 4 ? WINO4_AT[i][j] : WINO2_AT[(i) & 1][(j) & 3])
#define WINO_G(m, i, j) ((m) == 4 ? WINO4_G[i][j] : WINO2_G[(i) & 3][j])

/* One group's convolution as Winograd tiles: the tiles of every image, numbered image by image, row by row. */
typedef struct {
    int m, alpha;                    /* output tile side (4 or 2), input tile side m + 2 */
    int batch;
    int channels, height, width;     /* one group's input channels; the input plane */
    int out_channels, out_h, out_w;  /* one group's output channels; the output plane */
    int pad_top, pad_left;           /* negative where the input is cropped */
    int tiles_w, tiles_plane;        /* tiles per row, per plane */
    ptrdiff_t in_image, out_image;   /* elements from one image to the next, input and output (all groups) */
    int block;                       /* tiles per block: a multiple of the micro-kernel's full width (forward)
                                        or of its vector (weight gradient) */
    int k_pad;                       /* out_channels rounded up to the micro-kernel's rows */
    int c_pad;                       /* channels rounded up to a vector (weight gradient) */
    /* Elements from one point of the transformed domain to the next: in V (the input's transform), M (the
     * products; a weight gradient's D) and U (the weights' transform; a weight gradient's du). Padded so that
     * no stride is a multiple of 1 KiB: the points of a transform would otherwise share one set of the L1 cache. */
    ptrdiff_t v_point, m_point, u_point;
} wino_shape;

/* tiles[3 l .. 3 l + 2] = the image, first output row and first output column of tile first + l. */
static void wino_tiles(const wino_shape *s, long first, int count, int *tiles)
{
    for (int l = 0; l < count; l++) {
        long t = first + l;
        int in_plane = (int)(t % s->tiles_plane);
        tiles[3 * l] = (int)(t / s->tiles_plane);
        tiles[3 * l + 1] = in_plane / s->tiles_w * s->m;
        tiles[3 * l + 2] = in_plane % s->tiles_w * s->m;
    }
}

#ifdef _OPENMP
#include <omp.h>
#define WINO_THREAD() omp_get_thread_num()
#else
#define WINO_THREAD() 0
#endif

/* The convolutions of every group (winograd_tile.h): a forward, and a weight gradient. Each returns 1 if a
 * transformed value or a result was not finite (the caller then runs another algorithm). */
typedef int (*wino_forward_float_fn)(const wino_shape *, int groups, const float *x, ptrdiff_t x_group,
                                     const float *u, ptrdiff_t u_group, const float *bias, float *y,
                                     ptrdiff_t y_group, float *work, ptrdiff_t work_size, int *tiles, int threads);
typedef int (*wino_forward_double_fn)(const wino_shape *, int groups, const double *x, ptrdiff_t x_group,
                                      const double *u, ptrdiff_t u_group, const double *bias, double *y,
                                      ptrdiff_t y_group, double *work, ptrdiff_t work_size, int *tiles, int threads);
typedef int (*wino_weight_float_fn)(const wino_shape *, int groups, const float *x, ptrdiff_t x_group,
                                    const float *gy, ptrdiff_t gy_group, float *du, float *gw, float *work,
                                    int *tiles, int threads);
typedef void (*wino_weights_float_fn)(const wino_shape *, int groups, const float *w, ptrdiff_t k_stride,
                                      ptrdiff_t c_stride, ptrdiff_t g_stride, int flip, float *u, int threads);
typedef void (*wino_weights_double_fn)(const wino_shape *, int groups, const double *w, ptrdiff_t k_stride,
                                       ptrdiff_t c_stride, ptrdiff_t g_stride, int flip, double *u, int threads);
typedef int (*wino_weight_double_fn)(const wino_shape *, int groups, const double *x, ptrdiff_t x_group,
                                     const double *gy, ptrdiff_t gy_group, double *du, double *gw, double *work,
                                     int *tiles, int threads);

#ifdef MICRO_X86
#define WT_SUFFIX float_avx512
#define WT_T float
#define WT_INT int
#define WT_LANES 16
#define WT_MICRO micro_float_avx512
#define WT_MR 8
#define WT_TARGET "avx512f,fma"
#include "winograd_tile.h"

#define WT_SUFFIX double_avx512
#define WT_T double
#define WT_INT long long
#define WT_LANES 8
#define WT_MICRO micro_double_avx512
#define WT_MR 8
#define WT_TARGET "avx512f,fma"
#include "winograd_tile.h"

#define WT_SUFFIX float_avx2
#define WT_T float
#define WT_INT int
#define WT_LANES 8
#define WT_MICRO micro_float_avx2
#define WT_MR 4
#define WT_TARGET "avx2,fma"
#include "winograd_tile.h"

#define WT_SUFFIX double_avx2
#define WT_T double
#define WT_INT long long
#define WT_LANES 4
#define WT_MICRO micro_double_avx2
#define WT_MR 4
#define WT_TARGET "avx2,fma"
#include "winograd_tile.h"
#endif

/* The Winograd kernels of one instruction set. */
typedef struct {
    micro_kernels micro;
    wino_forward_float_fn forward_float;
    wino_forward_double_fn forward_double;
    wino_weight_float_fn weight_float;
    wino_weight_double_fn weight_double;
    wino_weights_float_fn weights_float;    /* the weights' transform */
    wino_weights_double_fn weights_double;
} wino_kernels;

static wino_kernels wino_isa;

/* 1 if the CPU runs the named kernels ("avx512", "avx2" or "none"); they are then the ones used. */
static int wino_select(const char *name)
{
    wino_kernels k = {micro_find(name), NULL, NULL, NULL, NULL, NULL, NULL};
    if (strcmp(k.micro.name, name) != 0)
        return 0;
#ifdef MICRO_X86
    if (strcmp(name, "avx512") == 0) {
        k.forward_float = wino_forward_float_avx512, k.forward_double = wino_forward_double_avx512;
        k.weight_float = wino_weight_float_avx512, k.weight_double = wino_weight_double_avx512;
        k.weights_float = wino_weights_float_avx512, k.weights_double = wino_weights_double_avx512;
    } else if (strcmp(name, "avx2") == 0) {
        k.forward_float = wino_forward_float_avx2, k.forward_double = wino_forward_double_avx2;
        k.weight_float = wino_weight_float_avx2, k.weight_double = wino_weight_double_avx2;
        k.weights_float = wino_weights_float_avx2, k.weights_double = wino_weights_double_avx2;
    }
#endif
    wino_isa = k;
    return 1;
}

static wino_kernels wino_current(void) { return wino_isa; }
#endif
