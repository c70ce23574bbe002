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

All of it runs by row chunks of about ``_CHUNK`` elements, whole blocks of scales (128 rows
for a 128x128 grid) and multiples of the exact engine's 16-row blocks, so the float64 memory
does not grow with the tensor and the bytes are those of a whole-tensor computation: the
low-rank and bias updates of a chunk are the same updates restricted to its rows. Only DoRA
and "fn" updates (a norm per output, a function of the whole weight) merge the whole tensor
in float64 once, then encode it by chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from ...errors import CheckpointError
from ...numerics import FLOAT_NP, as_float, round_into
from ...retained import RetainedDelta, TensorSums
from ...stfile import DTYPE_SIZES, matrix_shape

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIXES = ("_scale_inv", "_scale")
BLOCK = 128
_SCALE_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E8M0")
# (exponent bits, mantissa bits, bias, largest finite code, next value above the largest)
_FORMATS = {"F8_E4M3": (4, 3, 7, 0x7E, 480.0), "F8_E5M2": (5, 2, 15, 0x7B, 65536.0)}
CODE = "LT440"
_CHUNK = 1 << 20  # elements per chunk of a merge (rounded to whole scale blocks)


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
    """FP8 codes (uint8) -> float64 values, times ``scale`` (float64, broadcast to the codes)."""
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


def encode_rows(x: np.ndarray, dtype: str, scale: np.ndarray | None, out: np.ndarray
                ) -> tuple[np.ndarray, int]:
    """``x`` (float64 rows) encoded into ``out`` (uint8) in pieces of about ``_CHUNK``
    elements (encode's temporaries are several times its input); returns (the float64 values
    stored, saturated count). ``scale``: rows of scales, as ``Fp8Base.scale_rows`` gives."""
    m, cols = x.shape
    sat = 0
    step = max(1, _CHUNK // max(cols, 1))
    for a in range(0, m, step):
        part = slice(a, a + step)
        out[part], n = encode(x[part], dtype, None if scale is None else scale[part])
        sat += n
    return decode(out, dtype, scale), sat


def block_shape(wshape, sshape, name: str) -> tuple[int, int]:
    """Rows and columns of the weight's 2-D view that one scale covers."""
    rows, cols = matrix_shape(wshape)
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


def _scale_values(raw: bytes, dtype: str, name: str) -> np.ndarray:
    if dtype == "F8_E8M0":  # powers of two (UE8M0 scale_fmt); 0xFF is NaN
        bits = np.frombuffer(raw, np.uint8).astype(np.float64)
        vals = np.where(bits == 255, np.nan, np.exp2(bits - 127))
    else:
        vals = as_float(np.frombuffer(raw, FLOAT_NP[dtype]), dtype).astype(np.float64)
    if not (np.isfinite(vals).all() and (vals > 0).all()):
        raise CheckpointError(f"scale tensor `{name}` has zero, negative or non-finite values",
                              code=CODE)
    return vals


class Fp8Base:
    """The FP8 weights of a base, their scales, and the report of what merging them did."""

    def __init__(self, base_tensors: dict, read, dtype: str):
        """``base_tensors``: name -> (dtype, shape); ``read(names)``: name -> raw bytes of
        those tensors; ``dtype``: the job's --dtype."""
        self.dequantize = dtype != "keep"
        self.scales: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self.scale_names: dict[str, str] = {}
        blocks = {}
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
                blocks[name] = block_shape(tuple(shape), tuple(sshape), name)
                self.scale_names[name] = found[0]
        raw = read(list(self.scale_names.values())) if self.scale_names else {}
        for name, sname in self.scale_names.items():
            values = _scale_values(raw.pop(sname), base_tensors[sname][0], sname)
            self.scales[name] = (values, blocks[name])
        self.stats = RetainedDelta()
        self.saturated: dict[str, int] = {}

    # What the output holds (read by streaming.stream_file and writers.write_sharded).
    @property
    def drop(self) -> frozenset:
        """Scale tensors left out of a dequantized output."""
        return frozenset(self.scale_names.values()) if self.dequantize else frozenset()

    def chunk_rows(self, name: str, shape) -> int:
        """Rows per chunk of a merge: about ``_CHUNK`` elements, a multiple of the scale
        block's height (128 for a block grid) and of the exact engine's 16-row blocks, so
        each chunk's blocks are the whole tensor's blocks and give the same bits."""
        rows, cols = matrix_shape(shape)
        height = self.scales[name][1][0] if name in self.scales else 1
        align = math.lcm(16, height if height < rows else 1)
        return max(align, _CHUNK // max(cols, 1) // align * align)

    def scale_rows(self, name: str, i: int, j: int, cols: int) -> np.ndarray | None:
        """The scales of rows ``i:j``: (j - i, 1) when one value covers a row, else
        (j - i, cols); never the whole tensor's."""
        if name not in self.scales:
            return None
        s, (height, width) = self.scales[name]
        grid = s.reshape(-1, -(-cols // width))
        part = grid[np.arange(i, j) // height]
        return part if width >= cols else np.repeat(part, width, 1)[:, :cols]

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
        rows, cols = matrix_shape(shape)
        codes = raw[: rows * cols].reshape(rows, cols)
        to_fp8 = out_dtype in FP8_DTYPES
        out = np.empty(codes.shape, np.uint8 if to_fp8 else FLOAT_NP[out_dtype])
        merged = None
        step = self.fp8.chunk_rows(name, shape)
        if ops and not all(op.kind in ROW_LOCAL for op in ops):
            # DoRA and "fn" updates need the whole tensor (a norm per output, a function of
            # all of W): one float64 copy, merged by the engine, then encoded by chunks
            whole = np.empty(codes.shape, np.float64)
            for i in range(0, rows, step):
                j = min(rows, i + step)
                whole[i:j] = decode(codes[i:j], dtype, self.fp8.scale_rows(name, i, j, cols))
            merged = self._merge(whole, shape, ops, name)
        sums, sat = TensorSums(), 0
        for i in range(0, rows, step):
            j = min(rows, i + step)
            scale = self.fp8.scale_rows(name, i, j, cols)
            W = decode(codes[i:j], dtype, scale)
            if merged is not None:
                M = merged[i:j]
            elif ops:
                M = self._merge(W.copy(), (j - i, *shape[1:]),
                                [rows_of(op, i, j) for op in ops], name)
            else:
                M = W
            if to_fp8:
                got, n = encode_rows(M, out_dtype, scale, out[i:j])
                sat += n
            else:
                round_into(out[i:j], M, out_dtype)
                got = as_float(out[i:j], out_dtype)
            if ops:
                sums.update(got - W, M - W)
        if ops:
            if to_fp8:
                self.fp8.saturated[name] = sat
            self.fp8.stats.add_sums(name, dtype, out_dtype, sums)
        return memoryview(out.reshape(-1).view(np.uint8)), None

    def _merge(self, work: np.ndarray, shape, ops, name: str) -> np.ndarray:
        """The engine's float64 result for ``work`` (float64 rows, overwritten)."""
        res, release = self.inner.run(work.reshape(-1).view(np.uint8), "F64", tuple(shape),
                                      ops, "F64", name)
        try:
            M = np.frombuffer(res, np.float64).reshape(work.shape)
            return M.copy() if release is not None else M
        finally:
            if release is not None:
                release()


# Updates whose rows i:j depend only on rows i:j of W and of their factors
ROW_LOCAL = ("lowrank", "vector")


def rows_of(op, i: int, j: int):
    """``op`` restricted to rows ``i:j`` of the tensor's 2-D view (``ROW_LOCAL`` kinds)."""
    if op.kind == "lowrank":
        return dataclasses.replace(op, L=op.L[i:j])
    return dataclasses.replace(op, vec=op.vec[i:j])


def prepare(base_tensors: dict, dtype: str, source=None, listed: dict | None = None
            ) -> Fp8Base | None:
    """The FP8 side of a merge, or None when the base has no FP8 tensor. ``source``: the
    opened single-file base (safetensors or .pt); ``listed``: a sharded directory's
    ``checkpoint.list_tensors`` as the job read it (which file, where in it)."""
    if not any(dt in FP8_DTYPES for dt, _ in base_tensors.values()):
        return None

    def read(names: list[str]) -> dict:
        if source is not None:
            by_name = {t.name: t for t in source.tensors}
            out = {}
            for n in names:
                out[n] = np.empty(by_name[n].nbytes, np.uint8)
                source.read_into(by_name[n], out[n])
            return out
        return _read_listed([listed[n] for n in names])
    return Fp8Base(base_tensors, read, dtype)


def _read_listed(tensors: list) -> dict:
    """The raw bytes of ``checkpoint.BaseTensor``s of sharded safetensors files, one open
    file per shard (DeepSeek-V3 has ~45k scale tensors in 163 shards)."""
    by_file: dict[str, list] = {}
    for t in tensors:
        by_file.setdefault(t.file, []).append(t)
    out = {}
    for path, ts in by_file.items():
        with open(path, "rb") as f:
            for t in sorted(ts, key=lambda t: t.offset):
                n = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
                f.seek(t.offset)
                out[t.name] = f.read(n)
                if len(out[t.name]) != n:
                    raise CheckpointError(f"tensor {t.name!r}: file ended early (truncated "
                                          "while reading)", code="LT401", path=path)
    return out


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

