"""``resize``: truncate each module's rank by SVD in factored form (spec/lowrank.md).

Per module, delta = s * B @ A is factored by ``linalg.CoreSVD`` (thin QR of B and A^T, SVD
of the r x r core, fp64); a rank rule picks k; the module is rebuilt as the best rank-k
approximation of its delta with balanced factors. Alpha and the scaling rule of every module
are kept: the change of scale alpha/r -> alpha/k is folded into the factors. A module whose
rank does not change is copied bit for bit.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OperationError, TensorError
from ..experts import is_experts
from ..format import scale_for
from ..model import Adapter, LoraModule

# progress(n, total): n more bytes of module tensors done, out of total (as merge's).
Progress = Callable[[int, int], None]


@dataclass
class LowRankResult:
    """What ``resize`` and ``compose`` return: the new adapter and a JSON-ready report.

    It unpacks like a tuple: ``adapter, report = loratool.resize(path, rank=16)``.
    """

    adapter: Adapter
    report: dict

    def __iter__(self):
        return iter((self.adapter, self.report))


def load_input(adapter_or_path, options: dict) -> tuple[Adapter, str]:
    """An ``Adapter`` and a label for reports: paths are loaded with ``load_adapter``."""
    if isinstance(adapter_or_path, Adapter):
        return adapter_or_path, "<adapter>"
    if isinstance(adapter_or_path, (str, os.PathLike)):
        from ..adapter import load_adapter
        path = os.fspath(adapter_or_path)
        return load_adapter(path, **options), path
    from ..errors import OperationError
    raise OperationError(f"expected an Adapter or a path, got {type(adapter_or_path).__name__}",
                         code="LT520")


def check_output(output, overwrite: bool, inputs) -> str | None:
    """Before any work: LT502 if ``output`` is a file an input reads, LT503 if it exists and
    not ``overwrite``, LT504 if its directory is missing or read-only."""
    if output is None:
        return None
    from ..atomic import check_destination
    output = os.fspath(output)
    check_destination(output, overwrite=overwrite, inputs=list(inputs))
    return output


def write_output(result: LowRankResult, output: str | None, overwrite: bool) -> LowRankResult:
    """Save ``result.adapter`` atomically to ``output`` (loratool format) and record
    ``output`` and the written ``tensor_hash`` in the report."""
    result.report["output"] = output
    if output is not None:
        from ..adapter import save_adapter
        result.report["tensor_hash"] = save_adapter(result.adapter, output, overwrite=overwrite)
    return result


def byte_progress(progress: Progress | None, total: int) -> Callable[[int], None]:
    """``progress`` bound to ``total``: called with each module's bytes."""
    if progress is None:
        return lambda n: None
    return lambda n: progress(n, total)


def refuse_dora(adapter: Adapter, label: str, operation: str) -> None:
    """Modules whose factors are not one plain low-rank delta are refused with LT531: DoRA
    (not additive: not linear in the factors) and LoRA on a parameter (per-expert factors:
    resizing or composing them as one matrix would be wrong)."""
    for refused, what in (
            (is_experts,
             "is a LoRA on a parameter (PEFT target_parameters, one low-rank delta per "
             f"expert): it cannot be {operation} yet"),
            (lambda m: not m.variant.additive,
             "is DoRA (has lora_magnitude): its update renormalizes the whole base weight, "
             f"so it cannot be {operation} in factored form")):
        names = [n for n, m in adapter.modules.items() if refused(m)]
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise OperationError(f"module {names[0]!r}{more} of {label} {what}; merge it into "
                                 "the base with `loratool merge` instead", code="LT531",
                                 module=names[0])


def all_finite(t) -> bool:
    """No NaN/Inf in ``t``. A finite fp64 sum proves it without the bool tensor of
    ``isfinite`` (NaN and Inf propagate into the sum); only an infinite sum needs a look."""
    import torch
    if math.isfinite(float(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


def refuse_nonfinite(m: LoraModule, label: str) -> None:
    """Adapters passed as objects skip load_adapter's NaN/Inf check (LT209): do it here."""
    for role, t in (("lora_A", m.A), ("lora_B", m.B), ("lora_bias", m.bias)):
        if t is not None and not all_finite(t):
            raise TensorError(f"module {m.name!r} of {label}: {role} holds NaN or Inf values",
                              code="LT209", module=m.name)


def output_dtype(*tensors):
    """The widest dtype among tensors (bf16 with f16 gives f32), as torch promotes them."""
    import torch
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def rebuild(template: LoraModule, B2, A2, *, alpha: float, scaling: str, dtype, bias=None,
            ) -> LoraModule:
    """A module of ``template``'s kind/layout/shape from 2-D factors, rounded once to ``dtype``.

    Raises LT535 if a value does not fit ``dtype`` (float16 overflow).
    """
    k = int(A2.shape[0])
    from ..tensors import round_once
    A = round_once(A2.reshape(k, *template.A.shape[1:]), dtype)
    B = round_once(B2.reshape(B2.shape[0], k, *template.B.shape[2:]), dtype)
    new_bias = None if bias is None else round_once(bias, dtype)
    for role, t in (("lora_B", B), ("lora_A", A), ("lora_bias", new_bias)):
        if t is not None and not all_finite(t):
            raise OperationError(
                f"module {template.name!r}: the new {role} does not fit "
                f"{str(dtype).removeprefix('torch.')} (overflow); use a float32 copy of the "
                "input adapter (its tensors cast with .float())",
                code="LT535", module=template.name)
    return LoraModule(template.name, template.kind, template.layout, A, B, float(alpha),
                      scaling, None, new_bias)


def module_bytes(m: LoraModule) -> int:
    return sum(t.numel() * t.element_size() for t in (m.A, m.B, m.magnitude, m.bias)
               if t is not None)


def module_limit(m: LoraModule, rank: int) -> int:
    """The largest rank a delta of this module's shape can have given ``rank`` factors."""
    out, cols = m.info.delta_shape
    return min(rank, out, cols)


def resize(adapter: Adapter | str | os.PathLike, *, rank: int | None = None,
           fro: float | None = None, sv_ratio: float | None = None,
           cumulative: float | None = None, max_rank: int | None = None,
           min_rank: int | None = None, output: str | os.PathLike | None = None,
           overwrite: bool = False, progress: Progress | None = None,
           **options) -> LowRankResult:
    """Truncate every module to the rank a rule selects; exact in factored form.

    Exactly one rule: ``rank`` (fixed K), ``fro`` (fraction F of the Frobenius norm),
    ``sv_ratio`` (keep s_i >= s_max / R) or ``cumulative`` (fraction C of the sum of singular
    values); ``max_rank``/``min_rank`` clamp the result. See spec/lowrank.md for the exact
    boundary conventions. ``adapter`` is an ``Adapter`` or a path of any format (``options``
    go to ``load_adapter``). ``output``: also write the new adapter there (loratool format,
    atomically; refused before any work if it is a file the input reads, or exists without
    ``overwrite``); the report then has its ``tensor_hash``. ``progress(n, total)`` is
    called after each module with its bytes ``n`` of the inputs' ``total``.

    >>> new, report = resize("examples/adapter.safetensors", fro=0.95, max_rank=32)
    >>> report["summary"]["parameters_before"], report["summary"]["parameters_after"]
    (8192, 6912)
    """
    import torch

    from ..linalg import check_rank_rule, select_rank
    rule = dict(rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative)
    check_rank_rule(**rule, max_rank=max_rank, min_rank=min_rank)
    output = check_output(output, overwrite, [adapter])
    source, label = load_input(adapter, options)
    refuse_dora(source, label, "resized")
    done = byte_progress(progress, sum(module_bytes(m) for m in source.modules.values()))
    modules: dict[str, LoraModule] = {}
    rows = []
    for name, m in source.modules.items():
        svd = _core_svd(m, label)
        choice = select_rank(svd.S, module_limit(m, m.rank), **rule, max_rank=max_rank,
                             min_rank=min_rank)
        k = choice.rank
        if k == m.rank:
            new = m  # same rank: copied bit for bit, no rounding
        else:
            new_scale = scale_for(m.alpha, k, m.scaling)
            B_new, A_new = svd.factors(k, new_scale)
            bias = None
            if m.bias is not None:
                bias = m.bias.to(torch.float64) * (m.scale / new_scale)
            new = rebuild(m, B_new, A_new, alpha=m.alpha, scaling=m.scaling,
                          dtype=output_dtype(m.A, m.B), bias=bias)
        modules[name] = new
        rows.append(_row(m, new, svd, choice))
        done(module_bytes(m))
    out = Adapter(modules=modules, alpha=source.alpha, base_model=source.base_model,
                  init=getattr(source, "init", None),
                  base_model_hash=source.base_model_hash,
                  provenance=_provenance(source.provenance, rule, max_rank, min_rank),
                  extra_metadata=dict(source.extra_metadata),
                  replacements=dict(source.replacements))  # not low rank: kept as they are
    given = {k: v for k, v in rule.items() if v is not None}
    given.update({k: v for k, v in (("max_rank", max_rank), ("min_rank", min_rank))
                  if v is not None})
    report = {"input": label, "rule": given, "modules": rows,
              "summary": _summary(source, out, rows)}
    return write_output(LowRankResult(out, report), output, overwrite)


def _core_svd(m: LoraModule, label: str):
    """The kernel on one module; NaN/Inf inputs surface as LT209 (checked only on failure:
    they make the singular values non-finite, so finite inputs pay nothing for the check)."""
    import torch

    from ..linalg import CoreSVD
    if m.bias is not None and not all_finite(m.bias):
        refuse_nonfinite(m, label)
    try:
        svd = CoreSVD(*m.factors(), m.scale)
        if bool(torch.isfinite(svd.S).all()):
            return svd
    except torch.linalg.LinAlgError:
        pass
    refuse_nonfinite(m, label)
    raise OperationError(f"module {m.name!r} of {label}: its delta overflows float64; the "
                         "factors hold absurdly large values", code="LT535", module=m.name)


def _row(old: LoraModule, new: LoraModule, svd, choice) -> dict:
    k = new.rank
    S = svd.S
    return {
        "name": old.name, "kind": old.kind, "delta_shape": list(old.info.delta_shape),
        "dtype": old.info.dtype, "old_rank": old.rank, "new_rank": k,
        "rule_rank": choice.rule_rank, "limit": choice.limit, "clamped": choice.clamped,
        "unchanged": new is old, "norm": _norm(S),
        "retained": svd.retained(k), "residual": svd.residual(k),
        "sv_max": float(S[0]) if S.numel() else 0.0,
        "sv_last_kept": float(S[k - 1]) if S.numel() >= k else 0.0,
        "sv_first_dropped": float(S[k]) if S.numel() > k else None,
    }


def _norm(S) -> float:
    return float((S * S).sum()) ** 0.5


def _summary(source: Adapter, out: Adapter, rows: list[dict]) -> dict:
    total = sum(r["norm"] ** 2 for r in rows)
    dropped = sum((r["norm"] * r["residual"]) ** 2 for r in rows)
    return {
        "modules": len(rows),
        "resized": sum(1 for r in rows if not r["unchanged"]),
        "unchanged": sum(1 for r in rows if r["unchanged"]),
        "clamped": sum(1 for r in rows if r["clamped"]),
        "ranks_before": _histogram(r["old_rank"] for r in rows),
        "ranks_after": _histogram(r["new_rank"] for r in rows),
        "parameters_before": sum(m.info.parameters for m in source.modules.values()),
        "parameters_after": sum(m.info.parameters for m in out.modules.values()),
        "retained_min": min((r["retained"] for r in rows), default=1.0),
        "retained_overall": 1.0 if total == 0 else math.sqrt(max(0.0, 1 - dropped / total)),
        "residual_overall": 0.0 if total == 0 else math.sqrt(dropped / total),
    }


def _histogram(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def _provenance(previous: str | None, rule: dict, max_rank, min_rank) -> str:
    from .. import __version__
    args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                    (*rule.items(), ("max_rank", max_rank), ("min_rank", min_rank))
                    if v is not None)
    text = f"loratool {__version__} resize {args}"
    return f"{previous}; {text}" if previous else text


def most_common_rank(modules: dict[str, LoraModule]) -> int:
    """The rank most modules have (ties: the larger), used as the adapter's default alpha."""
    counts = Counter(m.rank for m in modules.values())
    if not counts:
        return 1
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


__all__ = ["resize", "LowRankResult"]
