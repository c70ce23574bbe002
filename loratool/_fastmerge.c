/* loratool._fastmerge: the exact merge engine's fused add-and-round step, compiled.
 *
 * add_round(w, w_code, d, out, out_code) -> bool
 *
 *   out[i] = RN_out(w[i] + d[i])   for every i, one rounding from binary64
 *
 * w holds the stored base values (codes: 0 F64, 1 F32, 2 F16, 3 BF16 as bits), d the float64
 * rank-r product (computed by numpy's BLAS, so its bits are the numpy kernel's). The sum is
 * the same binary64 addition numpy does; the result is rounded once, to nearest even, to the
 * output dtype (BF16/F16 directly from binary64: no double rounding).
 *
 * Returns False when any result is NaN/Inf or overflows (the contents of out are then
 * unspecified): the caller runs the numpy kernel on that block, whose handling of non-finite
 * values is the reference. Only finite, in-range results are produced here, so there is no
 * NaN payload or overflow policy to agree on.
 *
 * Build flags: no -ffast-math (it would flush subnormals to zero), -ffp-contract=off.
 * The loop runs without the GIL (the engine's worker threads call it concurrently).
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

/* Rounds and stores x; returns nonzero when x is not finite or the rounded value overflows
 * (integer masks only: the loops stay free of branches). */
static inline uint64_t store(char *out, Py_ssize_t i, int code, double x) {
    uint64_t b = bits64(x), sign = b & 0x8000000000000000ULL, a = b ^ sign;
    uint64_t bad = (uint64_t)((int64_t)a >= (int64_t)0x7FF0000000000000LL);
    switch (code) {
    case F64:
        memcpy(out + 8 * i, &x, 8);
        return bad;
    case F32: {
        float f = (float)x;
        uint32_t u; memcpy(&u, &f, 4);
        memcpy(out + 4 * i, &f, 4);
        return (u & 0x7F800000u) == 0x7F800000u;
    }
    case BF16: {
        uint64_t r = round_bits(a, 8, 0x1p-126, 0x1.8p-81) | sign;
        float f = (float)from_bits64(r);  /* exact: a bf16 value (or Inf: overflow) */
        uint32_t u; memcpy(&u, &f, 4);
        uint16_t h = (uint16_t)(u >> 16);
        memcpy(out + 2 * i, &h, 2);
        return bad | ((u & 0x7F800000u) == 0x7F800000u);
    }
    default: { /* F16 */
        uint64_t r = round_bits(a, 11, 0x1p-14, 0x1.8p28);
        int64_t e = (int64_t)(r >> 52) - 1023 + 15;  /* the F16 exponent of a normal value */
        uint64_t normal = (uint64_t)(e << 10) | ((r >> 42) & 0x3FF);
        uint64_t tiny = (uint32_t)(int32_t)(from_bits64(r) * 0x1p24);  /* subnormal: exact */
        uint64_t m = -(uint64_t)((int64_t)r < (int64_t)bits64(0x1p-14));
        uint16_t h = (uint16_t)((tiny & m) | (normal & ~m) | (sign >> 48));
        memcpy(out + 2 * i, &h, 2);
        return bad | (uint64_t)(e >= 31);
    }
    }
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

static PyMethodDef methods[] = {
    {"add_round", add_round, METH_VARARGS,
     "add_round(w, w_code, d, out, out_code) -> bool: out = RN(w + d), rounded once; False "
     "when a result is NaN/Inf or overflows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmerge", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmerge(void) { return PyModule_Create(&module); }
