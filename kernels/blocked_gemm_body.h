/* The GEMM of blocked_gemm.h for one element type, included with BG_NAME, BG_T (float or double), BG_KERNELS
 * and BG_LANES (the micro_kernels fields of that type) defined. */

/* The offset of column j of B or C whose columns lie in runs of `segment`, run s at s * segment_stride. */
static inline ptrdiff_t MICRO_PASTE(BG_NAME, _column)(int j, int segment, ptrdiff_t segment_stride, ptrdiff_t col)
{
    return (ptrdiff_t)(j / segment) * segment_stride + (ptrdiff_t)(j % segment) * col;
}

/* How many of `left` columns from column j lie in j's run of `segment`. */
static inline int MICRO_PASTE(BG_NAME, _piece)(int j, int left, int segment)
{
    return left < segment - j % segment ? left : segment - j % segment;
}

/* B's rows [0, depth) x columns [first, first + cols) into panels of `width` columns, each panel depth x width
 * (in the CPU's widest vectors: FASTCONV_CLONES), piece by piece where a panel spans two runs of columns. */
FASTCONV_CLONES static void MICRO_PASTE(BG_NAME, _pack_b)(const BG_T *b, ptrdiff_t b_row, ptrdiff_t b_col,
                                                          int segment, ptrdiff_t b_segment, int first, int depth,
                                                          int cols, int width, BG_T *packed)
{
    for (int j0 = 0; j0 < cols; j0 += width, packed += (ptrdiff_t)depth * width) {
        int count = cols - j0 < width ? cols - j0 : width;
        for (int piece = 0, run; piece < count; piece += run) {
            int j = first + j0 + piece;
            const BG_T *column = b + MICRO_PASTE(BG_NAME, _column)(j, segment, b_segment, b_col);
            run = MICRO_PASTE(BG_NAME, _piece)(j, count - piece, segment);
            if (b_row == 1 && b_col != 1) {  /* B's columns are contiguous: read each one along its length */
                for (int jj = 0; jj < run; jj++)
                    for (int p = 0; p < depth; p++) packed[(ptrdiff_t)p * width + piece + jj] = column[p + jj * b_col];
                continue;
            }
            for (int p = 0; p < depth; p++) {
                const BG_T *src = column + p * b_row;
                BG_T *dst = packed + (ptrdiff_t)p * width + piece;
                if (b_col == 1)
                    for (int jj = 0; jj < run; jj++) dst[jj] = src[jj];
                else
                    for (int jj = 0; jj < run; jj++) dst[jj] = src[jj * b_col];
            }
        }
        for (int p = 0; p < depth; p++)
            for (int j = count; j < width; j++) packed[(ptrdiff_t)p * width + j] = 0;
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

/* The GEMM with C[i, j] at c[i * c_row + j * c_col]: in place where c_col is 1, else through the tile. B's
 * columns lie in runs of b_run, C's in runs of c_run (see BG_NAME). */
static void MICRO_PASTE(BG_NAME, _blocks)(const micro_kernels *k, int m, int n, int depth, const BG_T *a,
                                          ptrdiff_t a_row, ptrdiff_t a_col, const BG_T *b, ptrdiff_t b_row,
                                          ptrdiff_t b_col, int b_run, ptrdiff_t b_segment, int accumulate, BG_T *c,
                                          ptrdiff_t c_row, ptrdiff_t c_col, int c_run, ptrdiff_t c_segment,
                                          BG_T *work)
{
    const int mr = k->mr, lanes = k->BG_LANES, nr = MICRO_NV * lanes;
    /* B's full panels are read where they lie when its rows are contiguous and few panels of A meet each one:
     * packing would cost more than the products it serves. */
    const int b_in_place = b_col == 1 && m <= GEMM_IN_PLACE_ROWS && b_run >= n;
    BG_T *packed_b = work, *packed_a = work + GEMM_KC * GEMM_NC, *tile = packed_a + GEMM_MAX_MR * GEMM_KC;
    if (depth == 0 && !accumulate)
        for (int j = 0; j < n; j++) {
            BG_T *column = c + MICRO_PASTE(BG_NAME, _column)(j, c_run, c_segment, c_col);
            for (int i = 0; i < m; i++) column[i * c_row] = 0;
        }
    for (int jc = 0; jc < n; jc += GEMM_NC) {
        int nc = n - jc < GEMM_NC ? n - jc : GEMM_NC;
        for (int pc = 0; pc < depth; pc += GEMM_KC) {
            int kc = depth - pc < GEMM_KC ? depth - pc : GEMM_KC, add = accumulate || pc > 0;
            int packed_from = b_in_place ? nc - nc % nr : 0;  /* the columns packed: all, or a last partial panel */
            MICRO_PASTE(BG_NAME, _pack_b)(b + pc * b_row, b_row, b_col, b_run, b_segment, jc + packed_from, kc,
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
                    int j = jc + jr, cols = nc - jr < nr ? nc - jr : nr, vectors = (cols + lanes - 1) / lanes;
                    const BG_T *panel_b = jr < packed_from ? b + pc * b_row + j
                                                           : packed_b + (ptrdiff_t)((jr - packed_from) / nr) * kc * nr;
                    ptrdiff_t b_step = jr < packed_from ? b_row : nr;
                    BG_T *block = c + ir * c_row + MICRO_PASTE(BG_NAME, _column)(j, c_run, c_segment, c_col);
                    if (rows == mr && cols == vectors * lanes && c_col == 1 && j % c_run + cols <= c_run) {
                        k->BG_KERNELS[vectors](1, kc, panel_a, panel_row, panel_step, 0, panel_b, b_step, 0, block,
                                               c_row, add);
                        continue;
                    }
                    k->BG_KERNELS[vectors](1, kc, panel_a, panel_row, panel_step, 0, panel_b, b_step, 0, tile, nr, 0);
                    for (int piece = 0, run; piece < cols; piece += run) {  /* the tile's columns run by run of C */
                        run = MICRO_PASTE(BG_NAME, _piece)(j + piece, cols - piece, c_run);
                        BG_T *dst = c + ir * c_row + MICRO_PASTE(BG_NAME, _column)(j + piece, c_run, c_segment, c_col);
                        for (int i = 0; i < rows; i++) {
                            BG_T *cell = dst + i * c_row;
                            const BG_T *src = tile + i * nr + piece;
                            if (c_col == 1 && add)
                                for (int jj = 0; jj < run; jj++) cell[jj] += src[jj];
                            else if (c_col == 1)
                                for (int jj = 0; jj < run; jj++) cell[jj] = src[jj];
                            else
                                for (int jj = 0; jj < run; jj++)
                                    cell[jj * c_col] = add ? cell[jj * c_col] + src[jj] : src[jj];
                        }
                    }
                }
            }
        }
    }
}

/* C = A B (+ C if accumulate): A[i, p] = a[i * a_row + p * a_col], B[p, j] and C[i, j] for i < m, p < depth,
 * j < n. B's and C's columns lie in runs of `segment` (the pixels of one image; n for one run), run s starting
 * at b + s * b_segment and c + s * c_segment: B[p, j] = b[p * b_row + s * b_segment + (j - s * segment) * b_col],
 * C[i, j] = c[i * c_row + s * c_segment + j - s * segment], s = j / segment. Several images are one GEMM: its
 * panels run across their edges, no vector is left half empty at each image's end. */
static void BG_NAME(const micro_kernels *k, int m, int n, int depth, const BG_T *a, ptrdiff_t a_row,
                    ptrdiff_t a_col, const BG_T *b, ptrdiff_t b_row, ptrdiff_t b_col, int segment,
                    ptrdiff_t b_segment, int accumulate, BG_T *c, ptrdiff_t c_row, ptrdiff_t c_segment, BG_T *work)
{
    /* runs that abut are one run */
    int b_run = b_segment == (ptrdiff_t)segment * b_col ? n : segment, c_run = c_segment == segment ? n : segment;
    const int lanes = k->BG_LANES, empty = (lanes - segment % lanes) % lanes;  /* lanes left at a run's end */
    if (b_run < n && b_col == 1 && m <= GEMM_IN_PLACE_ROWS && 8 * empty <= segment) {
        /* few panels of A and runs that fill their vectors but for a few lanes: B's runs read in place one by
         * one cost less than packing them across their edges */
        for (int s = 0; s * segment < n; s++)
            MICRO_PASTE(BG_NAME, _blocks)(k, m, n - s * segment < segment ? n - s * segment : segment, depth, a,
                                          a_row, a_col, b + s * b_segment, b_row, b_col, n, 0, accumulate,
                                          c + s * c_segment, c_row, 1, n, 0, work);
        return;
    }
    /* B is packed once per block and A's panels are broadcast in place: where B is the wider matrix and
     * stored by columns, the transposed product C^T = B^T A^T packs less, wastes fewer lanes and still reads
     * its A (B^T) along rows. Each result's terms are the same products added in the same order: the bits do
     * not change. */
    if (n > 2 * m && b_row == 1 && segment >= n)
        MICRO_PASTE(BG_NAME, _blocks)(k, n, m, depth, b, b_col, b_row, a, a_col, a_row, m, 0, accumulate, c, 1,
                                      c_row, m, 0, work);
    else
        MICRO_PASTE(BG_NAME, _blocks)(k, m, n, depth, a, a_row, a_col, b, b_row, b_col, b_run, b_segment,
                                      accumulate, c, c_row, 1, c_run, c_segment, work);
}

#undef BG_NAME
#undef BG_T
#undef BG_KERNELS
#undef BG_LANES
