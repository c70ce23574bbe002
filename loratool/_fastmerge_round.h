/* loratool._fastmerge: dtype codes, loading stored values as binary64, rounding binary64 once
 * to each output dtype. Included by _fastmerge.c (one translation unit). */
#ifndef LORATOOL_FASTMERGE_ROUND_H
#define LORATOOL_FASTMERGE_ROUND_H

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

#endif /* LORATOOL_FASTMERGE_ROUND_H */
