/* The register tiles of the direct convolution, included by direct_conv.h once per (type, ISA) with TILE_NAME,
 * TILE_WEIGHT_NAME, TILE_T (float or double), TILE_VEC, TILE_LANES, TILE_CHANNELS, TILE_VECTORS, TILE_TARGET and
 * the intrinsics TILE_LOAD (unaligned), TILE_LOAD_FIRST (the first n < TILE_LANES lanes, zeros elsewhere, no
 * memory touched beyond them), TILE_STORE (unaligned), TILE_BROADCAST, TILE_FMA (a * b + c) and TILE_ZERO
 * defined.
 *
 * The forward tile, TILE_NAME:
 * out[c][j] = sum over channels ch, then taps t, of w[(ch * n_taps + t) * TILE_CHANNELS + c]
 *             * x[ch * channel_stride + taps[t] + j]
 * for the TILE_CHANNELS output channels c and the TILE_VECTORS * TILE_LANES positions j: every accumulator stays
 * in a register across the whole sum, and the terms are added in that fixed order. */
__attribute__((target(TILE_TARGET)))
static void TILE_NAME(const TILE_T *x, ptrdiff_t channel_stride, int channels, const ptrdiff_t *taps, int n_taps,
                      const TILE_T *w, TILE_T *out)
{
    TILE_VEC acc[TILE_CHANNELS][TILE_VECTORS];
    _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++)
        _Pragma("GCC unroll 8") for (int v = 0; v < TILE_VECTORS; v++) acc[c][v] = TILE_ZERO();
    for (int ch = 0; ch < channels; ch++, x += channel_stride) {
        for (int t = 0; t < n_taps; t++, w += TILE_CHANNELS) {
            const TILE_T *src = x + taps[t];
            TILE_VEC in[TILE_VECTORS];
            _Pragma("GCC unroll 8") for (int v = 0; v < TILE_VECTORS; v++) in[v] = TILE_LOAD(src + v * TILE_LANES);
            _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++) {
                TILE_VEC weight = TILE_BROADCAST(w[c]);
                _Pragma("GCC unroll 8") for (int v = 0; v < TILE_VECTORS; v++)
                    acc[c][v] = TILE_FMA(in[v], weight, acc[c][v]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++)
        _Pragma("GCC unroll 8") for (int v = 0; v < TILE_VECTORS; v++)
            TILE_STORE(out + (c * TILE_VECTORS + v) * TILE_LANES, acc[c][v]);
}

/* The weight-gradient tile, TILE_WEIGHT_NAME:
 * sums[(c * WEIGHT_TAPS + t) * TILE_LANES + l] += sum over rows r < rows and columns j < width, j = l mod
 *                                               TILE_LANES, of gy[c * gy_channel_stride + r * gy_row + j]
 *                                               * band[taps[t] + r * band_row + j]
 * for the TILE_CHANNELS output channels c and the first n_taps <= WEIGHT_TAPS taps t (a kernel's last group
 * may hold fewer; the other sums are left alone): each lane sums its own columns in row order,
 * on top of what `sums` holds (the caller adds the lanes once it has summed all of its rows). Only real output
 * columns are read (a masked load finishes a row), so an inf in the padded input never meets a zero that
 * PyTorch would not multiply it by. */
/* One vector of columns [j, j + lanes) of the weight-gradient tile (lanes < TILE_LANES: the row's last). */
__attribute__((target(TILE_TARGET), always_inline))
static inline void TILE_PASTE(TILE_WEIGHT_NAME, _step)(const int n_taps, TILE_VEC acc[TILE_CHANNELS][WEIGHT_TAPS],
                                                       const TILE_T *const *grads, const TILE_T *const *inputs, int j,
                                                       int lanes)
{
    TILE_VEC in[WEIGHT_TAPS];
    _Pragma("GCC unroll 4") for (int t = 0; t < n_taps; t++)
        in[t] = lanes == TILE_LANES ? TILE_LOAD(inputs[t] + j) : TILE_LOAD_FIRST(inputs[t] + j, lanes);
    _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++) {
        TILE_VEC grad = lanes == TILE_LANES ? TILE_LOAD(grads[c] + j) : TILE_LOAD_FIRST(grads[c] + j, lanes);
        __asm__("" : "+v"(grad));  /* one load for its n_taps products, not one folded into each */
        _Pragma("GCC unroll 4") for (int t = 0; t < n_taps; t++) acc[c][t] = TILE_FMA(grad, in[t], acc[c][t]);
    }
}

/* The tile for a constant n_taps: inlined into TILE_WEIGHT_NAME once per tap count. */
__attribute__((target(TILE_TARGET), always_inline))
static inline void TILE_PASTE(TILE_WEIGHT_NAME, _taps)(const int n_taps, const TILE_T *gy, ptrdiff_t gy_channel_stride,
                                                       ptrdiff_t gy_row, const TILE_T *band, ptrdiff_t band_row,
                                                       const ptrdiff_t *taps, int rows, int width, TILE_T *sums)
{
    TILE_VEC acc[TILE_CHANNELS][WEIGHT_TAPS];
    const TILE_T *grads[TILE_CHANNELS], *inputs[WEIGHT_TAPS];
    const int full = width - width % TILE_LANES;
    _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++) {
        grads[c] = gy + c * gy_channel_stride;
        _Pragma("GCC unroll 4") for (int t = 0; t < n_taps; t++)
            acc[c][t] = TILE_LOAD(sums + (c * WEIGHT_TAPS + t) * TILE_LANES);
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < n_taps; t++) inputs[t] = band + taps[t];
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < full; j += TILE_LANES)
            TILE_PASTE(TILE_WEIGHT_NAME, _step)(n_taps, acc, grads, inputs, j, TILE_LANES);
        if (full < width)
            TILE_PASTE(TILE_WEIGHT_NAME, _step)(n_taps, acc, grads, inputs, full, width - full);
        _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++) grads[c] += gy_row;
        _Pragma("GCC unroll 4") for (int t = 0; t < n_taps; t++) inputs[t] += band_row;
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < TILE_CHANNELS; c++)
        _Pragma("GCC unroll 4") for (int t = 0; t < n_taps; t++)
            TILE_STORE(sums + (c * WEIGHT_TAPS + t) * TILE_LANES, acc[c][t]);
}

__attribute__((target(TILE_TARGET)))
static void TILE_WEIGHT_NAME(const TILE_T *gy, ptrdiff_t gy_channel_stride, ptrdiff_t gy_row, const TILE_T *band,
                             ptrdiff_t band_row, const ptrdiff_t *taps, int n_taps, int rows, int width, TILE_T *sums)
{
    _Static_assert(WEIGHT_TAPS == 3, "a tile per tap count up to WEIGHT_TAPS");
    if (n_taps >= 3)
        TILE_PASTE(TILE_WEIGHT_NAME, _taps)(3, gy, gy_channel_stride, gy_row, band, band_row, taps, rows, width, sums);
    else if (n_taps == 2)
        TILE_PASTE(TILE_WEIGHT_NAME, _taps)(2, gy, gy_channel_stride, gy_row, band, band_row, taps, rows, width, sums);
    else
        TILE_PASTE(TILE_WEIGHT_NAME, _taps)(1, gy, gy_channel_stride, gy_row, band, band_row, taps, rows, width, sums);
}

/* The tile's shape, for direct_select: output channels and output positions. */
static const int TILE_PASTE(TILE_NAME, _channels) = TILE_CHANNELS;
static const int TILE_PASTE(TILE_NAME, _width) = TILE_VECTORS * TILE_LANES;

#undef TILE_NAME
#undef TILE_WEIGHT_NAME
#undef TILE_LOAD_FIRST
#undef TILE_T
#undef TILE_VEC
#undef TILE_LANES
#undef TILE_CHANNELS
#undef TILE_VECTORS
#undef TILE_TARGET
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_BROADCAST
#undef TILE_FMA
#undef TILE_ZERO
