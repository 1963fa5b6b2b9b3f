/* The GEMM of blocked_gemm.h for one element type, included with BG_NAME, BG_T (float or double), BG_KERNELS
 * and BG_LANES (the micro_kernels fields of that type) defined. */

/* B's rows [0, depth) x columns [0, cols) into panels of `width` columns, each panel depth x width (in the
 * CPU's widest vectors: FASTCONV_CLONES). */
FASTCONV_CLONES static void MICRO_PASTE(BG_NAME, _pack_b)(const BG_T *b, ptrdiff_t b_row, ptrdiff_t b_col,
                                                          int depth, int cols, int width, BG_T *packed)
{
    for (int j0 = 0; j0 < cols; j0 += width, packed += (ptrdiff_t)depth * width) {
        int count = cols - j0 < width ? cols - j0 : width;
        for (int p = 0; p < depth; p++) {
            const BG_T *src = b + p * b_row + j0 * b_col;
            BG_T *dst = packed + (ptrdiff_t)p * width;
            if (b_col == 1)
                for (int j = 0; j < count; j++) dst[j] = src[j];
            else if (b_row != 1)
                for (int j = 0; j < count; j++) dst[j] = src[j * b_col];
            for (int j = count; j < width; j++) dst[j] = 0;
        }
        if (b_row == 1 && b_col != 1)  /* B's columns are contiguous: read each one along its length */
            for (int j = 0; j < count; j++)
                for (int p = 0; p < depth; p++) packed[(ptrdiff_t)p * width + j] = b[p + (j0 + j) * b_col];
    }
}

/* A's rows [0, rows) x columns [0, depth) as one panel of `height` rows (zero below `rows`), column by column. */
static void MICRO_PASTE(BG_NAME, _pack_a)(const BG_T *a, ptrdiff_t a_row, ptrdiff_t a_col, int rows, int depth,
                                          int height, BG_T *packed)
{
    for (int p = 0; p < depth; p++) {
        BG_T *dst = packed + (ptrdiff_t)p * height;
        for (int i = 0; i < rows; i++) dst[i] = a[i * a_row + p * a_col];
        for (int i = rows; i < height; i++) dst[i] = 0;
    }
}

/* The GEMM with C[i, j] at c[i * c_row + j * c_col]: in place where c_col is 1, else through the tile. */
static void MICRO_PASTE(BG_NAME, _blocks)(const micro_kernels *k, int m, int n, int depth, const BG_T *a,
                                          ptrdiff_t a_row, ptrdiff_t a_col, const BG_T *b, ptrdiff_t b_row,
                                          ptrdiff_t b_col, int accumulate, BG_T *c, ptrdiff_t c_row,
                                          ptrdiff_t c_col, BG_T *work)
{
    const int mr = k->mr, lanes = k->BG_LANES, nr = MICRO_NV * lanes;
    /* B's full panels are read where they lie when its rows are contiguous and few panels of A meet each one:
     * packing would cost more than the products it serves. */
    const int b_in_place = b_col == 1 && m <= GEMM_IN_PLACE_ROWS;
    BG_T *packed_b = work, *packed_a = work + GEMM_KC * GEMM_NC, *tile = packed_a + GEMM_MAX_MR * GEMM_KC;
    if (depth == 0 && !accumulate)
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) c[i * c_row + j * c_col] = 0;
    for (int jc = 0; jc < n; jc += GEMM_NC) {
        int nc = n - jc < GEMM_NC ? n - jc : GEMM_NC;
        for (int pc = 0; pc < depth; pc += GEMM_KC) {
            int kc = depth - pc < GEMM_KC ? depth - pc : GEMM_KC, add = accumulate || pc > 0;
            int packed_from = b_in_place ? nc - nc % nr : 0;  /* the columns packed: all, or a last partial panel */
            MICRO_PASTE(BG_NAME, _pack_b)(b + pc * b_row + (jc + packed_from) * b_col, b_row, b_col, kc,
                                          nc - packed_from, nr, packed_b);
            for (int ir = 0; ir < m; ir += mr) {
                /* A is read in place by the micro-kernel's broadcasts (packing it costs as much as the products
                 * when B is a few panels wide); only a last panel of fewer rows is packed, zero-padded. */
                int rows = m - ir < mr ? m - ir : mr;
                const BG_T *panel_a = a + ir * a_row + pc * a_col;
                ptrdiff_t panel_row = a_row, panel_step = a_col;
                if (rows < mr) {
                    MICRO_PASTE(BG_NAME, _pack_a)(panel_a, a_row, a_col, rows, kc, mr, packed_a);
                    panel_a = packed_a;
                    panel_row = 1;
                    panel_step = mr;
                }
                for (int jr = 0; jr < nc; jr += nr) {
                    int cols = nc - jr < nr ? nc - jr : nr, vectors = (cols + lanes - 1) / lanes;
                    const BG_T *panel_b = jr < packed_from ? b + pc * b_row + jc + jr
                                                           : packed_b + (ptrdiff_t)((jr - packed_from) / nr) * kc * nr;
                    ptrdiff_t b_step = jr < packed_from ? b_row : nr;
                    BG_T *block = c + ir * c_row + (jc + jr) * c_col;
                    if (rows == mr && cols == vectors * lanes && c_col == 1) {
                        k->BG_KERNELS[vectors](1, kc, panel_a, panel_row, panel_step, 0, panel_b, b_step, 0, block,
                                               c_row, add);
                        continue;
                    }
                    k->BG_KERNELS[vectors](1, kc, panel_a, panel_row, panel_step, 0, panel_b, b_step, 0, tile, nr, 0);
                    for (int i = 0; i < rows; i++)
                        for (int j = 0; j < cols; j++) {
                            BG_T *dst = block + i * c_row + j * c_col;
                            *dst = add ? *dst + tile[i * nr + j] : tile[i * nr + j];
                        }
                }
            }
        }
    }
}

static void BG_NAME(const micro_kernels *k, int m, int n, int depth, const BG_T *a, ptrdiff_t a_row,
                    ptrdiff_t a_col, const BG_T *b, ptrdiff_t b_row, ptrdiff_t b_col, int accumulate, BG_T *c,
                    ptrdiff_t c_row, BG_T *work)
{
    /* B is packed once per block and A's panels are broadcast in place: where B is the wider matrix and
     * stored by columns, the transposed product C^T = B^T A^T packs less, wastes fewer lanes and still reads
     * its A (B^T) along rows. Each result's terms are the same products added in the same order: the bits do
     * not change. */
    if (n > 2 * m && b_row == 1)
        MICRO_PASTE(BG_NAME, _blocks)(k, n, m, depth, b, b_col, b_row, a, a_col, a_row, accumulate, c, 1, c_row,
                                      work);
    else
        MICRO_PASTE(BG_NAME, _blocks)(k, m, n, depth, a, a_row, a_col, b, b_row, b_col, accumulate, c, c_row, 1,
                                      work);
}

#undef BG_NAME
#undef BG_T
#undef BG_KERNELS
#undef BG_LANES
