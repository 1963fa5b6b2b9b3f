/* One register tile of the direct convolution, included by direct_conv.h once per (type, ISA) with TILE_NAME,
 * TILE_T (float or double), TILE_VEC, TILE_LANES, TILE_CHANNELS, TILE_VECTORS, TILE_TARGET and the intrinsics
 * TILE_LOAD (unaligned), TILE_STORE (unaligned), TILE_BROADCAST, TILE_FMA (a * b + c) and TILE_ZERO defined.
 *
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

#undef TILE_NAME
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
