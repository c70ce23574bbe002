"""Merging into 8-bit float weights of a safetensors base (spec/merge.md section 4.6):
F8_E4M3 (float8_e4m3fn) and F8_E5M2, with or without a scale tensor beside the weight.

Scales: ``<w>_scale_inv`` (DeepSeek-V3 / Qwen3-FP8, transformers' FineGrainedFP8) or
``<w>_scale`` (compressed-tensors); both are multiplied in, W = fp8 * s, with one value per
block: a scale of shape (R, C) for a weight (out, in) covers blocks of ceil(out/R)-style
tiles, 128 x 128 as those checkpoints write them (the last block of a dimension that is not
a multiple of 128 is partial), one value per row (out, 1), or one for the tensor.

A merged FP8 tensor is dequantized exactly (float64), merged by the job's own engine on
that float64 array (every op kind, as for a float base), then either requantized to its own
FP8 type with its own scales (``--dtype keep``: q = RN(x / s), correctly rounded with ties
to even, saturating at the largest finite value; saturated elements are counted) or rounded
once to ``--dtype``'s float type (the scales are then dropped from the output and every FP8
weight that has one is dequantized, merged or not). Every merged FP8 tensor's retained delta
goes to the report (``loratool.retained``).
"""

from __future__ import annotations

import json
import math

import numpy as np

from ...errors import CheckpointError
from ...numerics import FLOAT_NP, round_into
from ...retained import RetainedDelta

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIXES = ("_scale_inv", "_scale")
BLOCK = 128
_SCALE_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E8M0")
# (exponent bits, mantissa bits, bias, largest finite code, next value above the largest)
_FORMATS = {"F8_E4M3": (4, 3, 7, 0x7E, 480.0), "F8_E5M2": (5, 2, 15, 0x7B, 65536.0)}
CODE = "LT440"
_CHUNK = 1 << 20  # elements per encode call


def _values(dtype: str) -> np.ndarray:
    """float64 value of every code 0..255 (NaN/Inf where the format has them)."""
    e_bits, m_bits, bias, top, _ = _FORMATS[dtype]
    c = np.arange(256)
    mag = c & 0x7F
    e, f = mag >> m_bits, mag & ((1 << m_bits) - 1)
    v = np.where(e == 0, f * 2.0 ** (1 - bias - m_bits),
                 (1 + f / 2.0 ** m_bits) * 2.0 ** (e - bias))
    v[mag > top] = np.nan  # E4M3: 0x7F; E5M2: 0x7D-0x7F (0x7C is Inf)
    if dtype == "F8_E5M2":
        v[mag == 0x7C] = np.inf
    return np.where(c & 0x80, -v, v)


_TABLES = {d: _values(d) for d in FP8_DTYPES}


def _midpoints(dtype: str) -> np.ndarray:
    """Midpoints between consecutive non-negative finite values, then the overflow one."""
    v = _TABLES[dtype][: _FORMATS[dtype][3] + 1]
    return np.append((v[:-1] + v[1:]) / 2, (v[-1] + _FORMATS[dtype][4]) / 2)


def decode(codes: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """FP8 codes (uint8) -> float64 values, times ``scale`` (the full-shape float64 array)."""
    out = _TABLES[dtype][np.asarray(codes, dtype=np.uint8)]
    return out if scale is None else out * scale


def encode(x: np.ndarray, dtype: str, scale: np.ndarray | None = None
           ) -> tuple[np.ndarray, int]:
    """(codes, saturated): ``x / scale`` rounded once to ``dtype``, ties to even, saturating.

    Exact without dividing exactly: a midpoint m between two FP8 values has at most 5
    significant bits and a scale at most 24, so m * s is a float64 without rounding and
    ``|x| <> m * s`` decides the rounding the way the real quotient would. The float64
    quotient only picks the candidate interval. ``saturated`` counts the elements whose
    nearest value (unbounded exponent) lies above the largest finite one."""
    x = np.asarray(x, dtype=np.float64)
    s = np.ones_like(x) if scale is None else np.broadcast_to(scale, x.shape)
    mid = _midpoints(dtype)
    top = _FORMATS[dtype][3]
    a = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = np.searchsorted(mid, a / s).astype(np.int64)  # mid[k-1] < a/s <= mid[k]
    for _ in range(2):  # the float64 quotient may sit one midpoint off; move to the truth
        lo = np.where(k > 0, mid[np.maximum(k - 1, 0)] * s, -1.0)
        k -= a < lo
        hi = np.where(k <= top, mid[np.minimum(k, top)] * s, np.inf)
        k += a > hi
    tie = a == np.where(k <= top, mid[np.minimum(k, top)] * s, np.nan)
    k += tie & (k % 2 == 1)  # a tie between codes k and k+1: the even one
    tie_lo = (k > 0) & (a == np.where(k > 0, mid[np.maximum(k - 1, 0)] * s, np.nan))
    k -= tie_lo & (k % 2 == 1)
    over = k > top
    codes = np.minimum(k, top).astype(np.uint8)
    codes |= (np.signbit(x) * 0x80).astype(np.uint8)
    return codes, int(np.count_nonzero(over))


def block_shape(wshape, sshape, name: str) -> tuple[int, int]:
    """Rows and columns of the weight's 2-D view that one scale covers."""
    rows = wshape[0] if wshape else 1
    cols = math.prod(wshape[1:]) if len(wshape) > 1 else 1
    s = tuple(sshape)
    if math.prod(s) == 1:
        return rows, cols
    if len(s) != 2 or len(wshape) != 2:
        raise CheckpointError(f"scale of `{name}` has shape {list(s)}; FP8 merges take one "
                              f"scale, one per row (out, 1) or a 2-D grid of blocks for a 2-D "
                              f"weight, not {list(wshape)}", code=CODE)

    def one(n: int, m: int) -> int | None:
        if m == 1:
            return n
        if m == n:
            return 1
        return BLOCK if -(-n // BLOCK) == m else None
    b = (one(rows, s[0]), one(cols, s[1]))
    if None in b:
        raise CheckpointError(f"scale of `{name}` has shape {list(s)} for a weight of "
                              f"{list(wshape)}: not a grid of {BLOCK}x{BLOCK} blocks, rows or "
                              "one value; the block layout cannot be inferred", code=CODE)
    return b


def expand(scale: np.ndarray, block: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """The per-block scales as a full (rows, cols) float64 array."""
    s = np.asarray(scale, dtype=np.float64).reshape(-(-rows // block[0]), -(-cols // block[1]))
    return np.repeat(np.repeat(s, block[0], 0)[:rows], block[1], 1)[:, :cols]


def _scale_values(raw: bytes, dtype: str, name: str) -> np.ndarray:
    if dtype == "F8_E8M0":  # powers of two (UE8M0 scale_fmt); 0xFF is NaN
        bits = np.frombuffer(raw, np.uint8).astype(np.float64)
        vals = np.where(bits == 255, np.nan, np.exp2(bits - 127))
    else:
        arr = np.frombuffer(raw, FLOAT_NP[dtype])
        vals = (arr.astype(np.uint32) << 16).view(np.float32).astype(np.float64) \
            if dtype == "BF16" else arr.astype(np.float64)
    if not (np.isfinite(vals).all() and (vals > 0).all()):
        raise CheckpointError(f"scale tensor `{name}` has zero, negative or non-finite values",
                              code=CODE)
    return vals


class Fp8Base:
    """The FP8 weights of a base, their scales, and the report of what merging them did."""

    def __init__(self, base_tensors: dict, read, dtype: str):
        """``base_tensors``: name -> (dtype, shape); ``read(name)``: a tensor's raw bytes;
        ``dtype``: the job's --dtype."""
        self.dequantize = dtype != "keep"
        self.scales: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self.scale_names: dict[str, str] = {}
        self.fp8_names = frozenset(n for n, (dt, _) in base_tensors.items() if dt in FP8_DTYPES)
        for name, (dt, shape) in base_tensors.items():
            if dt not in FP8_DTYPES:
                continue
            found = [name + suf for suf in SCALE_SUFFIXES if name + suf in base_tensors]
            if len(found) > 1:
                raise CheckpointError(f"`{name}` has both {' and '.join(found)}; which one "
                                      "scales it is unclear", code=CODE)
            if found:
                sdt, sshape = base_tensors[found[0]]
                if sdt not in _SCALE_DTYPES:
                    raise CheckpointError(f"scale tensor `{found[0]}` is {sdt}, not one of "
                                          + ", ".join(_SCALE_DTYPES), code=CODE)
                block = block_shape(tuple(shape), tuple(sshape), name)
                self.scales[name] = (_scale_values(read(found[0]), sdt, found[0]), block)
                self.scale_names[name] = found[0]
        self.stats = RetainedDelta()
        self.saturated: dict[str, int] = {}

    # What the output holds (read by streaming.stream_file and writers.write_sharded).
    @property
    def drop(self) -> frozenset:
        """Scale tensors left out of a dequantized output."""
        return frozenset(self.scale_names.values()) if self.dequantize else frozenset()

    def full_scale(self, name: str, shape) -> np.ndarray | None:
        if name not in self.scales:
            return None
        s, block = self.scales[name]
        rows = shape[0] if shape else 1
        return expand(s, block, rows, math.prod(shape) // max(rows, 1))

    def wrap(self, engine) -> Fp8Engine:
        return Fp8Engine(engine, self)

    def report(self) -> dict | None:
        if not self.stats.tensors:
            return None
        retained, kept, rel = self.stats.overall()
        rows = [dict(vars(t), saturated=self.saturated.get(t.name, 0))
                for t in self.stats.tensors]
        return {"retained": retained, "kept": kept, "rel_error": rel,
                "saturated": sum(self.saturated.values()), "tensors": rows}

    def notes(self) -> list[str]:
        rep = self.report()
        out = []
        if rep is not None:
            kept = "n/a" if rep["kept"] is None else f"{rep['kept']:.4g}"
            rel = "n/a" if rep["rel_error"] is None else f"{rep['rel_error']:.4g}"
            where = ("requantized to their FP8 types with their own scales"
                     if not self.dequantize else "dequantized")
            out.append(f"fp8: {len(rep['tensors'])} merged FP8 tensor(s) {where}; the written "
                       f"file kept {kept} of the delta overall (rel_error {rel}; per tensor in "
                       "the report's `fp8`)")
            if rep["saturated"]:
                worst = sorted(self.saturated.items(), key=lambda kv: -kv[1])[:5]
                out.append(f"fp8: {rep['saturated']} element(s) exceeded the largest FP8 value "
                           "for their scale and were saturated to it ("
                           + ", ".join(f"`{n}`: {c}" for n, c in worst) + ")")
        if self.dequantize and self.scale_names:
            out.append(f"fp8: {len(self.scale_names)} FP8 weight(s) dequantized; their scale "
                       "tensors are not in the output (config.json's quantization_config of a "
                       "model directory is removed)")
        return out


class Fp8Engine:
    """The job's engine, taught FP8 tensors: decode, run the engine in float64, encode."""

    def __init__(self, inner, fp8: Fp8Base):
        self.inner, self.fp8 = inner, fp8
        self.device, self.precision = inner.device, inner.precision
        self.pinned = inner.pinned
        self.drop = fp8.drop
        # --dtype fp32/fp16/bf16: every FP8 tensor becomes a float tensor of that dtype.
        self.converts = fp8.fp8_names if fp8.dequantize else frozenset()

    def run(self, raw, dtype: str, shape, ops, out_dtype: str, name: str):
        if dtype not in FP8_DTYPES:
            return self.inner.run(raw, dtype, shape, ops, out_dtype, name)
        raw = raw if isinstance(raw, np.ndarray) else raw.numpy()
        rows = shape[0] if shape else 1
        codes = raw[: math.prod(shape)].reshape(rows, -1)
        scale = self.fp8.full_scale(name, shape)  # (rows, cols) or None
        W = decode(codes, dtype, scale)
        M = W
        if ops:
            work = W.copy()  # the engine writes an F64 -> F64 result in place
            res, release = self.inner.run(work.reshape(-1).view(np.uint8), "F64",
                                          tuple(shape), ops, "F64", name)
            try:
                M = np.frombuffer(res, np.float64).reshape(W.shape)
                if release is not None:
                    M = M.copy()
            finally:
                if release is not None:
                    release()
        if out_dtype in FP8_DTYPES:
            q = np.empty(W.shape, np.uint8)
            sat = 0
            step = max(1, _CHUNK // max(W.shape[1], 1))  # bounds encode's temporaries
            for i in range(0, rows, step):
                part = slice(i, i + step)
                q[part], n = encode(M[part], out_dtype, None if scale is None else scale[part])
                sat += n
            if ops:
                self.fp8.saturated[name] = sat
                self.fp8.stats.add(name, dtype, out_dtype, decode(q, out_dtype, scale) - W,
                                   M - W)
            return memoryview(q.reshape(-1)), None
        out = np.empty(W.shape, dtype=FLOAT_NP[out_dtype])
        round_into(out, M, out_dtype)
        if ops:
            got = out.astype(np.float64) if out_dtype != "BF16" else \
                (out.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            self.fp8.stats.add(name, dtype, out_dtype, got - W, M - W)
        return memoryview(out.reshape(-1).view(np.uint8)), None


def prepare(base: str, base_tensors: dict, dtype: str, source=None) -> Fp8Base | None:
    """The FP8 side of a merge, or None when the base has no FP8 tensor. ``source``: the
    opened single-file base (safetensors or .pt), None for a sharded directory."""
    if not any(dt in FP8_DTYPES for dt, _ in base_tensors.values()):
        return None

    from functools import lru_cache

    from ...checkpoint import list_tensors
    from ...stfile import read_bytes, read_header
    files = {n: t.file for n, t in list_tensors(base).items()} if source is None else {}
    header = lru_cache(maxsize=4)(read_header)  # one shard after another, in name order
    by_name = {t.name: t for t in source.tensors} if source is not None else {}

    def read(name: str) -> bytes:
        if source is not None:
            t = by_name[name]
            buf = np.empty(t.nbytes, np.uint8)
            source.read_into(t, buf)
            return buf.tobytes()
        h = header(files[name])
        return read_bytes(h, h.tensors[name])
    return Fp8Base(base_tensors, read, dtype)


def strip_quantization_config(src: str, dst: str) -> bool:
    """Copy a model directory's config.json without ``quantization_config`` (the output holds
    no FP8 any more); True when ``src`` is such a config and was rewritten."""
    try:
        with open(src, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or "quantization_config" not in cfg:
        return False
    cfg.pop("quantization_config")
    with open(dst, "w", encoding="utf-8") as f:
        f.write(json.dumps(cfg, indent=2) + "\n")
    return True

