/* loratool._fastmerge: lowrank_round's certificate, the generic code and the binary64 register
 * tiles. Included by _fastmerge.c (one translation unit). */
#ifndef LORATOOL_FASTMERGE_TILES_H
#define LORATOOL_FASTMERGE_TILES_H

/* ---- lowrank_round: the rank-r product computed here too, with a certificate ----------
 *
 * out = RN_out(w + L @ R) for a block of m rows (L: [m, r] float64, s folded in; R: [r, n]).
 * The product is evaluated in binary64 in this kernel's own order (FMA where the CPU has it),
 * which can differ in the last binary64 bits from numpy's BLAS. Each product is within
 * gamma_r P of the exact one (P = sum_k |L_ik| |R_kj|, gamma_r = r u / (1 - r u), u = 2^-53;
 * any summation order, with or without FMA) and each sum e = RN(w + p) adds at most u |e|,
 * so the two sums are within about 2 r u P + 2 u |e| of each other. The error of the product
 * scales with P, not with |w|: only the one rounding of the sum scales with |e|, which is why
 * the bound is not taken on |w| + P (in a merge P is usually below |w|; a bound on |w| + P
 * sent 1.5 to 3 times more binary32 entries to repair, benchmarks/certificate_rate.py).
 * This kernel bounds P by rb_i ca_j, factors from the caller (rb_i = sum_k |L_ik| and
 * ca_j = max_k |R_kj|, or the 2-norms of row i of L and column j of R: Cauchy-Schwarz;
 * loratool/ops/merge/operands.py picks the tighter pair per tensor) and takes
 *     g = (2r + 6) u rb_i ca_j + 3 u |e| + 2^-1060
 * (room for the rounding of the bound itself, of rb, and underflow), and checks
 * RN(e - g) == RN(e + g): rounding is monotone, so then every value in [e - g, e + g], BLAS's
 * sum included, rounds to the same stored value, and the result is bit for bit the numpy
 * kernel's. A block with any entry that fails the check (a close
 * call: status 2) or is NaN/Inf/overflows (status 1) is left to the numpy kernels; when
 * `tmp` is given each block goes there first and is copied to `out` only when it passed (in
 * place: `out` is `w`, which a fall back still needs). */

#define TILE_ROWS 4
#define CHUNK 8    /* columns per register tile; R is packed as [n / 8][r][8] */
#define STRIPE 512

/* p[t * ldp + j] = sum_k L[t, k] R[k, j0 + j] for t < mt, j < nj (R unpacked), plain C. */
static void dot_plain(const double *L, Py_ssize_t r, const double *R, Py_ssize_t n,
                      Py_ssize_t j0, Py_ssize_t nj, int mt, double *p, Py_ssize_t ldp) {
    for (int t = 0; t < mt; t++) {
        double *pt = p + t * ldp;
        for (Py_ssize_t j = 0; j < nj; j++) pt[j] = 0.0;
        for (Py_ssize_t k = 0; k < r; k++) {
            const double l = L[t * r + k], *Rk = R + k * n + j0;
            for (Py_ssize_t j = 0; j < nj; j++) pt[j] += l * Rk[j];
        }
    }
}

/* One row: store RN(w + p) and check the certificate; returns flags (1: NaN/Inf/overflow,
 * 2: close call). The generic epilogue: any dtypes, auto-vectorized. */
#define EPI(WC, OC)                                                                         \
    CLONES static int epi_##WC##_##OC(const char *w, const double *p, const double *ca,    \
                                      double rbg, double ge, char *out, Py_ssize_t n) {     \
        uint64_t bad = 0, close = 0;                                                        \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            double x = load(w, i, WC), e = x + p[i];                                        \
            double g = rbg * ca[i] + ge * fabs(e) + 0x1p-1060;                              \
            bad |= store(out, i, OC, e);                                                    \
            close |= rn(OC, e - g) ^ rn(OC, e + g);                                         \
        }                                                                                   \
        return (bad != 0) | ((close != 0) << 1);                                            \
    }
#define EPIS(WC) EPI(WC, F32) EPI(WC, F16) EPI(WC, BF16)
EPIS(F64) EPIS(F32) EPIS(F16) EPIS(BF16)

typedef int (*epi_fn)(const char *, const double *, const double *, double, double, char *,
                      Py_ssize_t);
/* [w code][out code]; F64 outputs are not certified here (every bit counts): NULL */
#define EROW(WC) {NULL, epi_##WC##_F32, epi_##WC##_F16, epi_##WC##_BF16}
static const epi_fn EPI_TABLE[4][4] = {EROW(F64), EROW(F32), EROW(F16), EROW(BF16)};

/* Everything a block needs, passed down as one struct. */
typedef struct {
    const char *w; int wc; Py_ssize_t ws;      /* base rows (stride in bytes) */
    const double *L, *R, *Rp, *rb, *ca;       /* L [m, r], R [r, n], Rp packed, bounds */
    char *out; int oc; Py_ssize_t os;          /* output rows (stride in bytes) */
    Py_ssize_t m, r, n; double gp, ge;         /* g = gp rb_i ca_j + ge |e| + tiny */
    /* BF16 outputs of F32/BF16 bases: the product in binary32 (NULL: not used) */
    const float *L32, *Rp32, *ca32; const float *rb32; float gp32, ge32, tiny32;
} block_t;

/* The generic epilogue on rows i0 .. i0 + mt, columns s .. s + ns, whose products are in the
 * tile p (rows STRIPE apart). */
static int epi_rows(const block_t *b, Py_ssize_t i0, int mt, Py_ssize_t s, Py_ssize_t ns,
                    const double *p) {
    const epi_fn epi = EPI_TABLE[b->wc][b->oc];
    for (int t = 0; t < mt; t++) {
        Py_ssize_t i = i0 + t;
        int flags = epi(b->w + i * b->ws + s * SIZES[b->wc], p + t * STRIPE, b->ca + s,
                        b->rb[i] * b->gp, b->ge, b->out + i * b->os + s * SIZES[b->oc], ns);
        if (flags) return flags;
    }
    return 0;
}

/* Rows i0 .. i0 + mt, columns j0 .. j0 + nj (unpacked R) by the generic code. */
static int rows_generic(const block_t *b, Py_ssize_t i0, int mt, Py_ssize_t j0,
                        Py_ssize_t nj, double *p) {
    for (Py_ssize_t s = j0; s < j0 + nj; s += STRIPE) {
        Py_ssize_t ns = j0 + nj - s < STRIPE ? j0 + nj - s : STRIPE;
        dot_plain(b->L + i0 * b->r, b->r, b->R, b->n, s, ns, mt, p, STRIPE);
        int flags = epi_rows(b, i0, mt, s, ns, p);
        if (flags) return flags;
    }
    return 0;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* 8 base values as binary32 (exact). */
AVX2 static inline __attribute__((always_inline)) __m256 load8_f32(const char *wp, int wc) {
    if (wc == F32) return _mm256_loadu_ps((const float *)wp);
    __m128i h = _mm_loadu_si128((const __m128i *)wp);
    if (wc == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The rank-r products of 4 rows (of L, r apart) x 8 columns (Rk: their chunk of the packed R)
 * in 8 accumulators kept in registers; acc[2t] and acc[2t + 1] are row t's columns 0-3, 4-7. */
AVX2 static inline __attribute__((always_inline)) void product_4x8(
        const double *L, Py_ssize_t r, const double *Rk, __m256d acc[8]) {
    __m256d a00 = _mm256_setzero_pd(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
            a30 = a00, a31 = a00;
    for (Py_ssize_t k = 0; k < r; k++, Rk += CHUNK) {
        __m256d r0 = _mm256_loadu_pd(Rk), r1 = _mm256_loadu_pd(Rk + 4), l;
        l = _mm256_broadcast_sd(L + k);
        a00 = _mm256_fmadd_pd(l, r0, a00); a01 = _mm256_fmadd_pd(l, r1, a01);
        l = _mm256_broadcast_sd(L + r + k);
        a10 = _mm256_fmadd_pd(l, r0, a10); a11 = _mm256_fmadd_pd(l, r1, a11);
        l = _mm256_broadcast_sd(L + 2 * r + k);
        a20 = _mm256_fmadd_pd(l, r0, a20); a21 = _mm256_fmadd_pd(l, r1, a21);
        l = _mm256_broadcast_sd(L + 3 * r + k);
        a30 = _mm256_fmadd_pd(l, r0, a30); a31 = _mm256_fmadd_pd(l, r1, a31);
    }
    acc[0] = a00; acc[1] = a01; acc[2] = a10; acc[3] = a11;
    acc[4] = a20; acc[5] = a21; acc[6] = a30; acc[7] = a31;
}

/* binary32 bit patterns (8 lanes) rounded to BF16 by integer rounding, to nearest even: the
 * BF16 bits in the low 16 bits of each lane (the caller handles NaN/Inf, and patterns on a
 * BF16 midpoint that stand for a value off it). */
AVX2 static inline __attribute__((always_inline)) __m256i bf16_round(__m256i bits) {
    const __m256i mid = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(
        mid, _mm256_and_si256(_mm256_srli_epi32(bits, 16), one))), 16);
}

/* Rows i0 .. i0 + 4, the first nch * 8 columns, for any dtypes: products into p, then the
 * generic epilogue (F16 or F64 sides). */
AVX2 static int rows4_packed(const block_t *b, Py_ssize_t i0, Py_ssize_t nch, double *p) {
    const double *L = b->L + i0 * b->r;
    for (Py_ssize_t c0 = 0; c0 < nch; c0 += STRIPE / CHUNK) {
        Py_ssize_t c1 = nch - c0 < STRIPE / CHUNK ? nch : c0 + STRIPE / CHUNK;
        for (Py_ssize_t c = c0; c < c1; c++) {
            __m256d acc[8];
            product_4x8(L, b->r, b->Rp + c * b->r * CHUNK, acc);
            for (int t = 0; t < TILE_ROWS; t++) {
                _mm256_storeu_pd(p + t * STRIPE + (c - c0) * CHUNK, acc[2 * t]);
                _mm256_storeu_pd(p + t * STRIPE + (c - c0) * CHUNK + 4, acc[2 * t + 1]);
            }
        }
        int flags = epi_rows(b, i0, TILE_ROWS, c0 * CHUNK, (c1 - c0) * CHUNK, p);
        if (flags) return flags;
    }
    return 0;
}

/* The common case fused in registers: F32/BF16/F16 base, F32/BF16 output, 4 rows x 8 columns
 * (BF16 outputs take it only where the binary32 product below is not used).
 * F32 output: the certificate compares RN(e - g) and RN(e + g) bit for bit. BF16 output: e is
 * rounded to binary32 first (f); while g <= |e| 2^-25 (under half a binary32 ulp), a BF16
 * rounding boundary (a midpoint: binary32 pattern ending in 0x8000) within g of e is within
 * one binary32 ulp of f, so it is the midpoint mu with f's high 16 bits; |e - mu| > g
 * certifies the result. No midpoint lies strictly between e and f (f is the nearest binary32
 * value), so rounding f to BF16 (integer rounding of its bits) is the single rounding of e,
 * except when f is itself a midpoint: then e's side of it decides. */
/* The BF16 lanes whose binary32 rounding f is within one binary32 ulp of the midpoint mu
 * with f's high 16 bits (rare): a close call when |e - mu| <= g (returns 1); when f is mu
 * itself but e is not, rounding f to even was wrong and e's side of mu decides (the stored
 * value is mended). */
AVX2 __attribute__((noinline, cold)) static int bf16_candidates(
        __m256d e0, __m256d e1, __m256d g0, __m256d g1, __m256i fb, char *op) {
    double e[8], g[8];
    uint32_t f[8];
    _mm256_storeu_pd(e, e0); _mm256_storeu_pd(e + 4, e1);
    _mm256_storeu_pd(g, g0); _mm256_storeu_pd(g + 4, g1);
    _mm256_storeu_si256((__m256i *)f, fb);
    int close = 0;
    for (int t = 0; t < 8; t++) {
        uint32_t low = f[t] & 0xFFFF;
        if (low < 0x7FFF || low > 0x8001) continue;
        uint32_t mub = (f[t] & 0xFFFF0000u) | 0x8000u;
        float muf; memcpy(&muf, &mub, 4);
        double mu = muf;
        if (fabs(e[t] - mu) <= g[t]) close = 1;
        else if (f[t] == mub) {
            uint16_t h = (uint16_t)((f[t] >> 16) + (fabs(e[t]) > fabs(mu)));
            memcpy(op + 2 * t, &h, 2);
            if ((h & 0x7F80) == 0x7F80) close = 1;  /* rounded up to Inf: the numpy kernels */
        }
    }
    return close;
}

/* One row of a register tile: 8 values of w (at wp) plus the products a0, a1, rounded into
 * op; the certificate's failures and NaN/Inf/overflow OR-ed into *close and *bad. */
AVX2 static inline __attribute__((always_inline)) void fused_row(
        const char *wp, char *op, int wc, int oc, __m256d a0, __m256d a1, __m256d rbv,
        __m256d ca0, __m256d ca1, double ge, __m256i *bad, __m256i *close) {
    const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
    const __m256d tiny = _mm256_set1_pd(0x1p-1060), gev = _mm256_set1_pd(ge);
    const __m256d quarter_ulp = _mm256_set1_pd(0x1p-25);
    const __m256i expo = _mm256_set1_epi32(0x7F800000), lo16 = _mm256_set1_epi32(0xFFFF);
    const __m256i mid = _mm256_set1_epi32(0x7FFF), two = _mm256_set1_epi32(2);
    const __m256i bexpo = _mm256_set1_epi32(0x7F80);
    __m256 wf = load8_f32(wp, wc);
    __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(wf));
    __m256d x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(wf, 1));
    __m256d e0 = _mm256_add_pd(x0, a0), e1 = _mm256_add_pd(x1, a1);
    /* rbv: gp rb_i */
    __m256d g0 = _mm256_fmadd_pd(gev, _mm256_and_pd(e0, absmask),
                                 _mm256_fmadd_pd(rbv, ca0, tiny));
    __m256d g1 = _mm256_fmadd_pd(gev, _mm256_and_pd(e1, absmask),
                                 _mm256_fmadd_pd(rbv, ca1, tiny));
    __m256 f = _mm256_set_m128(_mm256_cvtpd_ps(e1), _mm256_cvtpd_ps(e0));
    __m256i fb = _mm256_castps_si256(f);
    *bad = _mm256_or_si256(*bad, _mm256_cmpeq_epi32(_mm256_and_si256(fb, expo), expo));
    if (oc == F32) {
        __m256 lo = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(e1, g1)),
                                    _mm256_cvtpd_ps(_mm256_sub_pd(e0, g0)));
        __m256 hi = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_add_pd(e1, g1)),
                                    _mm256_cvtpd_ps(_mm256_add_pd(e0, g0)));
        *close = _mm256_or_si256(*close, _mm256_xor_si256(_mm256_castps_si256(lo),
                                                        _mm256_castps_si256(hi)));
        _mm256_storeu_ps((float *)op, f);
    } else {
        /* candidates: f within one binary32 ulp of a BF16 midpoint (low 16 bits 0x7FFF to
         * 0x8001), about 1 value in 20,000: checked one by one below, after the store */
        __m256i d = _mm256_sub_epi32(_mm256_and_si256(fb, lo16), mid);
        __m256i cand = _mm256_cmpeq_epi32(_mm256_min_epu32(d, two), d);
        __m256d big0 = _mm256_cmp_pd(g0, _mm256_mul_pd(_mm256_and_pd(e0, absmask),
                                                       quarter_ulp), _CMP_GT_OQ);
        __m256d big1 = _mm256_cmp_pd(g1, _mm256_mul_pd(_mm256_and_pd(e1, absmask),
                                                       quarter_ulp), _CMP_GT_OQ);
        *close = _mm256_or_si256(*close, _mm256_castpd_si256(_mm256_or_pd(big0, big1)));
        __m256i rnd = bf16_round(fb);
        *bad = _mm256_or_si256(*bad, _mm256_cmpeq_epi32(_mm256_and_si256(rnd, bexpo),
                                                      bexpo));
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(rnd),
                                     _mm256_extracti128_si256(rnd, 1));
        _mm_storeu_si128((__m128i *)op, h);
        if (!_mm256_testz_si256(cand, cand) && bf16_candidates(e0, e1, g0, g1, fb, op))
            *close = _mm256_or_si256(*close, _mm256_set1_epi32(-1));
    }
}

AVX2 static inline __attribute__((always_inline)) int rows4_fused_t(
        const block_t *b, Py_ssize_t i0, Py_ssize_t c0, Py_ssize_t nch, const int wc,
        const int oc) {
    const double *L = b->L + i0 * b->r, *Rp = b->Rp, *ca = b->ca;
    const Py_ssize_t r = b->r, ws = b->ws, os = b->os;
    const char *w = b->w + i0 * ws;
    char *out = b->out + i0 * os;
    const double ge = b->ge;
    const int wsz = SIZES[wc], osz = SIZES[oc];
    __m256i bad = _mm256_setzero_si256(), close = bad;
    const double gp = b->gp, *rb = b->rb + i0;
    const __m256d rb0 = _mm256_set1_pd(gp * rb[0]), rb1 = _mm256_set1_pd(gp * rb[1]);
    const __m256d rb2 = _mm256_set1_pd(gp * rb[2]), rb3 = _mm256_set1_pd(gp * rb[3]);
    for (Py_ssize_t c = c0; c < nch; c++) {
        __m256d a[8];
        product_4x8(L, r, Rp + c * r * CHUNK, a);
        const __m256d ca0 = _mm256_loadu_pd(ca + c * CHUNK);
        const __m256d ca1 = _mm256_loadu_pd(ca + c * CHUNK + 4);
        const Py_ssize_t wo = c * CHUNK * wsz, oo = c * CHUNK * osz;
        fused_row(w + wo, out + oo, wc, oc, a[0], a[1], rb0, ca0, ca1, ge, &bad, &close);
        fused_row(w + ws + wo, out + os + oo, wc, oc, a[2], a[3], rb1, ca0, ca1, ge, &bad, &close);
        fused_row(w + 2 * ws + wo, out + 2 * os + oo, wc, oc, a[4], a[5], rb2, ca0, ca1, ge,
                  &bad, &close);
        fused_row(w + 3 * ws + wo, out + 3 * os + oo, wc, oc, a[6], a[7], rb3, ca0, ca1, ge,
                  &bad, &close);
        if (!_mm256_testz_si256(bad, bad)) return 1;
        if (!_mm256_testz_si256(close, close)) return 2;
    }
    return 0;
}

/* One compiled copy per dtype pair, so that the dtype tests leave the loop. */
#define FUSED(WC) (b->oc == F32 ? rows4_fused_t(b, i0, c0, nch, WC, F32) \
                                 : rows4_fused_t(b, i0, c0, nch, WC, BF16))
AVX2 static int rows4_fused(const block_t *b, Py_ssize_t i0, Py_ssize_t c0, Py_ssize_t nch) {
    return b->wc == F32 ? FUSED(F32) : b->wc == BF16 ? FUSED(BF16) : FUSED(F16);
}
#endif /* the AVX2 path */

#endif /* LORATOOL_FASTMERGE_TILES_H */
