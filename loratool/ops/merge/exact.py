"""The exact CPU engine: ``W + sum_i s_i * L_i @ R_i`` evaluated in float64 and rounded once
to the stored dtype, in numpy, blocked by rows and shared out to worker threads.

The block kernels give the same bits:

* ``_compiled_product_rows`` (the optional C extension ``loratool._fastmerge`` built, on a CPU
  with AVX2/FMA/F16C; F32/BF16/F16 outputs): the compiled kernel computes the rank-r product
  itself (register tiles, FMA; binary32 for BF16/F16 outputs), adds W and rounds, for a
  worker's whole share of rows in one call. Its float64 sum may differ from numpy's in the
  last bits, so every entry is certified to round to the value numpy's sum rounds to (an
  error bound, see ``_fastmerge.c``); the blocks with an entry it cannot certify, or with
  NaN/Inf or an overflow, are left to the numpy kernels below, which decide them.
* ``_compiled_block`` (float64 outputs, and CPUs without AVX2/FMA/F16C): the rank-r product
  by numpy's matmul, then one compiled pass reads W in its stored dtype, adds in float64 and
  rounds once, directly to the output dtype. Any NaN/Inf or overflow in a block hands that
  block to ``_fast_block``, so non-finite values are handled by exactly the numpy code.
* ``_fast_block`` (one low-rank update with finite factors, the usual merge): W stays in its
  stored dtype (bf16 is widened to float32 per block); only the rank-r product is float64;
  one ufunc call adds it to W in float64 and rounds into the output (numpy computes a mixed
  float32 + float64 add in float64 and casts its result once). Overflow is detected by the
  floating-point flags, not by a scan. bf16 outputs are rounded from the float32 result with
  a fix-up of the rare values that landed exactly on a bf16 midpoint (the only ones where
  rounding twice can differ from rounding once).
* ``_reference_block`` (several updates, vectors, non-finite factors, and any block in which
  the fast kernel raised a flag or produced NaN/Inf): the whole block in float64, rounded
  through float32-to-odd, with the LT412 check. It is also the oracle for the fast kernel
  in the tests.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ...numerics import FLOAT_NP, any_nonfinite, as_float, bf16_to_f32, round_into
from .npadapter import as_f64
from .operands import _abs, _compiled_operands, _product_pays, _Scratch
from .plan import nonfinite_error

# Rows per block: the float64 product of a block stays in the L2 cache through
# matmul -> add -> round (16 rows measured 1.6-2x faster than 128 for the matmul, same bits).
BLOCK_ROWS = 16
# The reference kernel's block: ~2^18 float64 values (2 MiB).
REFERENCE_ELEMS = 1 << 18
# |L| * |R| * rank below this cannot overflow float64, so the product needs no flag check.
_SAFE_BOUND = 1e300
# dtype codes of ``_fastmerge.add_round``
_EXT_CODES = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}


def _load_extension():
    """``loratool._fastmerge`` or None (not built: no compiler at install time). With
    ``LORATOOL_REQUIRE_EXT=1`` (CI) a missing extension is an ImportError."""
    try:
        from ... import _fastmerge
    except ImportError as e:
        if os.environ.get("LORATOOL_REQUIRE_EXT") == "1":
            raise ImportError("LORATOOL_REQUIRE_EXT=1 but the compiled merge kernel "
                              "loratool._fastmerge is not built (pip install -e . needs a C "
                              f"compiler and the Python headers): {e}") from e
        return None
    return _fastmerge


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled kernel's module, loaded on first use (``inspect`` and friends import this
    module through the merge package but never need it), or None."""
    return _load_extension()


def __getattr__(name: str):
    if name == "EXTENSION":  # ``exact.EXTENSION``: the same, as an attribute
        return extension()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _blas_local_threads():
    """OpenBLAS's ``openblas_set_num_threads_local`` of numpy's BLAS (0.3.27+), or None.

    The engine runs one worker per core; each worker's small matmuls must not start OpenBLAS's
    own threads as well (they spin-wait and fight the workers for the cores: measured 2x
    slower on 2 cores). The setting is per calling thread, so no global state changes.
    """
    import ctypes
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f
                     if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths, key=lambda p: not p.startswith(numpy_dir)):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


@contextmanager
def _one_blas_thread():
    fn = _blas_local_threads()
    before = fn(1) if fn is not None else None
    try:
        yield
    finally:
        if fn is not None:
            fn(before)


@dataclass
class _NpOp:
    kind: str
    scale: float
    module: str
    L: np.ndarray | None  # s L: the scale is folded in, one rounding per entry
    R: np.ndarray | None
    vec: np.ndarray | None


@dataclass
class _Tensor:
    """One tensor's job, shared (read-only) by the workers."""

    w2: np.ndarray
    o2: np.ndarray
    dtype: str
    out_dtype: str
    ops: list
    name: str
    fast: bool
    ext: object = None  # the compiled kernel's module, when used
    packed: tuple | None = None  # the compiled product's operands (``_compiled_operands``)


class NumpyExactEngine:
    """CPU, float64, rounded once. ``run`` takes the raw bytes of a tensor (a numpy uint8
    array) and returns the bytes of the result. Row blocks go to one Python worker thread
    per core (numpy releases the GIL in its loops and in BLAS).

    ``fast=False`` runs every block through the reference kernel (tests compare the two);
    ``compiled=False`` never uses the compiled kernel, ``True`` requires it (default: when
    built); ``compiled_product``: whether the compiled kernel computes the product too
    (default: where its AVX2/FMA path runs and the rank is at most
    ``operands._PRODUCT_MAX_RANK``; True forces it at any rank, for tests), or adds and
    rounds after numpy's.
    """

    device = "cpu"
    precision = "fp64"
    pinned = False

    def __init__(self, workers: int | None = None, *, fast: bool = True,
                 block_rows: int = BLOCK_ROWS, compiled: bool | None = None,
                 compiled_product: bool | None = None):
        if compiled and extension() is None:
            raise RuntimeError("the compiled merge kernel loratool._fastmerge is not built")
        self.workers = workers or cores()
        self.fast = fast
        self.ext = extension() if compiled is not False else None
        # The compiled kernel computes the product too where its AVX2/FMA path runs (its plain
        # C product is slower than BLAS: elsewhere it only adds and rounds after numpy's
        # product, as for F64 outputs). True/False force either (tests, benchmarks).
        self.forced = compiled_product is True  # also past the rank limits below
        if compiled_product is None:
            compiled_product = self.ext is not None and self.ext.simd()
        self.compiled_product = compiled_product
        self.block_rows = block_rows
        self._pool = None
        self._scratch: dict[int, _Scratch] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def run(self, raw, dtype: str, shape, ops, out_dtype: str, name: str):
        """(bytes of the merged tensor, release callback or None). ``raw`` is overwritten
        when the dtype is kept (the result is written in place)."""
        n = math.prod(shape)
        if n == 0:
            return memoryview(b""), None
        if any(op.kind in ("dora", "fn") for op in ops):
            from .torch_engine import run_whole_f64
            return run_whole_f64(raw, dtype, shape, ops, out_dtype, name), None
        src = raw[: n * np.dtype(FLOAT_NP[dtype]).itemsize].view(FLOAT_NP[dtype]).reshape(shape)
        out = src if out_dtype == dtype else np.empty(shape, dtype=FLOAT_NP[out_dtype])
        w2 = src.reshape(shape[0] if len(shape) else 1, -1)
        rows, cols = w2.shape
        # The factors' operands go to buffers reused from tensor to tensor: fresh arrays
        # of this size cost page faults that were ~10 % of a bf16 merge's engine thread.
        own = self._scratch.setdefault("operands", _Scratch())
        with np.errstate(over="ignore", invalid="ignore"):
            ops = [_NpOp(op.kind, op.scale, op.module, _scaled(op.L, op.scale, own, f"L{q}"),
                         _f64(op.R, own, f"R{q}"), as_f64(op.vec)) for q, op in enumerate(ops)]
        mags = _magnitudes(ops, own) if self.fast else None  # the reference needs neither
        job = _Tensor(w2, out.reshape(w2.shape), dtype, out_dtype, ops, name,
                      self.fast and _fast_ok(ops, mags), self.ext)
        if job.fast and job.ext is not None and self.compiled_product \
                and _product_pays(ops[0].L.shape[1], out_dtype, self.forced):
            job.packed = _compiled_operands(ops[0], dtype, out_dtype, self.forced, own, mags)
        step = self.block_rows if job.fast else max(1, REFERENCE_ELEMS // max(cols, 1))
        blocks = -(-rows // step)
        k = min(self.workers, blocks)
        if k <= 1:
            self._rows(0, 0, rows, step, job)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.workers,
                                                thread_name_prefix="loratool-merge")
            per = -(-blocks // k) * step
            futures = [self._pool.submit(self._rows, q, q * per, min(rows, (q + 1) * per),
                                         step, job) for q in range(k)]
            for f in futures:
                f.result()  # re-raises a worker's error (LT412) here
        return memoryview(out.reshape(-1).view(np.uint8)), None

    def _rows(self, q: int, lo: int, hi: int, step: int, job: _Tensor) -> None:
        scratch = self._scratch.setdefault(q, _Scratch())
        starts = range(lo, hi, step)
        if job.packed is not None:  # one call for the range; the numpy kernels redo the rest
            starts = [i for i, _status in _compiled_product_rows(job, lo, hi, step, scratch)]
        with _one_blas_thread():
            for i in starts:
                j = min(hi, i + step)
                if not job.fast:
                    _reference_block(job, i, j, scratch)
                elif not (job.packed is None and job.ext is not None
                          and _compiled_block(job, i, j, scratch)
                          or _fast_block(job, i, j, scratch)):
                    _reference_block(job, i, j, scratch)


def _f64(x, s: _Scratch, key: str) -> np.ndarray | None:
    """``x`` (numpy or torch) as a contiguous float64 array, in ``s``'s buffer ``key`` when it
    needs a copy."""
    if not isinstance(x, np.ndarray) or x.dtype == np.float64 and x.flags.c_contiguous:
        return as_f64(x)
    out = s.get(key, x.size, np.float64).reshape(x.shape)
    np.copyto(out, x)  # exact: float32/float16 values are float64 values
    return out


def _scaled(L, scale: float, s: _Scratch, key: str) -> np.ndarray | None:
    """s L in float64 (one rounding per entry), in ``s``'s buffer ``key``."""
    if L is None:
        return None
    L = _f64(L, s, key)
    return np.multiply(L, scale, out=s.get(key, L.size, np.float64).reshape(L.shape))


def _single_lowrank(ops) -> bool:
    return len(ops) == 1 and ops[0].kind == "lowrank"


def _magnitudes(ops, s: _Scratch) -> tuple | None:
    """(|s L|, |R|) of one low-rank update, in ``s``'s buffers (``_fast_ok`` and
    ``_compiled_operands`` both need them), else None."""
    if not _single_lowrank(ops):
        return None
    return _abs(ops[0].L, s, "absL"), _abs(ops[0].R, s, "absR")


def _fast_ok(ops, mags: tuple | None = None) -> bool:
    """One low-rank update whose float64 product cannot overflow (so no flag can come from
    it, whatever BLAS does with the floating-point status). ``mags``: ``_magnitudes``."""
    if not _single_lowrank(ops):
        return False
    L, R = ops[0].L, ops[0].R
    if L.size == 0 or R.size == 0:
        return True
    abs_l, abs_r = mags or (np.abs(L), np.abs(R))
    with np.errstate(over="ignore", invalid="ignore"):
        bound = float(abs_l.max()) * float(abs_r.max()) * L.shape[1]
    return math.isfinite(bound) and bound < _SAFE_BOUND


def _product(job: _Tensor, i: int, j: int, s: _Scratch) -> np.ndarray:
    """The float64 rank-r product of rows ``i:j`` (``s L @ R``), in the worker's scratch."""
    op = job.ops[0]
    d = s.get("d", (j - i) * job.w2.shape[1], np.float64).reshape(j - i, -1)
    np.matmul(op.L[i:j], op.R, out=d)
    return d


def _compiled_product_rows(job: _Tensor, lo: int, hi: int, step: int, s: _Scratch) -> list:
    """Rows ``lo:hi`` in blocks of ``step`` by the compiled kernel, product included (its
    result is certified equal to the numpy kernels', see ``_fastmerge.c``); returns
    ``(first row, status)`` of the blocks it left (NaN/Inf, overflow, close calls), whose
    output rows the numpy kernels must write (in place, W is still there)."""
    op = job.ops[0]
    packed, rb, ca, f32 = job.packed
    rows, cols = job.w2.shape
    tmp = s.get("y", step * cols, FLOAT_NP[job.out_dtype]) if job.out_dtype == job.dtype \
        else None
    return job.ext.lowrank_round(job.w2, _EXT_CODES[job.dtype], op.L, op.R, packed, rb, ca,
                                 job.o2, _EXT_CODES[job.out_dtype], rows, op.R.shape[0], cols,
                                 lo, hi, step, tmp, f32)


def _compiled_block(job: _Tensor, i: int, j: int, s: _Scratch) -> bool:
    """Rows ``i:j`` by the compiled add-and-round after numpy's product (float64 outputs, and
    CPUs without AVX2/FMA/F16C); False (to be redone by ``_fast_block``) when a result is
    NaN/Inf or overflows, or a side is F16."""
    if "F16" in (job.dtype, job.out_dtype):
        return False  # its F16 conversions do not vectorize: numpy's are faster (benchmarks/)
    m, cols = j - i, job.w2.shape[1]
    dst = job.o2[i:j]
    inplace = job.out_dtype == job.dtype
    d = _product(job, i, j, s)
    if not inplace:
        return job.ext.add_round(job.w2[i:j], _EXT_CODES[job.dtype], d, dst,
                                 _EXT_CODES[job.out_dtype])
    # in place: W must survive a fall back to the numpy kernels
    y = s.get("y", m * cols, FLOAT_NP[job.dtype]).reshape(m, cols)
    code = _EXT_CODES[job.dtype]
    if not job.ext.add_round(job.w2[i:j], code, d, y, code):
        return False
    dst[...] = y
    return True


def _fast_block(job: _Tensor, i: int, j: int, s: _Scratch) -> bool:
    """Rows ``i:j`` by the fast kernel; False (output rows untouched or to be rewritten)
    when the block needs the reference kernel: an overflow, a NaN/Inf, a bf16 fix-up."""
    m, cols = j - i, job.w2.shape[1]
    d = _product(job, i, j, s)
    w = job.w2[i:j]
    if job.dtype == "BF16":
        w = bf16_to_f32(w, out=s.get("w", m * cols, np.uint32).reshape(m, cols))
    dst = job.o2[i:j]
    out = job.out_dtype
    # No scan for NaN/Inf: the product is finite (``_fast_ok``), so a NaN/Inf in the output
    # comes from the base (kept, as the reference keeps it: the same float64 add and cast)
    # or from a finite sum rounded to Inf, which raises the overflow flag (numpy checks the
    # flags of the add and of its output cast). The block then goes to the reference kernel,
    # which says LT412 precisely. invalid comes only from signalling NaNs in the base, which
    # the add quiets exactly as the reference does.
    try:
        with np.errstate(over="raise", invalid="ignore", under="ignore", divide="ignore"):
            if out == "BF16":
                np.add(w, d, out=d)
                y = s.get("y", m * cols, np.float32).reshape(m, cols)
                np.copyto(y, d, casting="unsafe")
            elif out == job.dtype:  # in place: W must survive a fall back to the reference
                y = s.get("y", m * cols, FLOAT_NP[out]).reshape(m, cols)
                np.add(w, d, out=y, casting="unsafe")
            else:
                np.add(w, d, out=dst, casting="unsafe")
                return True
    except FloatingPointError:
        return False
    if out != "BF16":
        dst[...] = y
        return True
    return _bf16_from_f32(dst, y, d, s)


# float32 magnitudes from this one up round to Inf in bf16 (0x7F7F8000 is the midpoint
# between the largest bf16 and Inf, a tie that goes to Inf's even pattern)
_BF16_INF_FROM = float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32))


def _bf16_from_f32(dst, y, x, s: _Scratch) -> bool:
    """``dst`` (bf16 bits) = RN_bf16(x), from y = RN_f32(x) (float64 ``x``)."""
    # NaN/Inf, or a value that rounds to Inf: the reference kernel (canonical NaN, LT412).
    # Two read-only reductions (NaN propagates through min/max); checked first, so that the
    # integer rounding below never sees a NaN pattern (whose + 0x8000 could wrap around).
    if not (-_BF16_INF_FROM < y.min() and y.max() < _BF16_INF_FROM):
        return False
    bits = y.view(np.uint32)
    m = bits.size
    r = s.get("r", m, np.uint32).reshape(bits.shape)
    np.right_shift(bits, 16, out=r)
    r &= 1
    r += 0x7FFF
    r += bits
    np.right_shift(r, 16, out=dst, casting="unsafe")  # the rounded bf16 bits, stored
    t = s.get("t", m, np.uint32).reshape(bits.shape)
    np.bitwise_and(bits, 0xFFFF, out=t)
    ties = np.flatnonzero(t == 0x8000)
    if ties.size:
        # y is a bf16 midpoint: rounding y to even is right only when y == x; otherwise the
        # direction is x's (round to odd through float32 does exactly this).
        xs = x.reshape(-1)[ties]
        ys = y.reshape(-1)[ties].astype(np.float64)
        moved = xs != ys
        fix = ties[moved]
        dst.reshape(-1)[fix] = (bits.reshape(-1)[fix] >> 16) + (
            np.abs(xs[moved]) > np.abs(ys[moved]))
    return True


def _reference_block(job: _Tensor, i: int, j: int, s: _Scratch) -> None:
    """Rows ``i:j`` the straightforward way: float64 block, ``round_into``, LT412 check."""
    cols = job.w2.shape[1]
    ops = job.ops
    m = j - i
    blk = s.get("blk", m * cols, np.float64).reshape(m, cols)
    lowrank = [op for op in ops if op.kind == "lowrank"]
    vectors = [op for op in ops if op.kind != "lowrank"]
    w = job.w2[i:j]
    if job.dtype == "BF16":
        w = bf16_to_f32(w)
    with np.errstate(over="ignore", invalid="ignore"):
        if lowrank:
            # blk = delta_1 + W (= W + delta_1: addition commutes), then + delta_2 ...
            np.matmul(lowrank[0].L[i:j], lowrank[0].R, out=blk)
            blk += w
            for op in lowrank[1:]:
                tmp = s.get("tmp", m * cols, np.float64).reshape(m, cols)
                np.matmul(op.L[i:j], op.R, out=tmp)
                blk += tmp
        else:
            blk[...] = w
        for op in vectors:  # vector op on a 1-D tensor, viewed as [n, 1]
            blk += op.vec[i:j].reshape(-1, 1) * op.scale
    dst = job.o2[i:j]
    round_into(dst, blk, job.out_dtype)
    if any_nonfinite(dst, job.out_dtype):  # rare: look closer
        _check_block(dst, blk, ops, i, j, job.name, job.out_dtype)


def _check_block(dst, blk, ops, i, j, name, out_dtype) -> None:
    """LT412 for a block whose output holds NaN/Inf that the base did not (the base is
    inferred: a non-finite base entry makes the float64 sum non-finite, unless the
    delta itself is)."""
    delta = np.zeros_like(blk)
    with np.errstate(over="ignore", invalid="ignore"):
        for op in ops:
            if op.kind == "lowrank":
                delta += op.L[i:j] @ op.R  # L holds s L
            else:
                delta += op.vec[i:j].reshape(-1, 1) * op.scale
    produced = ~np.isfinite(as_float(dst, out_dtype)) & (np.isfinite(blk)
                                                          | ~np.isfinite(delta))
    bad = int(produced.sum())
    if bad:
        raise nonfinite_error(name, bad, ops)
