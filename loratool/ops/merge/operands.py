"""The compiled product's operands, prepared once per tensor for ``_fastmerge.lowrank_round``
(spec/merge.md section 8): R packed for the register tiles, the factors of the certificate's
bound on the product, the binary32 copies for BF16/F16 outputs; and the ranks up to which
the compiled product pays. Used by ``exact.NumpyExactEngine``."""

from __future__ import annotations

import math

import numpy as np

from ...numerics import norm_bounds


class _Scratch:
    """Per-worker buffers, grown on demand and reused across tensors."""

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, n: int, dtype) -> np.ndarray:
        buf = self._bufs.get(key)
        need = n * np.dtype(dtype).itemsize
        if buf is None or buf.size < need:
            buf = self._bufs[key] = np.empty(need, dtype=np.uint8)
        return buf[:need].view(dtype)


def _abs(x: np.ndarray, s: _Scratch, key: str) -> np.ndarray:
    """|x|, in ``s``'s buffer ``key``."""
    return np.abs(x, out=s.get(key, x.size, np.float64).reshape(x.shape))


# Ranks up to which the compiled product pays: its certificate's bound grows with the rank,
# and so do the blocks it leaves to numpy (F32 outputs) or the entries it recomputes alone
# (binary32 product). Measured on [2048, 2048] tensors (benchmarks/merge_engine.py --rank,
# figures in benchmarks/README.md): F32 outputs 1.26x numpy at 64, 0.89x at 256; binary32
# BF16 2.3x at 64, 0.29x at 256; F16 2.2-2.9x at 32, 1.1x at 56. BF16 outputs above the
# binary32 limit take the binary64 tiles (their certificate rarely fails there); F16 outputs
# above it stay in numpy (the binary64 tiles' F16 epilogue is not vectorized).
_PRODUCT_MAX_RANK = {"F32": 64, "BF16": None, "F16": 32}
_BINARY32_MAX_RANK = {"BF16": 64, "F16": 32}


def _product_pays(rank: int, out_dtype: str, forced: bool = False) -> bool:
    if rank == 0 or out_dtype not in _PRODUCT_MAX_RANK:  # F64 outputs keep numpy's product
        return False
    limit = _PRODUCT_MAX_RANK[out_dtype]
    return forced or limit is None or rank <= limit


def _compiled_operands(op, dtype: str, out_dtype: str, forced: bool = False,
                       s: _Scratch | None = None, mags: tuple | None = None) -> tuple:
    """What the compiled product needs besides L and R of ``op`` (an ``exact._NpOp``: one
    low-rank update, s folded into L), once per tensor: R packed as [cols // 8][r][8] (8
    columns of every k contiguous, the kernel's register tile), and per row and per column
    factors whose product bounds ``sum_k |s L_ik| |R_kj|`` and so the product's rounding
    error (``sum_k |s L_ik|`` and ``max_k |R_kj|``, or the 2-norms: ``_tighter_bound``). For
    BF16/F16 outputs of F32/BF16/F16 bases also the float32 operands (R packed 16 columns at
    a time), when the factors are well inside float32's range (see the C file)."""
    s = s or _Scratch()  # the engine passes its own: buffers reused from tensor to tensor
    rows, r = op.L.shape
    cols = op.R.shape[1]
    n8, n16 = cols // 8 * 8, cols // 16 * 16

    def buf(key, shape, dtype):
        return s.get(key, math.prod(shape), dtype).reshape(shape)

    def cast(key, x, dtype):
        out = buf(key, x.shape, dtype)
        np.copyto(out, x, casting="same_kind")
        return out

    packed = buf("Rp", (n8 // 8, r, 8), np.float64)
    np.copyto(packed, op.R[:, :n8].reshape(r, n8 // 8, 8).transpose(1, 0, 2))
    abs_l, abs_r = mags or (_abs(op.L, s, "absL"), _abs(op.R, s, "absR"))
    # Any summation order is fine: the kernel's bound has room for its rounding.
    rb, ca = np.einsum("ij->i", abs_l, out=buf("rb", (rows,), np.float64)), \
        abs_r.max(axis=0, out=buf("ca", (cols,), np.float64))
    # the binary32 path's range check, on the first pair (each factor bounds |sL| and |R|
    # entrywise, as the 2-norms would too): the same tensors take it whichever bound is used
    big = max(float(rb.max(initial=0.0)), float(ca.max(initial=0.0)))
    rb, ca = _tighter_bound(op, rb, ca, buf)
    f32 = None
    limit = _BINARY32_MAX_RANK.get(out_dtype, -1)
    if dtype in ("F32", "BF16", "F16") and (r <= limit or forced and limit > 0) \
            and big < 2.0**60:
        # binary32 underflow: at most 2^-150 (1 + the other factor) per product, 2^-150 for
        # the sum, and the bound's own subnormal roundings: 4 r 2^-149 (...) covers them
        tiny = 4 * r * 2.0**-149 * (1.0 + float(abs_l.max(initial=0.0)) + big)
        r32 = buf("Rp32", (n16 // 16, r, 16), np.float32)
        np.copyto(r32, op.R[:, :n16].reshape(r, n16 // 16, 16).transpose(1, 0, 2),
                  casting="same_kind")
        f32 = (cast("L32", op.L, np.float32), r32, cast("rb32", rb, np.float32),
               cast("ca32", ca, np.float32), tiny)
    return packed, rb, ca, f32


def _tighter_bound(op, rb: np.ndarray, ca: np.ndarray, buf) -> tuple:
    """The factors of the kernel's bound on P = sum_k |sL_ik| |R_kj|: ``rb = sum_k |sL_ik|``
    and ``ca = max_k |R_kj|`` (given), or the 2-norms of sL's rows and R's columns
    (``numerics.norm_bounds``), whichever pair bounds the whole tensor tighter (their sums'
    product): for dense factors the 2-norms give about 1.5 P, the first pair 2.5-3 P (fewer
    entries recomputed: benchmarks/certificate_rate.py); for one-hot rows the first pair."""
    rb2, ca2 = norm_bounds(op.L, op.R, buf("rb2", rb.shape, np.float64),
                           buf("ca2", ca.shape, np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        tighter = float(rb2.sum()) * float(ca2.sum()) < float(rb.sum()) * float(ca.sum())
    return (rb2, ca2) if tighter else (rb, ca)
