"""GGUF LoRA adapters (llama.cpp's format): write from plain factors, read back.

Layout (llama.cpp ``src/llama-adapter.cpp``): tensors ``<gguf name>.lora_a`` and
``.lora_b``; numpy shapes A (r, in) and B (out, r), i.e. GGUF ne [in, r] and [r, out];
``token_embd.weight`` stores A transposed, (num_embeddings, r). llama.cpp applies
``scale = user_scale * alpha / r`` when ``adapter.lora.alpha`` != 0, else ``user_scale``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..errors import InteropError
from . import codes as C
from ._dep import require_gguf
from ._io import atomic_path
from .container import GGUFHeader, read_gguf_header, tensor_data
from .names import ArchInfo, from_gguf_b, gguf_to_hf_names, hf_to_gguf_names, to_gguf_b
from .numerics import decode, encode

ADAPTER_OUT_TYPES = ("F32", "F16", "BF16", "Q8_0")
EMBEDDING = "token_embd.weight"
KIND_LINEAR, KIND_EMBEDDING = "linear", "embedding"
SCALE_GLOBAL_ALPHA, SCALE_BAKED = "global_alpha", "baked"


@dataclass(frozen=True)
class LoraFactors:
    """One module in loratool's canonical layout: delta = scale * B @ A, A (r, in),
    B (out, r); for embeddings in = num_embeddings, out = dim and the base ``W[num, dim]``
    gets delta.T. ``name`` is an HF module name, or a GGUF tensor name where a function
    says so (then B is in GGUF row order)."""

    name: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    kind: str = KIND_LINEAR

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class GGUFAdapterModule:
    name: str            # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    kind: str
    rank: int
    in_features: int
    out_features: int
    a_type: str
    b_type: str


@dataclass(frozen=True)
class GGUFAdapterInfo:
    path: str
    architecture: str
    alpha: float
    modules: dict[str, GGUFAdapterModule]
    skipped: list[str] = field(default_factory=list)  # norm deltas llama.cpp ignores too
    metadata: dict[str, object] = field(default_factory=dict)  # every other KV value

    def scale(self, module: str) -> float:
        """The scale llama.cpp applies at user scale 1 (computed in float64)."""
        return self.alpha / self.modules[module].rank if self.alpha else 1.0


@dataclass(frozen=True)
class WriteReport:
    path: str
    alpha: float
    scale_encoding: str                 # "global_alpha" or "baked"
    tensor_types: dict[str, str]        # tensor name -> GGML type written
    fallbacks: list[str]                # tensors written F16 because rows do not fit Q8_0
    names: dict[str, str]               # module -> GGUF tensor name


def unsupported_reason(tensor_name: str) -> str | None:
    """Why a PEFT/loratool tensor cannot go into a GGUF LoRA, or None when it can."""
    n = tensor_name
    if "lora_magnitude" in n:
        return ("DoRA magnitude: the DoRA delta depends on the base weight's column norms and "
                "llama.cpp applies only B @ A; merge it into the base instead")
    if n.endswith((".lora_B.bias", ".lora_bias", "lora_B.default.bias")):
        return "lora_B bias: llama.cpp LoRA adapters have no bias tensors; merge it instead"
    if ".lora_A" in n or ".lora_B" in n or "lora_embedding_" in n:
        return None
    return ("full tensor (modules_to_save or a non-LoRA weight): llama.cpp adapters hold "
            "only lora_a/lora_b pairs; merge it into the base instead")


def refuse_unsupported(tensor_names) -> None:
    """LT329 listing every tensor a GGUF LoRA cannot hold, each with its reason."""
    bad = [(n, r) for n in tensor_names if (r := unsupported_reason(n))]
    if bad:
        raise InteropError(f"{len(bad)} tensor(s) cannot be written to a GGUF LoRA: "
                           + "; ".join(f"{n}: {r}" for n, r in bad[:10]),
                           code=C.GGUF_UNSUPPORTED)


def _check_factor(f: LoraFactors) -> None:
    if f.kind not in (KIND_LINEAR, KIND_EMBEDDING):
        raise InteropError(f"module {f.name}: kind {f.kind!r} cannot be written to a GGUF LoRA "
                           "(llama.cpp adapts only linear and token-embedding weights)",
                           code=C.GGUF_UNSUPPORTED)
    if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1] or f.A.shape[0] < 1:
        raise InteropError(f"module {f.name}: A {tuple(f.A.shape)} and B {tuple(f.B.shape)} "
                           "are not (r, in) and (out, r)", code=C.GGUF_BAD_PAIR)
    if not (math.isfinite(f.scale) and f.scale != 0):
        raise InteropError(f"module {f.name}: scale {f.scale!r} is not finite and non-zero",
                           code=C.GGUF_SCALE)
    if not (np.isfinite(f.A).all() and np.isfinite(f.B).all()):
        raise InteropError(f"module {f.name}: factors hold NaN or Inf", code=C.GGUF_NONFINITE)


def global_alpha(factors: Sequence[LoraFactors]) -> float | None:
    """One float32 alpha with alpha / r == scale exactly for every module, both in float64
    (our readers) and in float32 (llama.cpp's ``get_scale``); None when there is none."""
    if not factors:
        return None
    alpha = np.float32(factors[0].scale * factors[0].rank)
    if not np.isfinite(alpha) or alpha == 0:
        return None
    for f in factors:
        r = f.rank
        if float(alpha) / r != f.scale or float(alpha / np.float32(r)) != f.scale:
            return None
    return float(alpha)


def write_gguf_adapter(path: str | os.PathLike, factors: Sequence[LoraFactors],
                       arch: ArchInfo, *, out_type: str = "F32", overwrite: bool = False,
                       metadata: Mapping[str, str] | None = None,
                       inputs: Sequence[str] = ()) -> WriteReport:
    """Write a llama.cpp LoRA adapter. ``factors`` carry HF module names.

    Scales: one global ``adapter.lora.alpha`` when it reproduces every module's scale
    exactly (B stored as given, rounded once to ``out_type``); otherwise alpha = 0 and each
    module's scale is multiplied into B in float64 and rounded once. ``out_type``: F32, F16,
    BF16 or Q8_0 (Q8_0 tensors whose rows are not a multiple of 32 are written F16 and
    listed in ``fallbacks``).
    """
    gguf = require_gguf()
    path = os.fspath(path)
    out_type = out_type.upper()
    if out_type not in ADAPTER_OUT_TYPES:
        raise InteropError(f"GGUF LoRA output type {out_type!r}; choose one of "
                           + ", ".join(t.lower() for t in ADAPTER_OUT_TYPES),
                           code=C.GGUF_OUT_TYPE)
    if not factors:
        raise InteropError("no modules to write", code=C.GGUF_BAD_PAIR)
    for f in factors:
        _check_factor(f)
    names = hf_to_gguf_names([f.name for f in factors], arch.arch)
    alpha = global_alpha(factors)
    encoding = SCALE_GLOBAL_ALPHA if alpha is not None else SCALE_BAKED
    tensors: list[tuple[str, np.ndarray, str]] = []
    fallbacks: list[str] = []
    for f in factors:
        g = names[f.name]
        if (g == EMBEDDING) != (f.kind == KIND_EMBEDDING):
            raise InteropError(f"module {f.name} ({f.kind}) maps to {g}: only token_embd "
                               "takes an embedding delta in llama.cpp", code=C.GGUF_UNSUPPORTED)
        A = np.asarray(f.A, dtype=np.float64)
        B = np.asarray(f.B, dtype=np.float64)
        if alpha is None:
            B = B * f.scale
        B = to_gguf_b(B, g, arch)
        if f.kind == KIND_EMBEDDING:
            A = A.T
        for suffix, x in ((".lora_a", A), (".lora_b", B)):
            t = out_type
            if t == "Q8_0" and x.shape[-1] % 32:
                t = "F16"
                fallbacks.append(g + suffix)
            tensors.append((g + suffix, encode(x, t, what=f"{f.name}{suffix}"), t))
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        w = gguf.GGUFWriter(tmp, arch.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha or 0.0)
        for k, v in (metadata or {}).items():
            w.add_string(k, v)
        for name, data, t in tensors:
            raw = None if t in ("F32", "F16") else gguf.GGMLQuantizationType[t]
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return WriteReport(path, alpha or 0.0, encoding, {n: t for n, _, t in tensors}, fallbacks,
                       dict(names))


def _adapter_header(header: GGUFHeader) -> GGUFAdapterInfo:
    path = header.path
    if header.get("general.type") != "adapter" or header.get("adapter.type") != "lora":
        raise InteropError("not a GGUF LoRA adapter (general.type must be \"adapter\" and "
                           "adapter.type \"lora\")", code=C.GGUF_NOT_ADAPTER, path=path)
    alpha = header.get("adapter.lora.alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha):
        raise InteropError(f"adapter.lora.alpha {alpha!r} is not a finite number",
                           code=C.GGUF_NOT_ADAPTER, path=path)
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise InteropError("general.architecture is missing", code=C.GGUF_ARCH, path=path)
    pairs: dict[str, dict[str, object]] = {}
    skipped, unknown = [], []
    for name, t in header.tensors.items():
        base, dot, suffix = name.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[suffix] = t
        elif name.endswith("_norm.weight"):
            skipped.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise InteropError(f"tensors without a .lora_a/.lora_b suffix (llama.cpp refuses them): "
                           + ", ".join(unknown[:10]), code=C.GGUF_BAD_PAIR, path=path)
    modules = {}
    for base, p in pairs.items():
        if set(p) != {"lora_a", "lora_b"}:
            raise InteropError(f"{base}: has {'/'.join(sorted(p))} but not both lora_a and "
                               "lora_b", code=C.GGUF_BAD_PAIR, path=path)
        a, b = p["lora_a"], p["lora_b"]
        if len(a.ne) != 2 or len(b.ne) != 2:
            raise InteropError(f"{base}: only 2-D lora_a/lora_b are supported (3-D expert "
                               "adapters are not)", code=C.GGUF_BAD_PAIR, path=path)
        emb = base == EMBEDDING
        r_a = a.ne[0] if emb else a.ne[1]
        if r_a != b.ne[0]:
            raise InteropError(f"{base}: lora_a has rank {r_a} but lora_b has rank {b.ne[0]}",
                               code=C.GGUF_BAD_PAIR, path=path)
        n_in = a.ne[1] if emb else a.ne[0]
        modules[base] = GGUFAdapterModule(base, KIND_EMBEDDING if emb else KIND_LINEAR,
                                          int(b.ne[0]), int(n_in), int(b.ne[1]), a.type_name,
                                          b.type_name)
    if not modules:
        raise InteropError("the adapter holds no lora_a/lora_b pairs", code=C.GGUF_BAD_PAIR,
                           path=path)
    meta = {k: v.value for k, v in header.kv.items()
            if k not in ("general.architecture", "general.type", "adapter.type",
                         "adapter.lora.alpha")}
    return GGUFAdapterInfo(path, arch, float(alpha), modules, skipped, meta)


def read_gguf_adapter_info(path: str | os.PathLike) -> GGUFAdapterInfo:
    """Header-only description of a GGUF LoRA (torch-free; reads no tensor data)."""
    return _adapter_header(read_gguf_header(path))


def _stored_array(t) -> np.ndarray:
    """Tensor values in the narrowest numpy dtype that holds them exactly."""
    data = tensor_data(t)
    if t.type_name in ("F32", "F16"):
        return np.array(data)
    return decode(data, t.type_name).astype(np.float32)  # exact: every GGML type is <= f32


def read_gguf_adapter(path: str | os.PathLike, *, arch: ArchInfo | None = None,
                      hf_names: bool = True, candidates=None
                      ) -> tuple[GGUFAdapterInfo, list[LoraFactors]]:
    """Read a GGUF LoRA's factors back into the canonical layout.

    ``hf_names``: map names back to HF modules (``candidates``: the base's module names, see
    ``gguf_to_hf_names``) and undo the q/k permutation, which needs ``arch`` with head counts
    for permuting architectures. ``hf_names=False`` keeps GGUF names and row order.
    Each factor's scale is alpha / r, or 1 when alpha is 0 (the scale is then in B).
    """
    header = read_gguf_header(path)
    info = _adapter_header(header)
    arch = arch or ArchInfo(info.architecture)
    if arch.arch != info.architecture:
        raise InteropError(f"adapter is for {info.architecture!r}, not {arch.arch!r}",
                           code=C.GGUF_ARCH, path=info.path)
    hf = gguf_to_hf_names(info.modules, arch.arch, candidates) if hf_names else None
    out = []
    for g, m in info.modules.items():
        A = _stored_array(header.tensors[g + ".lora_a"])
        B = _stored_array(header.tensors[g + ".lora_b"])
        if m.kind == KIND_EMBEDDING:
            A = np.ascontiguousarray(A.T)
        if hf is not None:
            B = from_gguf_b(B, g, arch)
        out.append(LoraFactors(hf[g] if hf else g, A, np.ascontiguousarray(B), info.scale(g),
                               m.kind))
    return info, out
