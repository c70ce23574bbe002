"""``inspect``: what an adapter is, from its header (fast) or with statistics (reads tensors)."""

from __future__ import annotations

import os
from collections import Counter

from ..experts import is_experts
from ..model import Adapter, AdapterInfo, ModuleInfo

EPS = {"F16": 2.0**-10, "BF16": 2.0**-7, "F32": 2.0**-23, "F64": 2.0**-52}


def inspect(path: str | os.PathLike, *, stats: bool = False, base: str | os.PathLike | None = None,
            seed: int = 0, **options) -> dict:
    """Describe an adapter (any format) as a JSON-ready dict.

    Without ``stats`` only the header is read and torch is not imported. With ``stats`` each
    module also gets the Frobenius norm and singular values of its delta (factored form) and
    flags for an all-zero B or NaN/Inf values. With ``base`` (a checkpoint, streamed) each
    module also gets the LoRA paper's ``amplification`` analysis against its base weight, with
    a random baseline drawn from ``seed`` (``ops.amplification``).

    >>> inspect("examples/adapter.safetensors")["totals"]["modules"]
    8
    """
    from ..adapter import read_adapter_info
    from ..errors import LoraToolError, OperationError
    from .merge.provenance import checkpoint_report, merged_checkpoint_report
    if isinstance(path, Adapter):
        if base is not None:
            raise OperationError("base= (--base) needs the adapter as a path", code="LT536")
        report = _report(_info_of(path))
        if stats:
            _add_stats(report, path, options)
        return report
    path = os.fspath(path)
    merged = merged_checkpoint_report(path)  # a base checkpoint written by `loratool merge`
    if merged is not None:
        if base is not None:
            raise OperationError(f"{path} is a merged checkpoint, not an adapter: base= "
                                 "(--base) analyzes an adapter against its base", code="LT536")
        return merged
    read_options = options
    if base is not None:  # foreign formats then read names and layouts against the base
        from .amplification import reading_options
        read_options = reading_options(path, base, options)
    try:
        info = read_adapter_info(path, **read_options)
    except LoraToolError:
        # A plain model checkpoint (no adapter metadata, no adapter tensor names): describe
        # it as one; anything else keeps its reader's error.
        plain = checkpoint_report(path) if base is None and not stats else None
        if plain is None:
            raise
        return plain
    report = _report(info)
    if stats:
        _add_stats(report, path, read_options)
    if base is not None:
        from .amplification import add_amplification
        add_amplification(report, path, base, seed, options)
    return report


def _info_of(adapter: Adapter) -> AdapterInfo:
    """The header facts of an in-memory adapter (what ``read_adapter_info`` gives a file)."""
    modules = {n: m.info for n, m in adapter.modules.items()}
    nbytes = sum(t.numel() * t.element_size() for m in adapter.modules.values()
                 for t in (m.A, m.B, m.magnitude, m.bias) if t is not None)
    return AdapterInfo(path="<in memory>", format_version=None, modules=modules,
                       tensor_bytes=nbytes, alpha=adapter.alpha,
                       base_model=adapter.base_model, base_model_hash=adapter.base_model_hash,
                       provenance=adapter.provenance,
                       extra_metadata=dict(adapter.extra_metadata),
                       source_format=adapter.source_format)


def _module_row(m: ModuleInfo) -> dict:
    row = {
        "name": m.name, "kind": m.kind, "layout": m.layout, "in": m.in_features,
        "out": m.out_features, "kernel": list(m.kernel), "rank": m.rank, "alpha": m.alpha,
        "scaling": m.scaling, "scale": m.scale, "dtype": m.dtype, "dora": m.magnitude,
        "bias": m.bias, "parameters": m.parameters,
    }
    if is_experts(m):  # a LoRA on a parameter (PEFT target_parameters)
        row["experts"], row["parameter"] = m.experts, m.parameter or None
    if getattr(m, "lycoris", None):  # family, its ranks, the plain-LoRA rank (lycoris.md)
        row["lycoris"] = m.lycoris
    return row


def _report(info: AdapterInfo) -> dict:
    modules = list(info.modules.values())
    dtypes = Counter(m.dtype for m in modules)
    report = {
        "path": info.path,
        "source_format": info.source_format,
        "format_version": info.format_version,
        "base_model": info.base_model,
        "base_model_hash": info.base_model_hash,
        "provenance": info.provenance,
        "scaling": info.scaling,
        "alpha": info.alpha,
        "tensor_hash": info.tensor_hash,
        "totals": {
            "modules": len(modules),
            "parameters": sum(m.parameters for m in modules),
            "bytes": info.tensor_bytes,
            "dtypes": dict(sorted(dtypes.items())),
            "ranks": sorted({m.rank for m in modules}),
            "kinds": dict(sorted(Counter(m.kind for m in modules).items())),
        },
        "modules": [_module_row(m) for m in modules],
        "details": info.details,
        "other_metadata": dict(sorted(info.extra_metadata.items())),
    }
    if info.replacements:  # format 1.1; absent otherwise, so 1.0 reports stay as they were
        report["totals"]["replacements"] = len(info.replacements)
        report["replacements"] = [r.to_dict() for r in info.replacements.values()]
    if info.init:  # only when present: reports of other adapters are unchanged
        report["init"] = info.init
    return report


def _add_stats(report: dict, path: str, options: dict) -> None:
    import torch

    from ..adapter import load_adapter
    from ..linalg import frobenius_norm, numerical_rank, singular_values
    adapter = path if isinstance(path, Adapter) else load_adapter(
        path, **{**options, "check_values": False})
    for row in report["modules"]:
        m = adapter.modules[row["name"]]
        flags = []
        tensors = [t for t in (m.A, m.B, m.magnitude, m.bias) if t is not None]
        if not all(bool(t.isfinite().all()) for t in tensors):
            flags.append("nonfinite")
        if not bool(m.B.any()):
            flags.append("zero_B")
        if "nonfinite" in flags:
            row["stats"] = {"norm": None, "singular_values": [], "effective_rank": None,
                            "flags": flags}
            continue
        B2, A2 = m.factors(torch.float64)
        info = m.info
        if is_experts(info):  # per-expert deltas: no one singular spectrum
            row["stats"] = {"norm": frobenius_norm(B2, A2, m.scale), "singular_values": [],
                            "effective_rank": None, "flags": flags}
            continue
        S = singular_values(B2, A2, m.scale)
        row["stats"] = {
            "norm": frobenius_norm(B2, A2, m.scale),
            "singular_values": [float(s) for s in S],
            "effective_rank": numerical_rank(S, info.delta_shape, EPS.get(info.dtype, 2**-23)),
            "flags": flags,
        }
