/* One micro-kernel of micro_gemm.h, included once per (type, instruction set) with MT_NAME, MT_T (float or
 * double), MT_LANES (elements per vector), MT_MR, MT_NV and MT_TARGET defined: MT_NAME computes MT_MR rows,
 * MT_NAME##_short MT_MR / 2 (the same sums, term for term, of the first rows only). Written with GCC's vector
 * extensions: `acc += a * b` compiles to one FMA per vector (GNU C contracts a * b + c by default). */
typedef MT_T MICRO_PASTE(MT_NAME, _vec) __attribute__((vector_size(MT_LANES * sizeof(MT_T))));

__attribute__((target(MT_TARGET), always_inline))
static inline void MICRO_PASTE(MT_NAME, _rows)(const int rows, int runs, int depth, const MT_T *a, ptrdiff_t a_row,
                                               ptrdiff_t a_step, ptrdiff_t a_run, const MT_T *b, ptrdiff_t b_step,
                                               ptrdiff_t b_run, MT_T *c, ptrdiff_t c_row, int accumulate)
{
    typedef MICRO_PASTE(MT_NAME, _vec) vec;
    vec acc[MT_MR][MT_NV];
    _Pragma("GCC unroll 8") for (int i = 0; i < rows; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < MT_NV; v++) acc[i][v] = (vec){0};
    for (int run = 0; run < runs; run++, a += a_run, b += b_run) {
        const MT_T *a_kk = a, *b_kk = b;
        for (int kk = 0; kk < depth; kk++, a_kk += a_step, b_kk += b_step) {
            vec row[MT_NV];
            _Pragma("GCC unroll 4") for (int v = 0; v < MT_NV; v++) memcpy(&row[v], b_kk + v * MT_LANES, sizeof(vec));
            _Pragma("GCC unroll 8") for (int i = 0; i < rows; i++) {
                MT_T weight = a_kk[i * a_row];
                _Pragma("GCC unroll 4") for (int v = 0; v < MT_NV; v++) acc[i][v] += row[v] * weight;
            }
        }
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < rows; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < MT_NV; v++) {
            MT_T *dst = c + i * c_row + v * MT_LANES;
            if (accumulate) {
                vec old;
                memcpy(&old, dst, sizeof(vec));
                acc[i][v] += old;
            }
            memcpy(dst, &acc[i][v], sizeof(vec));
        }
}

__attribute__((target(MT_TARGET)))
static void MT_NAME(int runs, int depth, const MT_T *a, ptrdiff_t a_row, ptrdiff_t a_step, ptrdiff_t a_run,
                    const MT_T *b, ptrdiff_t b_step, ptrdiff_t b_run, MT_T *c, ptrdiff_t c_row, int accumulate)
{
    MICRO_PASTE(MT_NAME, _rows)(MT_MR, runs, depth, a, a_row, a_step, a_run, b, b_step, b_run, c, c_row, accumulate);
}

__attribute__((target(MT_TARGET)))
static void MICRO_PASTE(MT_NAME, _short)(int runs, int depth, const MT_T *a, ptrdiff_t a_row, ptrdiff_t a_step,
                                         ptrdiff_t a_run, const MT_T *b, ptrdiff_t b_step, ptrdiff_t b_run, MT_T *c,
                                         ptrdiff_t c_row, int accumulate)
{
    MICRO_PASTE(MT_NAME, _rows)(MT_MR / 2, runs, depth, a, a_row, a_step, a_run, b, b_step, b_run, c, c_row,
                                accumulate);
}

#undef MT_NAME
#undef MT_T
#undef MT_LANES
#undef MT_MR
#undef MT_NV
#undef MT_TARGET
