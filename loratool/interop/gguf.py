"""llama.cpp GGUF LoRA adapters as a format plug-in (spec/gguf.md, spec/interop.md "GGUF").

The work is ``loratool.gguf``'s (hardened reader, names, q/k permutation, exact scales);
this module maps it to the canonical model. A GGUF adapter stores GGUF tensor names and
llama.cpp's row order: loading maps names back to HF modules and undoes the q/k
permutation of LLaMA-family models, which needs the head counts of the base (``--base``: a
GGUF base or the HF ``config.json``). Writing needs the same base for the architecture.
``inspect``/``validate`` read the header only and never import torch.
"""

from __future__ import annotations

import os

from ..errors import InteropError
from ..format import (KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, LAYOUT_OUT_IN,
                      SCALING_RSLORA, SCALING_STANDARD)
from ..model import Adapter, AdapterInfo, LoraModule, ModuleInfo
from ..rules import Finding
from ..variants import Lora
from .base import DECLARED, Capabilities, LoadResult, Probe, ReaderOptions

NAME = "gguf"
CAPABILITIES = Capabilities(
    kinds=frozenset({KIND_LINEAR, KIND_EMBEDDING}), variants=frozenset({Lora.name}),
    bias=False, rslora=True, per_module_alpha=True,  # every scale exact (alpha 0 + baked B)
    reads=frozenset({"base", "permute_qk"}),
    writes=frozenset({"base", "gguf_type", "permute_qk"}))

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
_NEEDS_BASE = ("pass --base: a GGUF base model or the base's HF config.json (base= in "
               "Python), which gives the architecture and the attention head counts")


def detect(probe: Probe) -> int:
    return DECLARED if probe.is_gguf else 0


# --- the base: architecture and head counts ------------------------------------------------

def _is_gguf_file(path: str) -> bool:
    return os.path.isfile(path) and Probe(path).is_gguf


def arch_for(base: str | None, permute_qk: bool | None = None, *, adapter_arch: str | None = None):
    """``ArchInfo`` from ``base`` (a GGUF file, a config.json, or a directory holding one);
    without a base, only the adapter's own architecture (no head counts)."""
    from dataclasses import replace

    from ..gguf import ArchInfo, arch_from_gguf, arch_from_hf_config, read_gguf
    from ._common import read_json_config
    if base is None:
        if adapter_arch is None:
            raise InteropError("writing a GGUF LoRA needs the base's architecture; "
                               + _NEEDS_BASE, code="LT327")
        return ArchInfo(adapter_arch, permute_qk=permute_qk)
    if _is_gguf_file(base):
        info = arch_from_gguf(read_gguf(base))
    else:
        cfg = os.path.join(base, "config.json") if os.path.isdir(base) else base
        if not os.path.isfile(cfg) or not cfg.endswith(".json"):
            raise InteropError(f"--base {base} is neither a GGUF file nor a config.json (or a "
                               "directory holding one); " + _NEEDS_BASE, code="LT327", path=base)
        info = arch_from_hf_config(read_json_config(cfg))
    if adapter_arch is not None and info.arch != adapter_arch:
        raise InteropError(f"the adapter is for architecture {adapter_arch!r} but --base is "
                           f"{info.arch!r}", code="LT327", path=base)
    return replace(info, permute_qk=permute_qk) if permute_qk is not None else info


# --- reading -------------------------------------------------------------------------------

def _hf_names(names, arch: str) -> dict[str, str]:
    """GGUF tensor name -> HF module name where gguf's tables give one (else the GGUF name)."""
    from ..gguf import gguf_to_hf_names
    out = {}
    for g in names:
        try:
            out.update(gguf_to_hf_names([g], arch))
        except InteropError:
            out[g] = g
    return out


def _alpha(info, rank: int) -> float:
    # alpha 0: llama.cpp's scale is 1 (the scale is baked into lora_b): alpha = r gives it
    return float(info.alpha) if info.alpha else float(rank)


def read_info(path: str, options: ReaderOptions | None = None) -> AdapterInfo:
    """Header-only description (torch-free): modules under their HF names where known."""
    from ..gguf import read_gguf_adapter_info
    info = read_gguf_adapter_info(path)
    names = _hf_names(info.modules, info.architecture)
    modules = {}
    for g, m in info.modules.items():
        emb = m.kind == KIND_EMBEDDING
        modules[names[g]] = ModuleInfo(
            names[g], KIND_EMBEDDING if emb else KIND_LINEAR,
            LAYOUT_IN_OUT if emb else LAYOUT_OUT_IN, (m.rank, m.in_features),
            (m.out_features, m.rank), _alpha(info, m.rank), SCALING_STANDARD,
            m.a_type if m.a_type == m.b_type else f"{m.a_type}/{m.b_type}")
    from ..gguf import read_gguf_header
    header = read_gguf_header(path)
    details = {"architecture": info.architecture, "adapter.lora.alpha": info.alpha,
               "scale": ("alpha / r" if info.alpha else
                         "1 (alpha 0: each module's scale is baked into lora_b)"),
               "names": (f"{sum(names[g] != g for g in names)} of {len(names)} mapped from "
                         "GGUF tensor names to HF modules")}
    if info.skipped:
        details["skipped"] = ", ".join(info.skipped) + " (norm deltas: llama.cpp ignores them)"
    meta = {k: str(v) for k, v in info.metadata.items()
            if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    return AdapterInfo(path=path, format_version=None, modules=dict(sorted(modules.items())),
                       alpha=float(info.alpha), source_format=NAME,
                       extra_metadata=meta, details=details,
                       tensor_bytes=sum(t.nbytes for t in header.tensors.values()))


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    """Factors under HF names in HF row order (the q/k permutation undone with the head
    counts of ``options.base``)."""
    import torch

    from ..gguf import read_gguf_adapter, read_gguf_adapter_info
    from ..gguf.names import is_k, is_q
    head = read_gguf_adapter_info(path)
    arch = arch_for(options.base, options.permute_qk, adapter_arch=head.architecture)
    if arch.n_head is None and any(is_q(g) or is_k(g) for g in head.modules) and arch.permutes:
        raise InteropError(f"the q/k rows of this {head.architecture!r} adapter are permuted "
                           "by llama.cpp; undoing it needs the head counts: " + _NEEDS_BASE,
                           code="LT327", path=path)
    info, factors = read_gguf_adapter(path, arch=arch)
    modules = {}
    for f in factors:
        emb = f.kind == KIND_EMBEDDING
        modules[f.name] = LoraModule(
            f.name, KIND_EMBEDDING if emb else KIND_LINEAR,
            LAYOUT_IN_OUT if emb else LAYOUT_OUT_IN, torch.from_numpy(f.A.copy()),
            torch.from_numpy(f.B.copy()), _alpha(info, f.rank), SCALING_STANDARD)
    from ._common import most_common
    alpha = float(info.alpha) or float(most_common(m.rank for m in modules.values()) or 1)
    notes = []
    if info.skipped:
        notes.append("skipped norm deltas (llama.cpp ignores them too): "
                     + ", ".join(info.skipped))
    adapter = Adapter(modules=modules, alpha=alpha, source_format=NAME)
    return LoadResult(adapter, notes, [])


def load(path: str, options: ReaderOptions) -> Adapter:
    return load_report(path, options).adapter


def validate(path: str, options: ReaderOptions, *, data: bool = True) -> list[Finding]:
    """Header rules (LT321-LT326); with ``data``, NaN/Inf (LT333) and all-zero lora_b
    (LT210). torch-free."""
    import numpy as np

    from ..gguf import read_gguf_adapter
    if not data:
        read_info(path, options)
        return []
    _, factors = read_gguf_adapter(path, hf_names=False)
    out = []
    for f in factors:
        for role, x in (("lora_a", f.A), ("lora_b", f.B)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            if bad:
                out.append(Finding("LT333", f"tensor {f.name}.{role} holds {bad} NaN/Inf "
                                            f"value(s) of {x.size}", path))
        if not np.any(f.B):
            out.append(Finding("LT210", f"tensor {f.name}.lora_b is all zeros, so its module "
                                        "changes nothing", path))
    return out


# --- writing -------------------------------------------------------------------------------

def refuse_unwritable(adapter: Adapter) -> None:
    """LT329 naming every module a GGUF LoRA cannot hold, each with the reason."""
    from ..gguf import unsupported_reason
    bad = []
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            bad.append(f"{name}: {unsupported_reason(name + '.lora_magnitude_vector')}")
        if m.bias is not None:
            bad.append(f"{name}: {unsupported_reason(name + '.lora_B.bias')}")
        if m.kind not in (KIND_LINEAR, KIND_EMBEDDING):
            bad.append(f"{name}: a {m.kind} module (llama.cpp adapts only linear and "
                       "token-embedding weights)")
    if bad:
        raise InteropError(f"{len(bad)} module(s) cannot be written to a GGUF LoRA: "
                           + "; ".join(bad[:10]), code="LT329")


def factors_of(adapter: Adapter):
    """The adapter's modules as ``loratool.gguf.LoraFactors`` (HF names, HF row order,
    float64 factors: exact for every stored dtype)."""
    from ..gguf import LoraFactors
    out = []
    for name, m in adapter.modules.items():
        B, A = m.factors()
        out.append(LoraFactors(name, A.double().numpy(), B.double().numpy(), float(m.scale),
                               KIND_EMBEDDING if m.kind == KIND_EMBEDDING else KIND_LINEAR))
    return out


def save(adapter: Adapter, path: str, options: ReaderOptions) -> list[str]:
    """Write a llama.cpp LoRA: every scale exact (one global alpha when that is exact,
    otherwise alpha 0 with the scales baked into lora_b), q/k rows permuted for LLaMA."""
    from ..gguf import write_gguf_adapter
    refuse_unwritable(adapter)
    if options.base is None:
        raise InteropError("--to gguf needs the base's architecture and head counts; "
                           + _NEEDS_BASE, code="LT327")
    out_type = (options.gguf_type or "f32").lower()
    if out_type not in OUT_TYPES:
        raise InteropError(f"GGUF adapter type {out_type!r}; choose one of "
                           + ", ".join(OUT_TYPES), code="LT330")
    arch = arch_for(options.base, options.permute_qk)
    rep = write_gguf_adapter(path, factors_of(adapter), arch, out_type=out_type.upper(),
                             overwrite=options.overwrite)
    notes = []
    if rep.scale_encoding == "baked":
        why = ("rsLoRA" if any(m.scaling == SCALING_RSLORA for m in adapter.modules.values())
               else "per-module alphas or ranks")
        notes.append(f"adapter.lora.alpha = 0 and each module's scale multiplied into lora_b "
                     f"({why}: no single alpha / r is exact); llama.cpp applies them exactly")
    if rep.fallbacks:
        notes.append(f"{len(rep.fallbacks)} tensor(s) written F16 (rows not a multiple of 32 "
                     "cannot be Q8_0): " + ", ".join(rep.fallbacks[:6]))
    return notes
