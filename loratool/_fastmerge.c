/* loratool._fastmerge: the exact merge engine's compiled kernels.
 *
 * lowrank_round(...): out = RN_out(w + L @ R) for the usual merge (one low-rank update), the
 *   rank-r product computed here as well, each entry certified to round to the value the
 *   numpy kernel (BLAS's product) gives; see the section "lowrank_round" below.
 *
 * add_round(w, w_code, d, out, out_code) -> bool: out[i] = RN_out(w[i] + d[i]), one rounding
 *   from binary64, d the float64 product computed by numpy's BLAS (used for F64 outputs).
 *
 * Codes: 0 F64, 1 F32, 2 F16, 3 BF16 (as bits). Rounding is to nearest even, directly from
 * binary64 to the output dtype (BF16/F16: no double rounding). Both report NaN/Inf results
 * and overflows instead of producing them: the caller runs the numpy kernel on that block,
 * whose handling of non-finite values is the reference, so there is no NaN payload or
 * overflow policy to agree on.
 *
 * Build flags: no -ffast-math (it would flush subnormals to zero), -ffp-contract=off (FMAs
 * only where written). The loops run without the GIL (the engine's worker threads call them
 * concurrently).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F64 = 0, F32 = 1, F16 = 2, BF16 = 3 };
static const Py_ssize_t SIZES[4] = {8, 4, 2, 2};

static inline double from_bits64(uint64_t b) { double x; memcpy(&x, &b, 8); return x; }
static inline uint64_t bits64(double x) { uint64_t b; memcpy(&b, &x, 8); return b; }

static inline double load(const char *w, Py_ssize_t i, int code) {
    switch (code) {
    case F64: { double v; memcpy(&v, w + 8 * i, 8); return v; }
    case F32: { float v; memcpy(&v, w + 4 * i, 4); return (double)v; }
    case BF16: {
        uint16_t h; memcpy(&h, w + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16; float v; memcpy(&v, &u, 4); return (double)v;
    }
    default: { /* F16, without branches: normal, subnormal/zero, Inf/NaN (then refused) */
        uint16_t h; memcpy(&h, w + 2 * i, 2);
        uint64_t sign = (uint64_t)(h >> 15) << 63, m = h & 0x3FF;
        uint64_t e = (h >> 10) & 0x1F;
        uint64_t normal = ((e + 1023 - 15) << 52) | (m << 42);
        uint64_t tiny = bits64((double)(int)m * 0x1p-24);  /* m * 2^-24: exact */
        uint64_t special = (0x7FFULL << 52) | (m << 42);
        uint64_t v = e == 0 ? tiny : (e == 0x1F ? special : normal);
        return from_bits64(v | sign);
    }
    }
}

/* Rounding binary64 to a narrower binary format (p significant bits, minimum normal
 * exponent emin), to nearest even, without branches so that the loops vectorize:
 *  - normal results: integer rounding of the binary64 bit pattern at the last kept mantissa
 *    bit (a carry into the exponent is the correct rounding up to the next binade);
 *  - subnormal results (|x| < 2^emin): (|x| + c) - c with c = 1.5 * 2^(52 + emin - p + 1),
 *    whose ulp is the subnormal quantum: exact round to nearest even by the FPU.
 * Returns the bit pattern of |RN(x)| as binary64 (the sign is put back by the caller). */
static inline uint64_t round_bits(uint64_t a, int p, double tiny, double c) {
    const int sh = 53 - p;
    uint64_t rn = (a + ((1ULL << (sh - 1)) - 1) + ((a >> sh) & 1)) & ~((1ULL << sh) - 1);
    uint64_t sub = bits64((from_bits64(a) + c) - c);
    uint64_t m = -(uint64_t)((int64_t)a < (int64_t)bits64(tiny));  /* a >= 0: signed ok */
    return (sub & m) | (rn & ~m);
}

/* x rounded once to the output dtype, as its bit pattern (zero-extended): ±Inf when the
 * rounded value overflows. Integer masks only: the loops stay free of branches. For finite x
 * this is monotone in x, so two values with the same result bound an interval that rounds
 * to that one value. */
static inline uint64_t rn(int code, double x) {
    uint64_t b = bits64(x), sign = b & 0x8000000000000000ULL, a = b ^ sign;
    switch (code) {
    case F64:
        return b;
    case F32: {
        float f = (float)x;
        uint32_t u; memcpy(&u, &f, 4);
        return u;
    }
    case BF16: {
        uint64_t r = round_bits(a, 8, 0x1p-126, 0x1.8p-81) | sign;
        float f = (float)from_bits64(r);  /* exact: a bf16 value (or Inf: overflow) */
        uint32_t u; memcpy(&u, &f, 4);
        return u >> 16;
    }
    default: { /* F16 */
        uint64_t r = round_bits(a, 11, 0x1p-14, 0x1.8p28);
        int64_t e = (int64_t)(r >> 52) - 1023 + 15;  /* the F16 exponent of a normal value */
        uint64_t normal = (uint64_t)(e << 10) | ((r >> 42) & 0x3FF);
        uint64_t tiny = (uint32_t)(int32_t)(from_bits64(r) * 0x1p24);  /* subnormal: exact */
        uint64_t m = -(uint64_t)((int64_t)r < (int64_t)bits64(0x1p-14));
        uint64_t big = -(uint64_t)(e >= 31);
        uint64_t h = ((tiny & m) | (normal & ~m)) & 0x7FFF;
        return ((h & ~big) | (0x7C00 & big)) | (sign >> 48);
    }
    }
}

/* Nonzero when x is not finite or its rounded pattern v is Inf/NaN (an overflow). */
static inline uint64_t special(int code, double x, uint64_t v) {
    uint64_t a = bits64(x) & 0x7FFFFFFFFFFFFFFFULL;
    uint64_t bad = (uint64_t)(a >= 0x7FF0000000000000ULL);
    switch (code) {
    case F64: return bad;
    case F32: return bad | ((v & 0x7F800000u) == 0x7F800000u);
    case BF16: return bad | ((v & 0x7F80u) == 0x7F80u);
    default: return bad | ((v & 0x7C00u) == 0x7C00u);
    }
}

/* Rounds x into out[i]; returns nonzero when x is not finite or overflows. */
static inline uint64_t store(char *out, Py_ssize_t i, int code, double x) {
    uint64_t v = rn(code, x);
    switch (code) {
    case F64: memcpy(out + 8 * i, &x, 8); break;
    case F32: { uint32_t u = (uint32_t)v; memcpy(out + 4 * i, &u, 4); break; }
    default: { uint16_t h = (uint16_t)v; memcpy(out + 2 * i, &h, 2); break; }
    }
    return special(code, x, v);
}

/* GCC on x86-64: an AVX2 clone of each loop beside the baseline one, picked at load time
 * (the same IEEE operations either way; no FMA, which would change nothing here anyway). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define LOOP(WC, OC)                                                                        \
    CLONES static int loop_##WC##_##OC(const char *w, const double *d, char *out, Py_ssize_t n) { \
        uint64_t bad = 0;                                                                   \
        for (Py_ssize_t i = 0; i < n; i++)                                                  \
            bad |= store(out, i, OC, load(w, i, WC) + d[i]);                                \
        return bad == 0;                                                                    \
    }
#define LOOPS(WC) LOOP(WC, F64) LOOP(WC, F32) LOOP(WC, F16) LOOP(WC, BF16)
LOOPS(F64) LOOPS(F32) LOOPS(F16) LOOPS(BF16)

typedef int (*loop_fn)(const char *, const double *, char *, Py_ssize_t);
#define ROW(WC) {loop_##WC##_F64, loop_##WC##_F32, loop_##WC##_F16, loop_##WC##_BF16}
static const loop_fn LOOPS_TABLE[4][4] = {ROW(F64), ROW(F32), ROW(F16), ROW(BF16)};

static int add_round_loop(const char *w, int wc, const double *d, char *out, int oc,
                          Py_ssize_t n) {
    return LOOPS_TABLE[wc][oc](w, d, out, n);
}

/* ---- lowrank_round: the rank-r product computed here too, with a certificate ----------
 *
 * out = RN_out(w + L @ R) for a block of m rows (L: [m, r] float64, s folded in; R: [r, n]).
 * The product is evaluated in binary64 in this kernel's own order (FMA where the CPU has it),
 * which can differ in the last binary64 bits from numpy's BLAS. Both evaluations are within
 *     gamma = (r + 2) u M,  M = |w| + sum_k |L_ik| |R_kj|,  u = 2^-53
 * of the exact value (any summation order, with or without FMA), so they are within 2 gamma
 * of each other. This kernel uses the upper bound M' = |w| + rb_i ca_j (rb_i = sum_k |L_ik|,
 * ca_j = max_k |R_kj|) and g = (2r + 10) u M' + 2^-1060 (rounding of the bound itself and
 * underflow included), and checks RN(e - g) == RN(e + g): rounding is monotone, so then every
 * value in [e - g, e + g], BLAS's sum included, rounds to the same stored value, and the result
 * is bit for bit the numpy kernel's. A block with any entry that fails the check (a close
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
                                      double rb, double gc, char *out, Py_ssize_t n) {      \
        uint64_t bad = 0, close = 0;                                                        \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            double x = load(w, i, WC), e = x + p[i];                                        \
            double g = gc * (fabs(x) + rb * ca[i]) + 0x1p-1060;                             \
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
    Py_ssize_t m, r, n; double gc;
    /* BF16 outputs of F32/BF16 bases: the product in binary32 (NULL: not used) */
    const float *L32, *Rp32, *ca32; const float *rb32; float gc32, tiny32;
} block_t;

/* The generic epilogue on rows i0 .. i0 + mt, columns s .. s + ns, whose products are in the
 * tile p (rows STRIPE apart). */
static int epi_rows(const block_t *b, Py_ssize_t i0, int mt, Py_ssize_t s, Py_ssize_t ns,
                    const double *p) {
    const epi_fn epi = EPI_TABLE[b->wc][b->oc];
    for (int t = 0; t < mt; t++) {
        Py_ssize_t i = i0 + t;
        int flags = epi(b->w + i * b->ws + s * SIZES[b->wc], p + t * STRIPE, b->ca + s,
                        b->rb[i], b->gc, b->out + i * b->os + s * SIZES[b->oc], ns);
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

/* The rank-r products of 4 rows x 8 columns (chunk c of the packed R) in 8 accumulators. */
#define TILE_PRODUCT(L, r, Rp, c, acc)                                                      \
    do {                                                                                    \
        for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_pd();                           \
        const double *Rk = Rp + (c) * (r) * CHUNK;                                         \
        for (Py_ssize_t k = 0; k < (r); k++, Rk += CHUNK) {                                 \
            __m256d r0 = _mm256_loadu_pd(Rk), r1 = _mm256_loadu_pd(Rk + 4);                \
            for (int t = 0; t < TILE_ROWS; t++) {                                           \
                __m256d l = _mm256_broadcast_sd(L + t * (r) + k);                           \
                acc[2 * t] = _mm256_fmadd_pd(l, r0, acc[2 * t]);                            \
                acc[2 * t + 1] = _mm256_fmadd_pd(l, r1, acc[2 * t + 1]);                    \
            }                                                                               \
        }                                                                                   \
    } while (0)

/* Rows i0 .. i0 + 4, the first nch * 8 columns, for any dtypes: products into p, then the
 * generic epilogue (F16 or F64 sides). */
AVX2 static int rows4_packed(const block_t *b, Py_ssize_t i0, Py_ssize_t nch, double *p) {
    const double *L = b->L + i0 * b->r;
    for (Py_ssize_t c0 = 0; c0 < nch; c0 += STRIPE / CHUNK) {
        Py_ssize_t c1 = nch - c0 < STRIPE / CHUNK ? nch : c0 + STRIPE / CHUNK;
        for (Py_ssize_t c = c0; c < c1; c++) {
            __m256d acc[8];
            TILE_PRODUCT(L, b->r, b->Rp, c, acc);
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
        __m256d ca0, __m256d ca1, double gc, __m256i *bad, __m256i *close) {
    const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
    const __m256d tiny = _mm256_set1_pd(0x1p-1060), gcv = _mm256_set1_pd(gc);
    const __m256d quarter_ulp = _mm256_set1_pd(0x1p-25);
    const __m256i expo = _mm256_set1_epi32(0x7F800000), lo16 = _mm256_set1_epi32(0xFFFF);
    const __m256i mid = _mm256_set1_epi32(0x7FFF), two = _mm256_set1_epi32(2);
    const __m256i one = _mm256_set1_epi32(1), bexpo = _mm256_set1_epi32(0x7F80);
    __m256 wf = load8_f32(wp, wc);
    __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(wf));
    __m256d x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(wf, 1));
    __m256d e0 = _mm256_add_pd(x0, a0), e1 = _mm256_add_pd(x1, a1);
    __m256d g0 = _mm256_fmadd_pd(gcv, _mm256_fmadd_pd(rbv, ca0,
                                                      _mm256_and_pd(x0, absmask)), tiny);
    __m256d g1 = _mm256_fmadd_pd(gcv, _mm256_fmadd_pd(rbv, ca1,
                                                      _mm256_and_pd(x1, absmask)), tiny);
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
        __m256i rnd = _mm256_add_epi32(fb, _mm256_add_epi32(
            mid, _mm256_and_si256(_mm256_srli_epi32(fb, 16), one)));
        rnd = _mm256_srli_epi32(rnd, 16);
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
    const double gc = b->gc;
    const int wsz = SIZES[wc], osz = SIZES[oc];
    __m256i bad = _mm256_setzero_si256(), close = bad;
    const __m256d rb0 = _mm256_set1_pd(b->rb[i0]), rb1 = _mm256_set1_pd(b->rb[i0 + 1]);
    const __m256d rb2 = _mm256_set1_pd(b->rb[i0 + 2]), rb3 = _mm256_set1_pd(b->rb[i0 + 3]);
    for (Py_ssize_t c = c0; c < nch; c++) {
        __m256d a00 = _mm256_setzero_pd(), a01 = a00, a10 = a00, a11 = a00, a20 = a00,
                a21 = a00, a30 = a00, a31 = a00;
        const double *Rk = Rp + c * r * CHUNK;
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
        const __m256d ca0 = _mm256_loadu_pd(ca + c * CHUNK);
        const __m256d ca1 = _mm256_loadu_pd(ca + c * CHUNK + 4);
        const Py_ssize_t wo = c * CHUNK * wsz, oo = c * CHUNK * osz;
        fused_row(w + wo, out + oo, wc, oc, a00, a01, rb0, ca0, ca1, gc, &bad, &close);
        fused_row(w + ws + wo, out + os + oo, wc, oc, a10, a11, rb1, ca0, ca1, gc, &bad, &close);
        fused_row(w + 2 * ws + wo, out + 2 * os + oo, wc, oc, a20, a21, rb2, ca0, ca1, gc,
                  &bad, &close);
        fused_row(w + 3 * ws + wo, out + 3 * os + oo, wc, oc, a30, a31, rb3, ca0, ca1, gc,
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

/* ---- BF16 and F16 outputs: the product in binary32 ---------------------------------------
 *
 * For a BF16 or F16 output the binary64 product is far more precise than needed: a binary32
 * product (8 lanes per instruction instead of 4) is certified the same way, with the binary32
 * error bound. With a = fl32(s L), b = fl32(R) (relative error 2^-24 each), p32 their product
 * in binary32 (any order, FMA) and e32 = fl32(w + p32) (w exact in binary32):
 *     |e32 - exact| <= (r + 3) 2^-24 (1 + r 2^-23) M + tiny32   (2 conversions, r roundings
 *                                                            in the product, 1 in the sum),
 * tiny32 covering binary32 underflow (4 r 2^-149 (1 + max|s L| + max|R|), from the caller); numpy's
 * binary64 sum is within (r + 2) 2^-53 M of the exact value. gc32 = (r + 5) 2^-24 bounds
 * both, with room for the 5 roundings of the bound itself (rb32, ca32, the fma's, g) and
 * for (r + 2) 2^-53 << 2^-24. The only output midpoint that can be within g of e32 is mu, the
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
    double g = b->gc * (fabs(x) + b->rb[i] * b->ca[j]) + 0x1p-1060;
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
    const __m256 gcv = _mm256_set1_ps(b->gc32), tiny = _mm256_set1_ps(b->tiny32);
    /* other midpoints are at least half an ulp minus a binary32 ulp away */
    const __m256 far = _mm256_set1_ps(oc == BF16 ? 0x1p-10f : 0x1p-13f);
    const __m256 f16_min_normal = _mm256_set1_ps(0x1p-14f);
    const __m256i expo = _mm256_set1_epi32(0x7F800000), one = _mm256_set1_epi32(1);
    /* the low bits binary32 has beyond the output's significand, and their half */
    const __m256i low = _mm256_set1_epi32(oc == BF16 ? 0xFFFF : 0x1FFF);
    const __m256i half = _mm256_set1_epi32(oc == BF16 ? 0x8000 : 0x1000);
    const __m256i mid = _mm256_set1_epi32(0x7FFF), bexpo = _mm256_set1_epi32(0x7F80);
    const __m256i hexpo = _mm256_set1_epi32(0x7C00);
    __m256i bad = _mm256_setzero_si256();
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
            const __m256 rbv = _mm256_set1_ps(b->rb32[i0 + t]);
            __m256i v[2];
            int near_bits = 0;
            for (int h = 0; h < 2; h++) {
                __m256 x = load8_f32(wp + 8 * h * SIZES[wc], wc);
                __m256 e = _mm256_add_ps(x, _mm256_load_ps(tile + 16 * t + 8 * h));
                __m256 g = _mm256_fmadd_ps(gcv, _mm256_fmadd_ps(rbv, h ? ca1 : ca0,
                                                                _mm256_and_ps(x, absmask)), tiny);
                __m256 ea = _mm256_and_ps(e, absmask);
                __m256i eb = _mm256_castps_si256(ea);
                bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(eb, expo), expo));
                /* the midpoint of the output's interval holding |e|, in binary32 */
                __m256 mu = _mm256_castsi256_ps(_mm256_or_si256(_mm256_andnot_si256(low, eb),
                                                                half));
                __m256 farv = _mm256_mul_ps(ea, far);
                if (oc == F16) {  /* below F16's normal range the spacing is 2^-24 */
                    __m256 sub = _mm256_mul_ps(_mm256_add_ps(_mm256_floor_ps(
                        _mm256_mul_ps(ea, _mm256_set1_ps(0x1p24f))), _mm256_set1_ps(0.5f)),
                        _mm256_set1_ps(0x1p-24f));
                    __m256 tiny_e = _mm256_cmp_ps(ea, f16_min_normal, _CMP_LT_OQ);
                    mu = _mm256_blendv_ps(mu, sub, tiny_e);
                    /* there the other midpoints are 2^-24 away: g < 2^-26 keeps mu alone;
                     * and g < |e32|, since the sign of a result rounded to zero is e's */
                    farv = _mm256_blendv_ps(farv, _mm256_min_ps(_mm256_set1_ps(0x1p-26f), ea),
                                            tiny_e);
                }
                __m256 near = _mm256_or_ps(
                    _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(ea, mu), absmask), g, _CMP_LE_OQ),
                    _mm256_cmp_ps(g, farv, _CMP_GE_OQ));
                near_bits |= _mm256_movemask_ps(near) << (8 * h);
                __m256i q;
                if (oc == BF16) {
                    __m256i sb = _mm256_castps_si256(e);
                    q = _mm256_srli_epi32(_mm256_add_epi32(sb, _mm256_add_epi32(
                        mid, _mm256_and_si256(_mm256_srli_epi32(sb, 16), one))), 16);
                    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(q, bexpo),
                                                                  bexpo));
                } else {
                    q = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT
                                                              | _MM_FROUND_NO_EXC));
                    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(q, hexpo),
                                                                  hexpo));
                }
                v[h] = q;
            }
            /* 16 values in order (packus interleaves the 128-bit halves) */
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(v[0], v[1]), 0xD8);
            _mm256_storeu_si256((__m256i *)op, packed);
            while (near_bits) {
                int lane = __builtin_ctz(near_bits);
                near_bits &= near_bits - 1;
                if (repair(b, i0 + t, c * 16 + lane)) return 2;
            }
        }
        if (!_mm256_testz_si256(bad, bad)) return 1;
    }
    return 0;
}

#define LOWP(WC) (b->oc == BF16 ? rows4_lowp_t(b, i0, nch, WC, BF16) \
                                : rows4_lowp_t(b, i0, nch, WC, F16))
AVX2 static int rows4_lowp(const block_t *b, Py_ssize_t i0, Py_ssize_t nch) {
    return b->wc == F32 ? LOWP(F32) : b->wc == BF16 ? LOWP(BF16) : LOWP(F16);
}
#endif

static int use_avx2 = 0;

/* The block: 4-row tiles over the packed columns (fused, or products + generic epilogue),
 * then the remaining columns and rows by the generic code. */
static int lowrank_loop(const block_t *b, double *p) {
    Py_ssize_t nch = use_avx2 ? b->n / CHUNK : 0, i0 = 0;
    int flags = 0;
    for (; i0 + TILE_ROWS <= b->m && !flags; i0 += TILE_ROWS) {
        Py_ssize_t done = 0;  /* columns done by the tiles */
#ifdef HAVE_AVX2_PATH
        int narrow_w = b->wc == F32 || b->wc == BF16 || b->wc == F16;
        if (nch && narrow_w && b->L32 != NULL) {  /* BF16/F16 output: binary32 product */
            flags = rows4_lowp(b, i0, b->n / 16);
            done = b->n / 16 * 16;
        } else if (nch && narrow_w && (b->oc == F32 || b->oc == BF16)) {
            flags = rows4_fused(b, i0, 0, nch);
            done = nch * CHUNK;
        } else if (nch) {
            flags = rows4_packed(b, i0, nch, p);
            done = nch * CHUNK;
        }
#endif
        if (!flags && done < b->n)
            flags = rows_generic(b, i0, TILE_ROWS, done, b->n - done, p);
    }
    for (; i0 < b->m && !flags; i0 += TILE_ROWS) {
        int mt = b->m - i0 < TILE_ROWS ? (int)(b->m - i0) : TILE_ROWS;
        flags = rows_generic(b, i0, mt, 0, b->n, p);
    }
    return flags == 0 ? 0 : (flags & 1) ? 1 : 2;
}

static PyObject *lowrank_round(PyObject *self, PyObject *args) {
    Py_buffer w, L, R, Rp, rb, ca, out, tmp = {0};
    int wc, oc;
    Py_ssize_t m, r, n, lo, hi, step;
    PyObject *tmp_obj, *f32_obj = Py_None;
    Py_buffer L32 = {0}, Rp32 = {0}, rb32 = {0}, ca32 = {0};
    double tiny32 = 0.0;
    if (!PyArg_ParseTuple(args, "y*iy*y*y*y*y*w*innnnnnO|O", &w, &wc, &L, &R, &Rp, &rb, &ca,
                          &out, &oc, &m, &r, &n, &lo, &hi, &step, &tmp_obj, &f32_obj))
        return NULL;
    PyObject *res = NULL;
    int have_tmp = 0, have_f32 = 0;
    if (f32_obj != Py_None) {
        if (!PyArg_ParseTuple(f32_obj, "y*y*y*y*d", &L32, &Rp32, &rb32, &ca32, &tiny32))
            goto done;
        have_f32 = 1;
    }
    if (tmp_obj != Py_None) {
        if (PyObject_GetBuffer(tmp_obj, &tmp, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        have_tmp = 1;
    }
    if (wc < 0 || wc > 3 || oc < 1 || oc > 3 || m < 0 || r < 1 || n < 0 || step < 1
        || lo < 0 || hi > m || lo > hi) {
        PyErr_SetString(PyExc_ValueError, "bad dtype code, shape or row range "
                        "(out: 1 F32, 2 F16, 3 BF16)");
    } else if (w.len != m * n * SIZES[wc] || out.len != m * n * SIZES[oc]
               || L.len != m * r * 8 || R.len != r * n * 8
               || Rp.len != (n / CHUNK) * CHUNK * r * 8 || rb.len != m * 8 || ca.len != n * 8
               || (have_tmp && tmp.len < step * n * SIZES[oc])
               || (have_f32 && ((oc != BF16 && oc != F16) || wc == F64
                                || L32.len != m * r * 4 || Rp32.len != (n / 16) * 16 * r * 4
                                || rb32.len != m * 4 || ca32.len != n * 4))) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not agree");
    } else {
        double *p = PyMem_RawMalloc(sizeof(double) * TILE_ROWS * STRIPE);
        /* (first row, status) of the blocks not done; at most one per block */
        Py_ssize_t nblocks = (hi - lo + step - 1) / step, nfailed = 0;
        Py_ssize_t *failed = PyMem_RawMalloc(sizeof(Py_ssize_t) * 2 * (nblocks + 1));
        if (p == NULL || failed == NULL) {
            PyMem_RawFree(p);
            PyMem_RawFree(failed);
            PyErr_NoMemory();
            goto done;
        }
        const Py_ssize_t ws = n * SIZES[wc], os = n * SIZES[oc];
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = lo; i < hi; i += step) {
            Py_ssize_t rows = hi - i < step ? hi - i : step;
            char *dst = (char *)out.buf + i * os;
            block_t blk = {(const char *)w.buf + i * ws, wc, ws, (const double *)L.buf + i * r,
                           R.buf, Rp.buf, (const double *)rb.buf + i, ca.buf,
                           have_tmp ? (char *)tmp.buf : dst, oc, os, rows, r, n,
                           (double)(2 * r + 10) * 0x1p-53,
                           have_f32 ? (const float *)L32.buf + i * r : NULL, Rp32.buf,
                           ca32.buf, have_f32 ? (const float *)rb32.buf + i : NULL,
                           (float)(r + 5) * 0x1p-24f, (float)tiny32};
            int status = lowrank_loop(&blk, p);
            if (status == 0 && have_tmp) memcpy(dst, tmp.buf, (size_t)(rows * os));
            if (status) {
                failed[2 * nfailed] = i;
                failed[2 * nfailed++ + 1] = status;
            }
        }
        Py_END_ALLOW_THREADS
        res = PyList_New(nfailed);
        for (Py_ssize_t k = 0; res != NULL && k < nfailed; k++) {
            PyObject *item = Py_BuildValue("(nn)", failed[2 * k], failed[2 * k + 1]);
            if (item == NULL) {
                Py_CLEAR(res);
                break;
            }
            PyList_SET_ITEM(res, k, item);
        }
        PyMem_RawFree(p);
        PyMem_RawFree(failed);
    }
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&L);
    PyBuffer_Release(&R);
    PyBuffer_Release(&Rp);
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ca);
    PyBuffer_Release(&out);
    if (have_tmp) PyBuffer_Release(&tmp);
    if (have_f32) {
        PyBuffer_Release(&L32);
        PyBuffer_Release(&Rp32);
        PyBuffer_Release(&rb32);
        PyBuffer_Release(&ca32);
    }
    return res;
}

static PyObject *add_round(PyObject *self, PyObject *args) {
    Py_buffer w, d, out;
    int wc, oc;
    if (!PyArg_ParseTuple(args, "y*iy*w*i", &w, &wc, &d, &out, &oc))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = d.len / 8;
    if (wc < 0 || wc > 3 || oc < 0 || oc > 3) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (F64), 1 (F32), 2 (F16) "
                        "or 3 (BF16)");
    } else if (d.len % 8 || w.len != n * SIZES[wc] || out.len != n * SIZES[oc]) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not agree");
    } else {
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = add_round_loop((const char *)w.buf, wc, (const double *)d.buf, (char *)out.buf,
                            oc, n);
        Py_END_ALLOW_THREADS
        res = PyBool_FromLong(ok);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&d);
    PyBuffer_Release(&out);
    return res;
}

/* simd() -> bool: whether the AVX2/FMA code runs; simd(False) makes the plain C code run
 * (the tests check both give the same bytes), simd(True) restores it where the CPU has it. */
static int cpu_avx2 = 0;
static PyObject *simd(PyObject *self, PyObject *args) {
    int on = -1;
    if (!PyArg_ParseTuple(args, "|p", &on))
        return NULL;
    if (on >= 0) use_avx2 = on && cpu_avx2;
    return PyBool_FromLong(use_avx2);
}

static PyMethodDef methods[] = {
    {"add_round", add_round, METH_VARARGS,
     "add_round(w, w_code, d, out, out_code) -> bool: out = RN(w + d), rounded once; False "
     "when a result is NaN/Inf or overflows."},
    {"lowrank_round", lowrank_round, METH_VARARGS,
     "lowrank_round(w, w_code, L, R, Rp, rb, ca, out, out_code, m, r, n, lo, hi, step, tmp) "
     "-> list: out = RN(w + L @ R) for rows lo..hi of an [m, n] tensor, in blocks of step rows, "
     "with the product computed here. Returns (first row, status) of each block not done "
     "(1 NaN/Inf/overflow, 2 a close call; its output rows are unspecified: use the numpy "
     "kernels). Rp: R packed as [n // 8][r][8]; rb = sum_k |L|, ca = max_k |R|; tmp: None "
     "or a scratch buffer of step rows of out, written first (then out is written only for "
     "the blocks done: in place, out is w). f32 (BF16/F16 outputs of F32/BF16/F16 bases, "
     "optional): "
     "(L32, Rp32, rb32, ca32, tiny32): the float32 operands, R packed as [n // 16][r][16], "
     "and the float32 underflow term of the bound."},
    {"simd", simd, METH_VARARGS, "simd([on]) -> bool: whether the AVX2/FMA path of "
     "lowrank_round runs (on=False: the plain C path; True: AVX2/FMA where the CPU has it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmerge", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmerge(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    cpu_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
               && __builtin_cpu_supports("f16c");
    use_avx2 = cpu_avx2;
#endif
    return PyModule_Create(&module);
}
