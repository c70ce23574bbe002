"""Byte-level numerics, the one home for them: bf16 <-> float32 bit conversions, rounding
float64 once to a storage dtype (round to odd), NaN/Inf and zero scans on raw bytes, and
bounds on the rows and columns of low-rank factors.

numpy only; ``round_to_odd_f32`` also takes a torch tensor (duck-typed, so importing this
module never imports torch).
"""

from __future__ import annotations

import math

import numpy as np

# numpy views of stored floats; BF16 has no numpy dtype and is kept as its uint16 bit pattern.
FLOAT_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 values; exact. ``out``: a uint32 or float32
    scratch array of the same shape to fill instead of allocating."""
    if out is None:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    wide = out.view(np.uint32)
    np.copyto(wide, bits, casting="safe")
    wide <<= 16
    return wide.view(np.float32)


def f32_to_bf16(y: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, to nearest even (overflow to Inf; NaN -> 0x7FC0, like torch)."""
    bits = y.view(np.uint32)
    out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(y)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    """The values of stored array ``a`` (BF16 as bits) as a float numpy array."""
    return bf16_to_f32(a) if dtype == "BF16" else a


def round_to_odd_f32(x):
    """float64 -> float32 rounded to odd: truncate, then set the last bit when inexact.

    Rounding that to nearest-even bf16/fp16 (8 and 11 bits, both <= 24 - 2) equals rounding
    ``x`` itself once (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums").
    ``x`` is a float64 numpy array or torch tensor; the result is of the same library.
    """
    if isinstance(x, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            y = x.astype(np.float32)
            back = y.astype(np.float64)
        inexact = back != x
        bits = y.view(np.int32)
        bits -= (inexact & (np.abs(back) > np.abs(x))).astype(np.int32)  # toward zero
        bits |= inexact.astype(np.int32)
        return y
    f32, f64, i32 = _torch_dtypes(x)
    y = x.to(f32)
    back = y.to(f64)
    inexact = back != x
    bits = y.view(i32)
    bits.sub_((inexact & (back.abs() > x.abs())).to(i32))  # step toward zero
    bits.bitwise_or_(inexact.to(i32))
    return y


def _torch_dtypes(t):
    import torch  # ``t`` is a torch tensor: torch is loaded already
    return torch.float32, torch.float64, torch.int32


def round_into(dst: np.ndarray, x: np.ndarray, out_dtype: str) -> None:
    """``dst[...] = RN_out_dtype(x)`` for float64 ``x``: one rounding (BF16 ``dst`` holds
    bits)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if out_dtype in ("F64", "F32"):
            dst[...] = x  # numpy's float64 -> float32 cast rounds to nearest even
        elif out_dtype == "F16":
            dst[...] = round_to_odd_f32(x)  # float32 -> float16 rounds to nearest even
        else:
            dst[...] = f32_to_bf16(round_to_odd_f32(x))


def nonfinite_count(arr: np.ndarray, dtype: str) -> int:
    """Number of NaN/Inf entries; BF16 is checked on its bit pattern (exponent all ones)."""
    if dtype == "BF16":
        return int(np.count_nonzero((arr.view(np.uint16) & 0x7F80) == 0x7F80))
    if dtype in ("F16", "F32", "F64", "C64"):
        return int(arr.size - np.count_nonzero(np.isfinite(arr)))
    return 0


def any_nonfinite(arr: np.ndarray, dtype: str) -> bool:
    """Whether a float array (BF16 as bits) holds NaN/Inf; a sum pass for the IEEE types
    (NaN and Inf reach the sum; an overflowing sum only means "look closer")."""
    if dtype == "BF16":
        return bool(((arr & 0x7F80) == 0x7F80).any())
    with np.errstate(over="ignore", invalid="ignore"):
        return not math.isfinite(float(arr.sum(dtype=np.float64 if dtype == "F64"
                                                else np.float32)))


def any_nonzero(arr: np.ndarray) -> bool:
    """Whether any entry differs from zero, on the bits (so -0.0 counts as zero)."""
    size = arr.dtype.itemsize
    bits = arr.view(_UINT[size])
    mask = (1 << (8 * size - 1)) - 1
    return bool(((bits & mask) != 0).any())


# Added to each norm by ``norm_bounds``: squares below 2^-1022 may be lost to underflow, so
# a computed 2-norm can come out up to sqrt(r 2^-1022) short; sqrt(r) 2^-509 covers that.
NORM_FLOOR = 2.0**-509


def norm_bounds(L: np.ndarray, R: np.ndarray, rows_out: np.ndarray,
                cols_out: np.ndarray) -> tuple:
    """Upper bounds of the 2-norms of ``L``'s rows and ``R``'s columns (float64, written into
    the given arrays), so that ``rows[i] * cols[j] >= sum_k |L_ik| |R_kj|`` (Cauchy-Schwarz)
    up to the rounding of the sums and square roots (relative, about r 2^-53). Squares that
    overflow give Inf."""
    r = L.shape[1]
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        np.einsum("ij,ij->i", L, L, out=rows_out)
        np.einsum("ij,ij->j", R, R, out=cols_out)
        for x in (rows_out, cols_out):
            np.add(np.sqrt(x, out=x), math.sqrt(r) * NORM_FLOOR, out=x)
    return rows_out, cols_out
