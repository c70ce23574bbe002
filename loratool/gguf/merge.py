"""Merging low-rank deltas into a GGUF base, one tensor at a time.

Per adapted tensor: W = dequantize(base) in float64 (exact: every GGML value is a float32),
delta = sum of scale * B @ A in float64 (transposed for token_embd), and the output is
``encode(W + delta, type)`` (``numerics``: rounded once). Tensors without a delta are
copied byte for byte. All metadata is kept (a split base's ``split.*`` keys dropped: the
output is one file) and the tensor order is the base's.

Retained delta, per tensor and overall (spec/gguf.md; ``loratool.retained``): with
eff = decode(out) - W, ``retained = ||eff|| / ||delta||``, ``kept = <eff, delta> /
||delta||^2`` and ``rel_error = ||eff - delta|| / ||delta||``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InteropError
from ..retained import RetainedDelta, TensorMerge
from . import codes as C
from ._dep import require_gguf
from ._io import atomic_path
from .adapter import EMBEDDING, KIND_EMBEDDING, LoraFactors
from .container import GGUFHeader, read_gguf, tensor_data
from .names import ArchInfo, arch_from_gguf, hf_to_gguf_names, to_gguf_b
from .numerics import decode, encode, qtype, writable_types

KEEP = "keep"


@dataclass(frozen=True)
class MergeReport:
    path: str
    tensors: list[TensorMerge]
    copied: int                 # tensors copied unchanged
    retained: float | None      # overall, from the sums over tensors
    kept: float | None
    rel_error: float | None
    parts: list[str] = field(default_factory=list)  # the base files read


def plan_merge(header: GGUFHeader, factors: Sequence[LoraFactors], *,
               arch: ArchInfo | None = None, names: str = "hf", out_type: str = KEEP
               ) -> tuple[dict[str, list[LoraFactors]], dict[str, str]]:
    """Check everything before anything is written: returns the factors per GGUF tensor
    (B in GGUF row order) and the output type per adapted tensor. Raises LT327-LT331."""
    arch = arch or arch_from_gguf(header)
    if names == "hf":
        gnames = hf_to_gguf_names([f.name for f in factors], arch.arch)
    elif names == "gguf":
        gnames = {f.name: f.name for f in factors}
    else:
        raise ValueError(f"names must be 'hf' or 'gguf', not {names!r}")
    groups: dict[str, list[LoraFactors]] = {}
    bad = []
    for f in factors:
        g = gnames[f.name]
        t = header.tensors.get(g)
        B = to_gguf_b(np.asarray(f.B), g, arch) if names == "hf" else np.asarray(f.B)
        delta_shape = (B.shape[0], f.A.shape[1])
        if f.kind == KIND_EMBEDDING or g == EMBEDDING:
            delta_shape = delta_shape[::-1]
        if t is None:
            bad.append(f"{f.name} -> {g}: not in the base")
        elif t.shape != delta_shape or f.A.shape[0] != B.shape[1]:
            bad.append(f"{f.name} -> {g}: base {t.shape}, delta {delta_shape}")
        elif not (math.isfinite(f.scale) and np.isfinite(f.A).all() and np.isfinite(B).all()):
            raise InteropError(f"module {f.name}: scale or factors are not finite",
                               code=C.GGUF_NONFINITE)
        else:
            groups.setdefault(g, []).append(LoraFactors(g, f.A, B, f.scale, f.kind))
    if bad:
        raise InteropError(f"{len(bad)} module(s) do not fit the base: " + "; ".join(bad[:10]),
                           code=C.GGUF_BASE_MISMATCH, path=header.path)
    types, refused = {}, []
    gguf = require_gguf()
    for g in groups:
        t = header.tensors[g]
        target = t.type_name if out_type.lower() == KEEP else qtype(out_type).name
        block = gguf.GGML_QUANT_SIZES[qtype(target)][0]
        if target not in writable_types() or t.ne[0] % block:
            refused.append(f"{g} ({target})")
        types[g] = target
    if refused:
        raise InteropError(f"gguf cannot write {len(refused)} merged tensor(s) in their type: "
                           + ", ".join(refused[:10]) + "; pass an output type: "
                           + ", ".join(t.lower() for t in writable_types()),
                           code=C.GGUF_OUT_TYPE, path=header.path)
    return groups, types


def _delta(fs: Sequence[LoraFactors], shape) -> np.ndarray:
    d = np.zeros(shape, dtype=np.float64)
    for f in fs:
        m = (np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64)) * f.scale
        d += m.T if f.kind == KIND_EMBEDDING or f.name == EMBEDDING else m
    return d


def merge_gguf(base: str | os.PathLike, out: str | os.PathLike,
               factors: Sequence[LoraFactors], *, arch: ArchInfo | None = None,
               names: str = "hf", out_type: str = KEEP, overwrite: bool = False
               ) -> MergeReport:
    """Merge ``factors`` into the GGUF ``base`` (a file or any part of a split set) and
    write one GGUF file ``out`` atomically.

    ``names``: "hf" (HF module names, B in HF row order; ``arch`` defaults to the base's) or
    "gguf" (GGUF tensor names, B already in GGUF row order, as ``read_gguf_adapter(...,
    hf_names=False)`` returns). ``out_type``: "keep" (each merged tensor in its base type,
    refused where gguf cannot quantize it) or a GGML type name for every merged tensor.
    """
    gguf = require_gguf()
    out = os.fspath(out)
    header = read_gguf(base)
    groups, types = plan_merge(header, factors, arch=arch, names=names, out_type=out_type)
    arch_name = header.get("general.architecture")
    if not isinstance(arch_name, str):
        raise InteropError("general.architecture is missing", code=C.GGUF_ARCH,
                           path=header.path)
    stats = RetainedDelta()
    with atomic_path(out, overwrite=overwrite, inputs=header.parts) as tmp:
        w = gguf.GGUFWriter(tmp, arch_name)
        w.data_alignment = header.alignment
        for key, kv in header.kv.items():
            if key == "general.architecture":
                continue
            value = kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value
            if kv.vtype == 9 and len(value) == 0:
                raise InteropError(f"metadata {key!r} is an empty array, which gguf cannot "
                                   "write", code=C.GGUF_BAD_KV, path=header.path)
            w.add_key_value(key, value, gguf.GGUFValueType(kv.vtype),
                            None if kv.sub_type is None else gguf.GGUFValueType(kv.sub_type))
        for name, t in header.tensors.items():
            tt = qtype(types.get(name, t.type_name))
            shape = gguf.quants.quant_shape_to_byte_shape(t.shape, tt)
            nbytes = int(np.prod(shape))
            w.add_tensor_info(name, shape, np.dtype(np.uint8), nbytes, raw_dtype=tt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, t in header.tensors.items():
            raw = tensor_data(t)
            if name not in groups:
                w.write_tensor_data(np.asarray(raw).view(np.uint8).reshape(-1))
                continue
            W = decode(raw, t.type_name)
            d = _delta(groups[name], W.shape)
            data = encode(W + d, types[name], what=name)
            stats.add(name, t.type_name, types[name], decode(data, types[name]) - W, d)
            w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        w.close()
    return MergeReport(out, stats.tensors, len(header.tensors) - len(stats.tensors),
                       *stats.overall(), list(header.parts))
