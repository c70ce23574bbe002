"""float64 -> GGUF tensor types, rounded once; dequantization to float64.

Rounding (spec/gguf.md "Rounding"): F32 is float64 rounded to nearest-even. F16 and BF16
are float64 rounded once to nearest-even, through float32 rounded to odd (exact because
24 >= 11 + 2 and 24 >= 8 + 2 bits). Block types (Q8_0, Q4_0, ...) are ``gguf.quants.quantize``
of the float32 value rounded to nearest (what llama.cpp's quantizers take as input).
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InteropError
from . import codes as C
from ._dep import require_gguf


def round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: truncate toward zero, set the last bit if inexact."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(np.float32)
    back = y.astype(np.float64)
    inexact = (back != x) & np.isfinite(y)
    bits = y.view(np.int32).copy()
    bits -= (inexact & (np.abs(back) > np.abs(x))).astype(np.int32)
    bits |= inexact.astype(np.int32)
    return bits.view(np.float32)


@functools.lru_cache(maxsize=None)
def writable_types() -> tuple[str, ...]:
    """GGML type names gguf can quantize to (measured on this install, not a fixed list)."""
    gguf = require_gguf()
    out = []
    for t in gguf.GGMLQuantizationType:
        if t.name in ("F64", "I8", "I16", "I32", "I64"):
            continue
        block = gguf.GGML_QUANT_SIZES[t][0]
        try:
            gguf.quants.quantize(np.zeros((1, max(block, 256)), np.float32), t)
        except (NotImplementedError, Exception):  # noqa: BLE001 (a gguf bug means "cannot")
            continue
        out.append(t.name)
    return tuple(out)


def qtype(name: str):
    gguf = require_gguf()
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise InteropError(f"unknown GGUF type {name!r}; writable: "
                           + ", ".join(writable_types()), code=C.GGUF_OUT_TYPE) from None


def encode(x: np.ndarray, type_name: str, *, what: str = "tensor") -> np.ndarray:
    """``x`` (float64, numpy order) rounded once to ``type_name``: a float32/float16 array
    for F32/F16, the raw ``uint8`` rows for every other type. Raises LT330 when gguf cannot
    write the type (or this row length), LT333 when a finite value overflows."""
    gguf = require_gguf()
    t = qtype(type_name)
    if t.name not in writable_types():
        raise InteropError(f"{what}: gguf cannot write {t.name}; writable types: "
                           + ", ".join(writable_types()), code=C.GGUF_OUT_TYPE)
    x = np.asarray(x, dtype=np.float64)
    block = gguf.GGML_QUANT_SIZES[t][0]
    if x.shape[-1] % block:
        raise InteropError(f"{what}: rows of {x.shape[-1]} are not a multiple of the {t.name} "
                           f"block size {block}", code=C.GGUF_OUT_TYPE)
    if t.name == "F32":
        with np.errstate(over="ignore"):
            out = x.astype(np.float32)
    elif t.name in ("F16", "BF16"):
        odd = round_to_odd_f32(x)
        with np.errstate(over="ignore"):
            out = odd.astype(np.float16) if t.name == "F16" else gguf.quants.quantize(odd, t)
    else:
        with np.errstate(over="ignore"):
            f32 = x.astype(np.float32)
        if not np.isfinite(f32).all() and np.isfinite(x).all():
            raise InteropError(f"{what}: values overflow float32", code=C.GGUF_NONFINITE)
        return gguf.quants.quantize(f32, t)
    if np.isfinite(x).all() and not np.isfinite(decode(out, t.name)).all():
        raise InteropError(f"{what}: values overflow {t.name} (max |x| = "
                           f"{float(np.abs(x).max()):g})", code=C.GGUF_NONFINITE)
    return out


def decode(data: np.ndarray, type_name: str) -> np.ndarray:
    """Tensor data (as ``encode`` returns it, or a memmap) -> float64, numpy order."""
    gguf = require_gguf()
    t = qtype(type_name)
    if t.name == "F64":
        return np.asarray(data, dtype=np.float64)
    if t.name in ("F32", "F16"):
        return np.asarray(data).astype(np.float64)
    try:
        return gguf.quants.dequantize(np.asarray(data), t).astype(np.float64)
    except NotImplementedError:
        raise InteropError(f"gguf cannot dequantize {t.name}", code=C.GGUF_OUT_TYPE) from None
