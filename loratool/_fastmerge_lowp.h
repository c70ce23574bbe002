/* loratool._fastmerge: BF16/F16 outputs with a binary32 product (AVX2 only). Included by
 * _fastmerge.c (one translation unit). */
#ifndef LORATOOL_FASTMERGE_LOWP_H
#define LORATOOL_FASTMERGE_LOWP_H

#ifdef HAVE_AVX2_PATH
/* ---- BF16 and F16 outputs: the product in binary32 ---------------------------------------
 *
 * For a BF16 or F16 output the binary64 product is far more precise than needed: a binary32
 * product (8 lanes per instruction instead of 4) is certified the same way, with the binary32
 * error bound. With a = fl32(s L), b = fl32(R) (relative error u = 2^-24 each), p32 their
 * product in binary32 (any order, FMA) and e32 = fl32(w + p32) (w exact in binary32):
 *     |e32 - exact| <= (r + 2) u (1 + r 2^-23) P + u (1 + 2u) |e32| + tiny32
 * (P = sum_k |s L_ik| |R_kj|: 2 conversions and r roundings in the product, 1 in the sum;
 * tiny32 covers binary32 underflow: 4 r 2^-149 (1 + max|s L| + max|R|), from the caller).
 * numpy's binary64 sum is within (r + 2) 2^-53 (|w| + P) of the exact value. So
 *     g = (r + 4) u rb_i ca_j + 3 u |e32| + tiny32      (rb_i ca_j >= P, see the binary64 tiles)
 * bounds both, with room for the 5 roundings of the bound itself (rb32, ca32, gp32 rb32, the
 * fma's) and for numpy's share, of order 2^-53. The only output midpoint that can be within g
 * of e32 is mu, the
 * midpoint of the output interval holding |e32| (its binary32 pattern: e32's high bits, then
 * a 1 and zeros; F16 below its normal range, where the spacing is 2^-24: (floor(|e32| 2^24)
 * + 1/2) 2^-24), while g <= 2^-10 |e32| (BF16) or 2^-13 |e32| (F16; 2^-26 below 2^-14):
 * the other midpoints are at least half an output ulp minus a binary32 ulp away. So ||e32| - mu| > g (exact in
 * binary32: Sterbenz) and that bound on g certify RN(e32), a single rounding of e32 (integer
 * rounding of its bits for BF16, vcvtps2ph for F16; e32 is not a midpoint, being more than
 * g from one). The lanes that fail (about 1 in 500 to 1,000 on random data) are recomputed one by one in binary64 with the binary64 certificate
 * (repair); a lane that fails that too sends the block to the numpy kernels. */

/* Entry (i, j) of the block from the binary64 product, stored when the binary64 certificate
 * holds; 1 when it does not (a close call for numpy). */
AVX2 __attribute__((noinline)) static int repair(const block_t *b, Py_ssize_t i, Py_ssize_t j) {
    const double *L = b->L + i * b->r, *Rj = b->Rp + (j / CHUNK) * b->r * CHUNK + j % CHUNK;
    double acc = 0.0;  /* R from the packed copy: the r values lie in consecutive lines */
    for (Py_ssize_t k = 0; k < b->r; k++) acc = fma(L[k], Rj[k * CHUNK], acc);
    double x = load(b->w + i * b->ws, j, b->wc), e = x + acc;
    double g = b->gp * b->rb[i] * b->ca[j] + b->ge * fabs(e) + 0x1p-1060;
    uint64_t v = rn(b->oc, e);
    if (rn(b->oc, e - g) != rn(b->oc, e + g) || special(b->oc, e, v)) return 1;
    uint16_t h = (uint16_t)v;
    memcpy(b->out + i * b->os + 2 * j, &h, 2);
    return 0;
}


/* Rows i0 .. i0 + 4, the first nch * 16 columns: binary32 product, BF16 or F16 output. */
AVX2 static inline __attribute__((always_inline)) int rows4_lowp_t(
        const block_t *b, Py_ssize_t i0, Py_ssize_t nch, const int wc, const int oc) {
    const float *L = b->L32 + i0 * b->r, *Rp = b->Rp32, *ca = b->ca32;
    const Py_ssize_t r = b->r, ws = b->ws, os = b->os;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 gev = _mm256_set1_ps(b->ge32), tiny = _mm256_set1_ps(b->tiny32);
    /* other midpoints are at least half an ulp minus a binary32 ulp away */
    const __m256 far = _mm256_set1_ps(oc == BF16 ? 0x1p-10f : 0x1p-13f);
    const __m256 f16_min_normal = _mm256_set1_ps(0x1p-14f);
    /* |e32| from which the output is Inf or NaN: e32 itself Inf or NaN, or rounding to
     * Inf (BF16: 0x7F7F8000 is a tie whose even neighbour is Inf; F16: 65520 likewise) */
    const __m256i overflow = _mm256_set1_epi32(oc == BF16 ? 0x7F7F7FFF : 0x477FEFFF);
    /* the low bits binary32 has beyond the output's significand, and their half */
    const __m256i low = _mm256_set1_epi32(oc == BF16 ? 0xFFFF : 0x1FFF);
    const __m256i half = _mm256_set1_epi32(oc == BF16 ? 0x8000 : 0x1000);
    const __m256i round_half = _mm256_set1_epi32(0x8000);
    __m256i big = _mm256_setzero_si256();  /* the largest |e32| (as bits) of the chunk */
    float tile[64] __attribute__((aligned(32)));  /* the 4 x 16 products, row by row */
    for (Py_ssize_t c = 0; c < nch; c++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
               a6 = a0, a7 = a0;
        const float *Rk = Rp + c * r * 16;
        for (Py_ssize_t k = 0; k < r; k++, Rk += 16) {
            __m256 r0 = _mm256_loadu_ps(Rk), r1 = _mm256_loadu_ps(Rk + 8);
            __m256 l0 = _mm256_broadcast_ss(L + k), l1 = _mm256_broadcast_ss(L + r + k);
            __m256 l2 = _mm256_broadcast_ss(L + 2 * r + k);
            __m256 l3 = _mm256_broadcast_ss(L + 3 * r + k);
            a0 = _mm256_fmadd_ps(l0, r0, a0); a1 = _mm256_fmadd_ps(l0, r1, a1);
            a2 = _mm256_fmadd_ps(l1, r0, a2); a3 = _mm256_fmadd_ps(l1, r1, a3);
            a4 = _mm256_fmadd_ps(l2, r0, a4); a5 = _mm256_fmadd_ps(l2, r1, a5);
            a6 = _mm256_fmadd_ps(l3, r0, a6); a7 = _mm256_fmadd_ps(l3, r1, a7);
        }
        _mm256_store_ps(tile, a0); _mm256_store_ps(tile + 8, a1);
        _mm256_store_ps(tile + 16, a2); _mm256_store_ps(tile + 24, a3);
        _mm256_store_ps(tile + 32, a4); _mm256_store_ps(tile + 40, a5);
        _mm256_store_ps(tile + 48, a6); _mm256_store_ps(tile + 56, a7);
        const __m256 ca0 = _mm256_loadu_ps(ca + c * 16), ca1 = _mm256_loadu_ps(ca + c * 16 + 8);
        for (int t = 0; t < TILE_ROWS; t++) {
            const char *wp = b->w + (i0 + t) * ws + c * 16 * SIZES[wc];
            char *op = b->out + (i0 + t) * os + c * 16 * 2;
            const __m256 rbv = _mm256_set1_ps(b->gp32 * b->rb32[i0 + t]);
            __m256i v[2];
            __m128i f16[2];
            int near_bits = 0;
            for (int h = 0; h < 2; h++) {
                __m256 x = load8_f32(wp + 8 * h * SIZES[wc], wc);
                __m256 e = _mm256_add_ps(x, _mm256_load_ps(tile + 16 * t + 8 * h));
                __m256 ea = _mm256_and_ps(e, absmask);
                __m256 g = _mm256_fmadd_ps(gev, ea, _mm256_fmadd_ps(rbv, h ? ca1 : ca0, tiny));
                __m256i eb = _mm256_castps_si256(ea);
                big = _mm256_max_epi32(big, eb);
                /* the midpoint of the output's interval holding |e|, in binary32 */
                __m256 mu = _mm256_castsi256_ps(_mm256_or_si256(_mm256_andnot_si256(low, eb),
                                                                half));
                __m256 farv = _mm256_mul_ps(ea, far);
                const __m256 tiny_e = oc == F16 ? _mm256_cmp_ps(ea, f16_min_normal, _CMP_LT_OQ)
                                                : _mm256_setzero_ps();
                if (oc == F16 && !_mm256_testz_ps(tiny_e, tiny_e)) {
                    /* below F16's normal range (a few lanes in a thousand) the spacing is
                     * 2^-24 */
                    __m256 sub = _mm256_mul_ps(_mm256_add_ps(_mm256_floor_ps(
                        _mm256_mul_ps(ea, _mm256_set1_ps(0x1p24f))), _mm256_set1_ps(0.5f)),
                        _mm256_set1_ps(0x1p-24f));
                    mu = _mm256_blendv_ps(mu, sub, tiny_e);
                    /* there the other midpoints are 2^-24 away: g < 2^-26 keeps mu alone;
                     * and g < |e32|, since the sign of a result rounded to zero is e's */
                    farv = _mm256_blendv_ps(farv, _mm256_min_ps(_mm256_set1_ps(0x1p-26f), ea),
                                            tiny_e);
                }
                /* near: |e32| - mu within g, or g too large for mu to be the only
                 * candidate (g >= farv); one compare: min(|e32| - mu|, farv) <= g */
                __m256 dist = _mm256_and_ps(_mm256_sub_ps(ea, mu), absmask);
                __m256 near = _mm256_cmp_ps(_mm256_min_ps(dist, farv), g, _CMP_LE_OQ);
                near_bits |= _mm256_movemask_ps(near) << (8 * h);
                /* a lane that passes is not a midpoint (it is more than g > 0 from mu), so
                 * rounding needs no tie rule: BF16 adds half the dropped bits' range to the
                 * pattern (sign untouched: |e32| < 2^31 - 2^15 here, larger is refused) */
                if (oc == BF16)
                    v[h] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(e),
                                                              round_half), 16);
                else
                    f16[h] = _mm256_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            }
            /* 16 values in order (packus interleaves the 128-bit halves) */
            __m256i packed = oc == BF16
                ? _mm256_permute4x64_epi64(_mm256_packus_epi32(v[0], v[1]), 0xD8)
                : _mm256_set_m128i(f16[1], f16[0]);
            _mm256_storeu_si256((__m256i *)op, packed);
            while (near_bits) {
                int lane = __builtin_ctz(near_bits);
                near_bits &= near_bits - 1;
                if (repair(b, i0 + t, c * 16 + lane)) return 2;
            }
        }
        if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(big, overflow))))
            return 1;
    }
    return 0;
}

#define LOWP(WC) (b->oc == BF16 ? rows4_lowp_t(b, i0, nch, WC, BF16) \
                                : rows4_lowp_t(b, i0, nch, WC, F16))
AVX2 static int rows4_lowp(const block_t *b, Py_ssize_t i0, Py_ssize_t nch) {
    return b->wc == F32 ? LOWP(F32) : b->wc == BF16 ? LOWP(BF16) : LOWP(F16);
}
#endif

#endif /* LORATOOL_FASTMERGE_LOWP_H */
