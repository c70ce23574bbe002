/* loratool._fastmerge: the exact merge engine's compiled kernels.
 *
 * lowrank_round(...): out = RN_out(w + L @ R) for the usual merge (one low-rank update), the
 *   rank-r product computed here as well, each entry certified to round to the value the
 *   numpy kernel (BLAS's product) gives: the certificate and the binary64 tiles in
 *   _fastmerge_tiles.h, the binary32 tiles of BF16/F16 outputs in _fastmerge_lowp.h.
 *
 * add_round(w, w_code, d, out, out_code) -> bool: out[i] = RN_out(w[i] + d[i]), one rounding
 *   from binary64, d the float64 product computed by numpy's BLAS (F64 outputs, and CPUs
 *   without AVX2/FMA/F16C).
 *
 * simd([on]) -> bool: whether lowrank_round's AVX2/FMA/F16C code runs (tests switch it off to
 *   check the plain C code gives the same bytes).
 *
 * The rounding helpers shared by both are in _fastmerge_round.h.
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

#include "_fastmerge_round.h"

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


#include "_fastmerge_tiles.h"
#include "_fastmerge_lowp.h"


static int use_avx2 = 0;

/* The block: 4-row tiles over the packed columns (fused, or products + generic epilogue),
 * then the remaining columns and rows by the generic code. */
static int lowrank_loop(const block_t *b, double *p) {
    Py_ssize_t i0 = 0;
    int flags = 0;
    for (; i0 + TILE_ROWS <= b->m && !flags; i0 += TILE_ROWS) {
        Py_ssize_t done = 0;  /* columns done by the tiles */
#ifdef HAVE_AVX2_PATH
        Py_ssize_t nch = use_avx2 ? b->n / CHUNK : 0;
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
                           (double)(2 * r + 6) * 0x1p-53, 3 * 0x1p-53,
                           have_f32 ? (const float *)L32.buf + i * r : NULL, Rp32.buf,
                           ca32.buf, have_f32 ? (const float *)rb32.buf + i : NULL,
                           (float)(r + 4) * 0x1p-24f, 3 * 0x1p-24f, (float)tiny32};
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
     "kernels). Rp: R packed as [n // 8][r][8]; rb, ca: per row and column, rb_i ca_j >= "
     "sum_k |L_ik| |R_kj| (1-norm and max, or 2-norms); tmp: None "
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

