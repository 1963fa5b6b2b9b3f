/* The per-block work of winograd.h, included once per (type, instruction set) with WT_SUFFIX, WT_T (float or
 * double), WT_LANES (elements per vector), WT_MICRO (its micro-kernel of micro_gemm.h) and WT_TARGET defined.
 *
 * A block is `block` consecutive tiles of one group (the last block of a call may have fewer), whose work
 * buffer holds, for a forward:
 *     V[p][c][t]  the transformed input tiles, point by point (p < alpha^2), tiles contiguous;
 *     M[p][k][t]  their products with the transformed weights U[p][k / MR][c][k % MR];
 * and for a weight gradient:
 *     V[p][t][c]  the transformed input tiles, channels contiguous (c < c_pad);
 *     D[p][k][t]  the gradient's tiles transformed by A dY A^T (k < k_pad: rows past out_channels stay zero).
 * Transforms are vectorised over WT_LANES tiles (or channels): each tile is first gathered, with the zeros of
 * the padding, into small scratch buffers (Q, then S), so edge tiles need no padded copy of the input. Every value a
 * transform writes is checked (x * 0 is NaN for an inf or a NaN), and a call says when one was not finite.
 * WT_MICRO names the micro-kernels (WT_MICRO_1 .. _3 by vectors per row) and WT_MR their rows. */
#define WT_NAME(name) MICRO_PASTE(MICRO_PASTE(name, _), WT_SUFFIX)
typedef WT_T WT_NAME(wino_vec) __attribute__((vector_size(WT_LANES * sizeof(WT_T))));

#define WT_ALWAYS __attribute__((target(WT_TARGET), always_inline)) static inline

typedef WT_INT WT_NAME(wino_index) __attribute__((vector_size(WT_LANES * sizeof(WT_T))));

/* Tiles are gathered row by row into Q, a lane's window at Q + l * WT_WINDOW with a row every 8 elements
 * (contiguous copies), then transposed block by block into S, where element (i, j) of every lane is one
 * vector: the transforms' layout. */
#define WT_WINDOW 48

/* Q[i * 8 + j] = the element at row r0 + i, column c0 + j of `plane` (zero outside it), i, j < size. */
WT_ALWAYS void WT_NAME(gather_window)(const WT_T *plane, int height, int width, int r0, int c0, int size, WT_T *Q)
{
    int i0 = r0 < 0 ? -r0 : 0, i1 = height - r0 < size ? height - r0 : size;
    int j0 = c0 < 0 ? -c0 : 0, j1 = width - c0 < size ? width - c0 : size;
    if (i0 == 0 && i1 == size && j0 == 0 && j1 == size) {
        const WT_T *src = plane + (ptrdiff_t)r0 * width + c0;
        for (int i = 0; i < size; i++) memcpy(Q + i * 8, src + (ptrdiff_t)i * width, size * sizeof(WT_T));
        return;
    }
    for (int i = 0; i < size; i++) {
        int inside = i >= i0 && i < i1;
        if (inside && j0 == 0 && j1 == size) {  /* constant sizes: copied inline */
            memcpy(Q + i * 8, plane + (ptrdiff_t)(r0 + i) * width + c0, size * sizeof(WT_T));
            continue;
        }
        memset(Q + i * 8, 0, size * sizeof(WT_T));
        for (int j = j0; inside && j < j1; j++) Q[i * 8 + j] = plane[(ptrdiff_t)(r0 + i) * width + c0 + j];
    }
}

WT_ALWAYS void WT_NAME(zero_window)(int size, WT_T *Q)
{
    for (int i = 0; i < size; i++) memset(Q + i * 8, 0, size * sizeof(WT_T));
}

/* rows[r][c] = rows[c][r]: log2(WT_LANES) butterfly stages, each swapping one bit of the row index with the
 * same bit of the column index by two-input shuffles of constant pattern. */
WT_ALWAYS void WT_NAME(transpose)(WT_NAME(wino_vec) rows[WT_LANES])
{
    typedef WT_NAME(wino_index) index;
    _Pragma("GCC unroll 4") for (int d = 1; d < WT_LANES; d *= 2) {
        index low, high;
        _Pragma("GCC unroll 16") for (int c = 0; c < WT_LANES; c++) {
            low[c] = c & d ? WT_LANES + c - d : c;
            high[c] = c & d ? WT_LANES + c : c + d;
        }
        _Pragma("GCC unroll 16") for (int r = 0; r < WT_LANES; r++)
            if (!(r & d)) {
                WT_NAME(wino_vec) a = rows[r], b = rows[r + d];
                rows[r] = __builtin_shuffle(a, b, low);
                rows[r + d] = __builtin_shuffle(a, b, high);
            }
    }
}

/* S[(i * size + j) * WT_LANES + l] = Q[l * WT_WINDOW + i * 8 + j] for i, j < size and every lane l. */
WT_ALWAYS void WT_NAME(lanes_of_windows)(const WT_T *Q, int size, WT_T *S)
{
    typedef WT_NAME(wino_vec) vec;
    _Pragma("GCC unroll 12") for (int b = 0; b * WT_LANES < size * 8; b++) {
        vec rows[WT_LANES];
        _Pragma("GCC unroll 16") for (int l = 0; l < WT_LANES; l++)
            memcpy(&rows[l], Q + l * WT_WINDOW + b * WT_LANES, sizeof(vec));
        WT_NAME(transpose)(rows);
        _Pragma("GCC unroll 16") for (int r = 0; r < WT_LANES; r++) {
            int i = (b * WT_LANES + r) / 8, j = (b * WT_LANES + r) % 8;
            if (i < size && j < size) memcpy(S + (i * size + j) * WT_LANES, &rows[r], sizeof(vec));
        }
    }
}

/* Q[l * 16 + q] = S[q * WT_LANES + l] for q < cells (<= 16) and every lane l: a lane's results contiguous. */
WT_ALWAYS void WT_NAME(windows_of_lanes)(const WT_T *S, int cells, WT_T *Q)
{
    typedef WT_NAME(wino_vec) vec;
    _Pragma("GCC unroll 4") for (int b = 0; b * WT_LANES < cells; b++) {
        vec rows[WT_LANES];
        _Pragma("GCC unroll 16") for (int r = 0; r < WT_LANES; r++) {
            rows[r] = (vec){0};
            if (b * WT_LANES + r < cells) memcpy(&rows[r], S + (b * WT_LANES + r) * WT_LANES, sizeof(vec));
        }
        WT_NAME(transpose)(rows);
        _Pragma("GCC unroll 16") for (int l = 0; l < WT_LANES; l++)
            memcpy(Q + l * 16 + b * WT_LANES, &rows[l], sizeof(vec));
    }
}

/* out = sum over k of coef[k] * in[k], the zero coefficients skipped (the coefficients are constants). */
#define WT_COMBINE(out, n, coef, in)                                                      \
    do {                                                                                  \
        int started_ = 0;                                                                 \
        _Pragma("GCC unroll 8") for (int k_ = 0; k_ < (n); k_++) {                        \
            double c_ = (coef);                                                           \
            if (c_ == 0) continue;                                                        \
            vec term_ = (in) * (__typeof__((in)[0]))c_;                                   \
            (out) = started_ ? (out) + term_ : term_;                                     \
            started_ = 1;                                                                 \
        }                                                                                 \
        if (!started_) (out) = (vec){0};                                                  \
    } while (0)

/* V[(i * alpha + j) * point_stride] = (B^T d B)[i][j] for the alpha x alpha vectors d of S. Returns a vector
 * that is NaN in a lane where a value was not finite. */
WT_ALWAYS WT_NAME(wino_vec) WT_NAME(input_transform)(const WT_T *S, int m, int alpha, WT_T *V,
                                                     ptrdiff_t point_stride, WT_NAME(wino_vec) check)
{
    typedef WT_NAME(wino_vec) vec;
    vec d[WINO_MAX_ALPHA][WINO_MAX_ALPHA], t[WINO_MAX_ALPHA][WINO_MAX_ALPHA];
    _Pragma("GCC unroll 8") for (int i = 0; i < alpha; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < alpha; j++) memcpy(&d[i][j], S + (i * alpha + j) * WT_LANES, sizeof(vec));
    _Pragma("GCC unroll 8") for (int i = 0; i < alpha; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < alpha; j++) WT_COMBINE(t[i][j], alpha, WINO_BT(m, i, k_), d[k_][j]);
    _Pragma("GCC unroll 8") for (int i = 0; i < alpha; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < alpha; j++) {
            vec v;
            WT_COMBINE(v, alpha, WINO_BT(m, j, k_), t[i][k_]);
            check += v * (WT_T)0;
            memcpy(V + (i * alpha + j) * point_stride, &v, sizeof(vec));
        }
    return check;
}

/* Y[i][j] = (A^T M A)[i][j] + shift, i, j < m, for the alpha x alpha vectors of M (point p at M + p * stride),
 * into S (m x m vectors). */
WT_ALWAYS WT_NAME(wino_vec) WT_NAME(output_transform)(const WT_T *M, ptrdiff_t point_stride, int m, int alpha,
                                                      WT_T shift, WT_T *S,
                                                      WT_NAME(wino_vec) check)
{
    typedef WT_NAME(wino_vec) vec;
    vec d[WINO_MAX_ALPHA][WINO_MAX_ALPHA], t[WINO_MAX_ALPHA][WINO_MAX_ALPHA];
    _Pragma("GCC unroll 8") for (int i = 0; i < alpha; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < alpha; j++) memcpy(&d[i][j], M + (i * alpha + j) * point_stride, sizeof(vec));
    _Pragma("GCC unroll 8") for (int i = 0; i < m; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < alpha; j++) WT_COMBINE(t[i][j], alpha, WINO_AT(m, i, k_), d[k_][j]);
    _Pragma("GCC unroll 8") for (int i = 0; i < m; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < m; j++) {
            vec y;
            WT_COMBINE(y, alpha, WINO_AT(m, j, k_), t[i][k_]);
            y += shift;
            check += y * (WT_T)0;
            memcpy(S + (i * m + j) * WT_LANES, &y, sizeof(vec));
        }
    return check;
}

/* D[(a * alpha + b) * point_stride] = (A dY A^T)[a][b] for the m x m vectors dY of S. */
WT_ALWAYS WT_NAME(wino_vec) WT_NAME(gradient_transform)(const WT_T *S, int m, int alpha, WT_T *D,
                                                        ptrdiff_t point_stride, WT_NAME(wino_vec) check)
{
    typedef WT_NAME(wino_vec) vec;
    vec g[WINO_MAX_ALPHA][WINO_MAX_ALPHA], t[WINO_MAX_ALPHA][WINO_MAX_ALPHA];
    _Pragma("GCC unroll 8") for (int i = 0; i < m; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < m; j++) memcpy(&g[i][j], S + (i * m + j) * WT_LANES, sizeof(vec));
    _Pragma("GCC unroll 8") for (int a = 0; a < alpha; a++)
        _Pragma("GCC unroll 8") for (int j = 0; j < m; j++) WT_COMBINE(t[a][j], m, WINO_AT(m, k_, a), g[k_][j]);
    _Pragma("GCC unroll 8") for (int a = 0; a < alpha; a++)
        _Pragma("GCC unroll 8") for (int b = 0; b < alpha; b++) {
            vec v;
            WT_COMBINE(v, m, WINO_AT(m, k_, b), t[a][k_]);
            check += v * (WT_T)0;
            memcpy(D + (a * alpha + b) * point_stride, &v, sizeof(vec));
        }
    return check;
}

WT_ALWAYS int WT_NAME(any_nan)(WT_NAME(wino_vec) check)
{
    for (int l = 0; l < WT_LANES; l++)
        if (check[l] != check[l]) return 1;
    return 0;
}

/* The columns [0, n) of the rows [kb, kb + MR) of C = A B (or C += A B): full blocks of MICRO_NV vectors, then
 * one of fewer vectors (n is a multiple of WT_LANES). */
WT_ALWAYS void WT_NAME(multiply)(int depth, const WT_T *a, ptrdiff_t a_row, ptrdiff_t a_step, const WT_T *b,
                                 ptrdiff_t b_step, WT_T *c, ptrdiff_t c_row, int n, int accumulate)
{
    int j = 0;
    for (; j + MICRO_NV * WT_LANES <= n; j += MICRO_NV * WT_LANES)
        MICRO_PASTE(WT_MICRO, _3)(1, depth, a, a_row, a_step, 0, b + j, b_step, 0, c + j, c_row, accumulate);
    if (n - j == 2 * WT_LANES)
        MICRO_PASTE(WT_MICRO, _2)(1, depth, a, a_row, a_step, 0, b + j, b_step, 0, c + j, c_row, accumulate);
    else if (n - j == WT_LANES)
        MICRO_PASTE(WT_MICRO, _1)(1, depth, a, a_row, a_step, 0, b + j, b_step, 0, c + j, c_row, accumulate);
}

/* One block of a forward: tiles [first, first + count) of one group. */
WT_ALWAYS int WT_NAME(forward_block)(const wino_shape *s, const WT_T *x, const WT_T *u, const WT_T *bias, WT_T *y,
                                     long first, int count, WT_T *work, int *tiles, int m, int alpha)
{
    typedef WT_NAME(wino_vec) vec;
    const int T = s->block, P = alpha * alpha, C = s->channels, K = s->out_channels;
    const ptrdiff_t in_plane = (ptrdiff_t)s->height * s->width, out_plane = (ptrdiff_t)s->out_h * s->out_w;
    WT_T *V = work, *M = V + P * s->v_point;
    WT_T S[WINO_MAX_ALPHA * WINO_MAX_ALPHA * WT_LANES], Q[WT_LANES * WT_WINDOW] = {0};
    vec check = (vec){0};
    wino_tiles(s, first, count, tiles);
    for (int c = 0; c < C; c++)
        for (int t0 = 0; t0 < T; t0 += WT_LANES) {
            for (int l = 0; l < WT_LANES; l++) {
                int t = t0 + l;
                if (t >= count) {
                    WT_NAME(zero_window)(alpha, Q + l * WT_WINDOW);
                    continue;
                }
                const int *tile = tiles + 3 * t;
                WT_NAME(gather_window)(x + tile[0] * s->in_image + c * in_plane, s->height, s->width,
                                       tile[1] - s->pad_top, tile[2] - s->pad_left, alpha, Q + l * WT_WINDOW);
            }
            WT_NAME(lanes_of_windows)(Q, alpha, S);
            check = WT_NAME(input_transform)(S, m, alpha, V + (ptrdiff_t)c * T + t0, s->v_point, check);
        }
    if (WT_NAME(any_nan)(check)) return 1;
    for (int p = 0; p < P; p++)
        for (int kb = 0; kb < s->k_pad; kb += WT_MR)
            WT_NAME(multiply)(C, u + p * s->u_point + (ptrdiff_t)kb * C, 1, WT_MR, V + p * s->v_point, T,
                              M + p * s->m_point + (ptrdiff_t)kb * T, T, T, 0);
    for (int k = 0; k < K; k++)
        for (int t0 = 0; t0 < count; t0 += WT_LANES) {
            check = WT_NAME(output_transform)(M + (ptrdiff_t)k * T + t0, s->m_point, m, alpha,
                                              bias ? bias[k] : 0, S, check);
            WT_NAME(windows_of_lanes)(S, m * m, Q);
            for (int l = 0; l < WT_LANES && t0 + l < count; l++) {
                const int *tile = tiles + 3 * (t0 + l);
                WT_T *dst = y + tile[0] * s->out_image + k * out_plane + (ptrdiff_t)tile[1] * s->out_w + tile[2];
                int rows = s->out_h - tile[1] < m ? s->out_h - tile[1] : m;
                int cols = s->out_w - tile[2] < m ? s->out_w - tile[2] : m;
                for (int i = 0; i < rows; i++)
                    if (cols == m)  /* a constant size: copied inline */
                        memcpy(dst + (ptrdiff_t)i * s->out_w, Q + l * 16 + i * m, m * sizeof(WT_T));
                    else
                        for (int j = 0; j < cols; j++) dst[(ptrdiff_t)i * s->out_w + j] = Q[l * 16 + i * m + j];
            }
        }
    return WT_NAME(any_nan)(check);
}

/* y = the convolution of x with the transformed weights u (+ bias), every group: its blocks are independent
 * units, shared out among the threads. x, u, bias and y advance by their *_group strides from one group to the
 * next; each thread has `work_size` elements of `work` and 3 * block ints of `tiles`. Returns 1 if a value was
 * not finite. */
__attribute__((target(WT_TARGET)))
static int WT_NAME(wino_forward)(const wino_shape *s, int groups, const WT_T *x, ptrdiff_t x_group, const WT_T *u,
                                 ptrdiff_t u_group, const WT_T *bias, WT_T *y, ptrdiff_t y_group, WT_T *work,
                                 ptrdiff_t work_size, int *tiles, int threads)
{
    const long total = (long)s->batch * s->tiles_plane, blocks = (total + s->block - 1) / s->block;
    int bad = 0;
    (void)threads;
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(| : bad)
    for (long unit = 0; unit < groups * blocks; unit++) {
        int g = (int)(unit / blocks), thread = WINO_THREAD();
        long first = unit % blocks * s->block;
        int count = (int)(total - first < s->block ? total - first : s->block);
        const WT_T *group_bias = bias ? bias + (ptrdiff_t)g * s->out_channels : NULL;
        WT_T *w = work + thread * work_size;
        int *t = tiles + 3 * s->block * thread;
        bad |= s->m == 4 ? WT_NAME(forward_block)(s, x + g * x_group, u + g * u_group, group_bias, y + g * y_group,
                                                  first, count, w, t, 4, 6)
                         : WT_NAME(forward_block)(s, x + g * x_group, u + g * u_group, group_bias, y + g * y_group,
                                                  first, count, w, t, 2, 4);
    }
    return bad;
}

/* gw[(k * C + c) * 9 + 3 a + b] = (G^T du G)[a][b] over the points of du[p][k][c] (k < K, c < C): the weight
 * gradient out of the transformed domain, WT_LANES channels at a time; `check` as the transforms' (the sums of
 * du may overflow where no transformed value did). */
WT_ALWAYS WT_NAME(wino_vec) WT_NAME(finish_weight)(const wino_shape *s, const WT_T *du, int k, int m,
                                                   int alpha, WT_T *gw, WT_NAME(wino_vec) check)
{
    typedef WT_NAME(wino_vec) vec;
    const int C = s->channels;
    const ptrdiff_t point = s->u_point;
    for (int c0 = 0; c0 < C; c0 += WT_LANES) {
        vec d[WINO_MAX_ALPHA][WINO_MAX_ALPHA], t[WINO_MAX_ALPHA][3], out[3][3];
        _Pragma("GCC unroll 8") for (int i = 0; i < alpha; i++)
            _Pragma("GCC unroll 8") for (int j = 0; j < alpha; j++)
                memcpy(&d[i][j], du + (i * alpha + j) * point + (ptrdiff_t)k * s->c_pad + c0, sizeof(vec));
        _Pragma("GCC unroll 8") for (int i = 0; i < alpha; i++)
            _Pragma("GCC unroll 4") for (int b = 0; b < 3; b++) WT_COMBINE(t[i][b], alpha, WINO_G(m, k_, b), d[i][k_]);
        _Pragma("GCC unroll 4") for (int a = 0; a < 3; a++)
            _Pragma("GCC unroll 4") for (int b = 0; b < 3; b++) WT_COMBINE(out[a][b], alpha, WINO_G(m, k_, a), t[k_][b]);
        for (int q = 0; q < 9; q++) check += out[q / 3][q % 3] * (WT_T)0;
        for (int l = 0; l < WT_LANES && c0 + l < C; l++)
            for (int q = 0; q < 9; q++) gw[((ptrdiff_t)k * C + c0 + l) * 9 + q] = out[q / 3][q % 3][l];
    }
    return check;
}

/* The share of one thread of the team running it (every thread of the team calls it) of the weight gradient
 * of every group, in fixed blocks of tiles: for each block, the threads share out its transforms (V: tile x
 * channel vector, D: channel x tile vector), then the products du[p] += D[p] V[p] by (point, MR output
 * channels), so every element of du is summed by one thread in block order whatever the number of threads;
 * du then leaves the transformed domain. du, work (V and D of one block) and tiles (3 * block) are shared.
 * Returns 1 if a value this thread transformed was not finite. (The parallel region is the caller's, so that
 * m and alpha reach this code as constants.) */
WT_ALWAYS int WT_NAME(weight_gradient)(const wino_shape *s, int groups, const WT_T *x, ptrdiff_t x_group,
                                       const WT_T *gy, ptrdiff_t gy_group, WT_T *du, WT_T *gw, WT_T *work, int *tiles,
                                       int m, int alpha)
{
    typedef WT_NAME(wino_vec) vec;
    const int T = s->block, P = alpha * alpha, C = s->channels, K = s->out_channels, CP = s->c_pad;
    const int c_vectors = CP / WT_LANES, t_vectors = T / WT_LANES, k_blocks = s->k_pad / WT_MR;
    const long total = (long)s->batch * s->tiles_plane;
    const ptrdiff_t in_plane = (ptrdiff_t)s->height * s->width, out_plane = (ptrdiff_t)s->out_h * s->out_w;
    WT_T *V = work, *D = V + P * s->v_point;
    WT_T S[WINO_MAX_ALPHA * WINO_MAX_ALPHA * WT_LANES], Q[WT_LANES * WT_WINDOW] = {0};
    vec check = (vec){0};
    for (int grp = 0; grp < groups; grp++) {
        const WT_T *xg = x + grp * x_group, *gyg = gy + grp * gy_group;
#pragma omp for schedule(static)
        for (long e = 0; e < P * s->u_point; e++) du[e] = 0;
        for (long first = 0; first < total; first += T) {
            const int count = (int)(total - first < T ? total - first : T);
#pragma omp single
            wino_tiles(s, first, count, tiles);
#pragma omp for schedule(static)
            for (int item = 0; item < T * c_vectors; item++) {
                int t = item / c_vectors, c0 = item % c_vectors * WT_LANES;
                for (int l = 0; l < WT_LANES; l++) {
                    if (t >= count || c0 + l >= C) {
                        WT_NAME(zero_window)(alpha, Q + l * WT_WINDOW);
                        continue;
                    }
                    const int *tile = tiles + 3 * t;
                    WT_NAME(gather_window)(xg + tile[0] * s->in_image + (c0 + l) * in_plane, s->height, s->width,
                                           tile[1] - s->pad_top, tile[2] - s->pad_left, alpha, Q + l * WT_WINDOW);
                }
                WT_NAME(lanes_of_windows)(Q, alpha, S);
                check = WT_NAME(input_transform)(S, m, alpha, V + (ptrdiff_t)t * CP + c0, s->v_point, check);
            }
#pragma omp for schedule(static)
            for (int item = 0; item < K * t_vectors; item++) {
                int k = item / t_vectors, t0 = item % t_vectors * WT_LANES;
                for (int l = 0; l < WT_LANES; l++) {
                    int t = t0 + l;
                    if (t >= count) {
                        WT_NAME(zero_window)(m, Q + l * WT_WINDOW);
                        continue;
                    }
                    const int *tile = tiles + 3 * t;
                    WT_NAME(gather_window)(gyg + tile[0] * s->out_image + k * out_plane, s->out_h, s->out_w, tile[1],
                                           tile[2], m, Q + l * WT_WINDOW);
                }
                WT_NAME(lanes_of_windows)(Q, m, S);
                check = WT_NAME(gradient_transform)(S, m, alpha, D + (ptrdiff_t)k * T + t0, s->m_point, check);
            }
#pragma omp for schedule(static)
            for (int item = 0; item < P * k_blocks; item++) {
                int p = item / k_blocks, kb = item % k_blocks * WT_MR;
                WT_NAME(multiply)(T, D + p * s->m_point + (ptrdiff_t)kb * T, T, 1, V + p * s->v_point, CP,
                                  du + p * s->u_point + (ptrdiff_t)kb * CP, CP, CP, 1);
            }
        }
#pragma omp for schedule(static)
        for (int k = 0; k < K; k++)
            check = WT_NAME(finish_weight)(s, du, k, m, alpha, gw + (ptrdiff_t)grp * K * C * 9, check);
    }
    return WT_NAME(any_nan)(check);
}

__attribute__((target(WT_TARGET)))
static int WT_NAME(wino_weight)(const wino_shape *s, int groups, const WT_T *x, ptrdiff_t x_group, const WT_T *gy,
                                ptrdiff_t gy_group, WT_T *du, WT_T *gw, WT_T *work, int *tiles, int threads)
{
    int bad = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    bad |= s->m == 4 ? WT_NAME(weight_gradient)(s, groups, x, x_group, gy, gy_group, du, gw, work, tiles, 4, 6)
                     : WT_NAME(weight_gradient)(s, groups, x, x_group, gy, gy_group, du, gw, work, tiles, 2, 4);
    return bad;
}

/* u[group][p][k / MR][c][k % MR] = (G f G^T)[p] of the filter f of output channel k and input channel c, for the
 * MR output channels of the block kb (one per lane), in double precision: the filter's tap (i, j) is
 * w[k * k_stride + c * c_stride + 3 i + j] past the group's first weight, or its tap (2 - i, 2 - j) where `flip`
 * (an input gradient's weight); zero for k >= out_channels. */
WT_ALWAYS void WT_NAME(transform_filters)(const wino_shape *s, const WT_T *w, ptrdiff_t k_stride, ptrdiff_t c_stride,
                                          int flip, int kb, int c, WT_T *u, int m, int alpha)
{
    typedef double dvec __attribute__((vector_size(WT_MR * sizeof(double))));
    typedef dvec vec;  /* for WT_COMBINE */
    dvec f[3][3], t[WINO_MAX_ALPHA][3];
    for (int q = 0; q < 9; q++)
        for (int r = 0; r < WT_MR; r++)
            f[q / 3][q % 3][r] = kb + r < s->out_channels ? (double)w[(kb + r) * k_stride + c * c_stride + (flip ? 8 - q : q)] : 0;
    _Pragma("GCC unroll 8") for (int a = 0; a < alpha; a++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 3; j++) WT_COMBINE(t[a][j], 3, WINO_G(m, a, k_), f[k_][j]);
    WT_T *dst = u + (ptrdiff_t)kb * s->channels + (ptrdiff_t)c * WT_MR;
    _Pragma("GCC unroll 8") for (int a = 0; a < alpha; a++)
        _Pragma("GCC unroll 8") for (int b = 0; b < alpha; b++) {
            dvec v;
            WT_COMBINE(v, 3, WINO_G(m, b, k_), t[a][k_]);
            WT_T *point = dst + (a * alpha + b) * s->u_point;
            for (int r = 0; r < WT_MR; r++) point[r] = (WT_T)v[r];
        }
}

/* u = the transformed weights of every group (transform_filters), groups g_stride apart in w. */
__attribute__((target(WT_TARGET)))
static void WT_NAME(wino_weights)(const wino_shape *s, int groups, const WT_T *w, ptrdiff_t k_stride,
                                  ptrdiff_t c_stride, ptrdiff_t g_stride, int flip, WT_T *u, int threads)
{
    const int C = s->channels, k_blocks = s->k_pad / WT_MR;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < (long)groups * k_blocks * C; item++) {
        int grp = (int)(item / ((long)k_blocks * C)), kb = (int)(item / C % k_blocks) * WT_MR, c = (int)(item % C);
        const WT_T *wg = w + grp * g_stride;
        WT_T *ug = u + grp * s->alpha * s->alpha * s->u_point;
        if (s->m == 4)
            WT_NAME(transform_filters)(s, wg, k_stride, c_stride, flip, kb, c, ug, 4, 6);
        else
            WT_NAME(transform_filters)(s, wg, k_stride, c_stride, flip, kb, c, ug, 2, 4);
    }
}

#undef WT_NAME
#undef WT_WINDOW
#undef WT_INT
#undef WT_ALWAYS
#undef WT_COMBINE
#undef WT_SUFFIX
#undef WT_T
#undef WT_LANES
#undef WT_MICRO
#undef WT_MR
#undef WT_TARGET
