"""``compose`` (linear combinations of adapters) and ``compare`` (how two adapters relate).

compose: for every module of the union, delta = sum_i w_i * delta_i exactly, by concatenating
ranks with each scale and weight folded into B (spec/lowrank.md, "compose"); with a rank rule
the exact sum is truncated by ``linalg.CoreSVD``, which gives the best rank-k approximation
(Eckart-Young) without forming the dense sum. Output modules use scaling "standard" with
alpha = rank, so their scale is 1.

compare: per-module cosine similarity and norm ratio of the two deltas, in factored form.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable

from ..errors import OperationError
from ..guards import parse_path_number, weighted_inputs
from ..format import SCALING_STANDARD
from ..model import Adapter, LoraModule
from .resize import (LowRankResult, Progress, byte_progress, check_output, load_input,
                     module_bytes, most_common_rank, output_dtype, rebuild, refuse_dora,
                     refuse_nonfinite, write_output)

def parse_weighted(text: str) -> tuple[str, float]:
    """``"a.safetensors:0.5"`` -> ``("a.safetensors", 0.5)``; no weight means 1.0 (the CLI's
    one ``PATH:NUMBER`` syntax, ``guards.parse_path_number``; a non-finite weight is LT534)."""
    return parse_path_number(text, what="weight", code="LT534")


def _inputs(inputs, options) -> list[tuple[Adapter, float, str]]:
    """``inputs``: already through ``guards.weighted_inputs``."""
    items = []
    for i, item in enumerate(inputs):
        if isinstance(item, tuple):
            if len(item) != 2:
                raise OperationError("each input is an adapter/path or an (adapter/path, weight) "
                                     "pair", code="LT534")
            source, weight = item
        else:
            source, weight = item, 1.0
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(
                float(weight)):
            raise OperationError(f"weight {weight!r} of input {i + 1} must be a finite number",
                                 code="LT534")
        adapter, label = load_input(source, options)
        if label == "<adapter>":
            label = f"<adapter {i + 1}>"
        items.append((adapter, float(weight), label))
    if not items:
        raise OperationError("compose needs at least one adapter", code="LT534")
    return items


def _check_same(name: str, parts, labels) -> None:
    (i0, m0, _), rest = parts[0], parts[1:]
    for i, m, _ in rest:
        if (m.kind, m.layout) != (m0.kind, m0.layout):
            raise OperationError(
                f"module {name!r} is {m0.kind}/{m0.layout} in {labels[i0]} but "
                f"{m.kind}/{m.layout} in {labels[i]}: the deltas apply to the base differently; "
                "convert one adapter so both describe the module the same way", code="LT533",
                module=name)
        if m.info.base_shape != m0.info.base_shape:
            raise OperationError(
                f"module {name!r} has shape {list(m0.info.base_shape)} in {labels[i0]} but "
                f"{list(m.info.base_shape)} in {labels[i]}: these adapters were trained for "
                "different base models and cannot be added", code="LT532", module=name)


def compose(inputs: Iterable, *, rank: int | None = None, fro: float | None = None,
            output: str | os.PathLike | None = None, overwrite: bool = False,
            progress: Progress | None = None, **options) -> LowRankResult:
    """Weighted sum of adapters: every module's delta is ``sum_i w_i * delta_i``.

    ``inputs`` holds adapters or paths (any format, ``options`` go to ``load_adapter``), each
    bare (weight 1) or as an ``(adapter_or_path, weight)`` pair; weights may be negative.
    Without a rule the result is exact (ranks concatenate). With ``rank=K`` or ``fro=F`` each
    module is truncated to the best approximation of that rank (rules as in ``resize``).
    Modules are the union of the inputs'. Returns a ``LowRankResult`` (adapter, report).
    ``output``, ``overwrite`` and ``progress(n, total)`` as in ``resize``.

    >>> new, report = compose([("examples/adapter.safetensors", 1.0),
    ...                        ("examples/adapter_style.safetensors", 0.5)], rank=8)
    >>> report["summary"]["modules"], report["summary"]["truncated"]
    (8, 4)
    """
    import torch

    from ..linalg import CoreSVD, check_rank_rule, concat_factors, select_rank
    from ..tensors import ST_DTYPES
    truncate = check_rank_rule(rank=rank, fro=fro, required=False) is not None
    inputs = weighted_inputs(inputs, what="weight", code="LT534")
    output = check_output(output, overwrite,
                          [i[0] if isinstance(i, tuple) and i else i for i in inputs])
    items = _inputs(inputs, options)
    labels = [label for _, _, label in items]
    for adapter, _, label in items:
        refuse_dora(adapter, label, "composed")
        _refuse_replacements(adapter, label)
        for m in adapter.modules.values():
            refuse_nonfinite(m, label)
    names = sorted(set().union(*(a.modules for a, _, _ in items)))
    parts_of = {n: [(i, a.modules[n], w) for i, (a, w, _) in enumerate(items) if n in a.modules]
                for n in names}
    for name in names:
        _check_same(name, parts_of[name], labels)
    done = byte_progress(progress, sum(module_bytes(m) for a, _, _ in items
                                       for m in a.modules.values()))

    modules: dict[str, LoraModule] = {}
    rows = []
    for name in names:
        parts = parts_of[name]
        template = parts[0][1]
        dtype = output_dtype(*(t for _, m, _ in parts for t in (m.A, m.B, m.bias)
                               if t is not None))
        B_cat, A_cat = concat_factors([(*m.factors(), w * m.scale) for _, m, w in parts])
        bias = None
        if any(m.bias is not None for _, m, _ in parts):
            bias = sum(m.bias.to(torch.float64) * (w * m.scale) for _, m, w in parts
                       if m.bias is not None)
        r_cat = int(A_cat.shape[0])
        out_dim, cols = template.info.delta_shape
        limit = min(r_cat, out_dim, cols)
        row = {"name": name, "kind": template.kind, "delta_shape": [out_dim, cols],
               "dtype": ST_DTYPES[dtype],
               "ranks": [None] * len(items), "weights": [None] * len(items),
               "concat_rank": r_cat, "limit": limit}
        for i, m, w in parts:
            row["ranks"][i] = m.rank
            row["weights"][i] = w
        svd = CoreSVD(B_cat, A_cat, 1.0) if truncate else None
        k = r_cat
        if svd is not None:
            choice = select_rank(svd.S, limit, rank=rank, fro=fro)
            k = choice.rank
            row.update(rule_rank=choice.rule_rank, clamped=choice.clamped)
        if k == r_cat:
            new = rebuild(template, B_cat, A_cat, alpha=float(r_cat), scaling=SCALING_STANDARD,
                          dtype=dtype, bias=bias)
        else:
            B_new, A_new = svd.factors(k, 1.0)
            new = rebuild(template, B_new, A_new, alpha=float(k), scaling=SCALING_STANDARD,
                          dtype=dtype, bias=bias)
        modules[name] = new
        row.update(new_rank=k, exact=k == r_cat)
        if svd is not None:
            row.update(norm=float(svd.S.square().sum()) ** 0.5, retained=svd.retained(k),
                       residual=svd.residual(k))
        rows.append(row)
        done(sum(module_bytes(m) for _, m, _ in parts))

    adapter = Adapter(modules=modules, alpha=float(most_common_rank(modules)),
                      base_model=_common(a.base_model for a, _, _ in items),
                      base_model_hash=_common(a.base_model_hash for a, _, _ in items),
                      provenance=_provenance(items, rank, fro),
                      extra_metadata=_common_metadata([a.extra_metadata for a, _, _ in items]))
    report = {
        "inputs": [{"input": label, "weight": w, "modules": len(a.modules)}
                   for a, w, label in items],
        "rule": {k: v for k, v in (("rank", rank), ("fro", fro)) if v is not None},
        "modules": rows,
        "summary": _summary(items, adapter, rows),
        "warnings": _warnings(items, rows),
    }
    return write_output(LowRankResult(adapter, report), output, overwrite)


def _common(values):
    found = set(values)
    return found.pop() if len(found) == 1 else None


def _common_metadata(dicts: list[dict]) -> dict:
    first = dicts[0]
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


def _provenance(items, rank, fro) -> str:
    from .. import __version__
    args = " ".join(f"{os.path.basename(label)}:{w!r}" for _, w, label in items)
    rule = f" --rank {rank}" if rank is not None else f" --fro {fro!r}" if fro is not None else ""
    return f"loratool {__version__} compose {args}{rule}"


def _summary(items, adapter: Adapter, rows: list[dict]) -> dict:
    truncated = [r for r in rows if not r["exact"]]
    with_norm = [r for r in rows if "norm" in r]
    total = sum(r["norm"] ** 2 for r in with_norm)
    dropped = sum((r["norm"] * r["residual"]) ** 2 for r in with_norm)
    summary = {
        "inputs": len(items),
        "modules": len(rows),
        "in_all_inputs": sum(1 for r in rows if None not in r["ranks"]),
        "exact": len(rows) - len(truncated),
        "truncated": len(truncated),
        "parameters_before": sum(m.info.parameters for a, _, _ in items
                                 for m in a.modules.values()),
        "parameters_after": sum(m.info.parameters for m in adapter.modules.values()),
    }
    if with_norm:
        summary.update(
            retained_min=min(r["retained"] for r in with_norm),
            retained_overall=1.0 if total == 0 else math.sqrt(max(0.0, 1 - dropped / total)),
            residual_overall=0.0 if total == 0 else math.sqrt(dropped / total))
    return summary


def _warnings(items, rows) -> list[str]:
    out = []
    bases = {a.base_model for a, _, _ in items if a.base_model}
    if len(bases) > 1:
        out.append(f"the inputs name different base models ({', '.join(sorted(bases))}); "
                   "their deltas were added anyway")
    for a, w, label in items:
        if w == 0:
            out.append(f"{label} has weight 0: it adds rank but nothing to the deltas")
    over = [r["name"] for r in rows if r["exact"] and r["concat_rank"] > r["limit"]]
    if over:
        out.append(f"{len(over)} module(s) (e.g. {over[0]!r}) have a concatenated rank above "
                   "min(out, in); --rank/--fro would shrink them without loss")
    return out


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------

def compare(a: Adapter | str | os.PathLike, b: Adapter | str | os.PathLike, *,
            subspace: bool = False, on: str = "a", plot: str | os.PathLike | None = None,
            overwrite: bool = False, **options) -> dict:
    """Per-module cosine similarity <dA, dB> / (|dA| |dB|) and norm ratio |dB| / |dA|.

    Computed in factored form (fp64). Modules in one adapter only are listed with status
    ``only_a``/``only_b``; modules of different shapes get ``shape_mismatch`` and DoRA modules
    ``dora`` (no linear delta), both without numbers. ``rel_diff`` is |dB - dA| / |dA|.

    ``subspace=True`` adds the subspace similarity grid of the LoRA paper per compared module
    (``subspace_similarity``, on ``on="a"`` or ``"delta"``; see ``ops.subspace``), and with
    ``plot=FILE.png`` its heatmaps (``plot_subspace``; ``report["plot"]``), the path checked
    before any work like every output (``overwrite``).

    >>> s = compare("examples/adapter.safetensors",
    ...             "examples/adapter_style.safetensors")["summary"]
    >>> s["common"], round(s["cosine"], 4)
    (4, -0.0117)
    """
    from ..linalg import difference_norm, frobenius_norm, inner
    if subspace:
        from .subspace import check_on
        check_on(on)
    if plot is not None:
        if not subspace:
            raise OperationError("plot= draws the subspace similarity: pass subspace=True "
                                 "(CLI: --subspace)", code="LT536")
        from ..atomic import check_destination
        plot = os.fspath(plot)
        check_destination(plot, overwrite=overwrite, inputs=[a, b])
    A_ad, label_a = load_input(a, options)
    B_ad, label_b = load_input(b, options)
    rows = []
    sum_inner = sum_a = sum_b = 0.0
    for name in sorted(set(A_ad.modules) | set(B_ad.modules)):
        ma, mb = A_ad.modules.get(name), B_ad.modules.get(name)
        row = {"name": name, "status": "ok", "norm_a": None, "norm_b": None,
               "norm_ratio": None, "cosine": None, "rel_diff": None}
        if mb is None or ma is None:
            row["status"] = "only_a" if mb is None else "only_b"
        elif ma.info.delta_shape != mb.info.delta_shape:
            row["status"] = "shape_mismatch"
        elif not (ma.variant.additive and mb.variant.additive):
            row["status"] = "dora"
        else:
            fa, fb = (*ma.factors(), ma.scale), (*mb.factors(), mb.scale)
            na, nb = frobenius_norm(*fa), frobenius_norm(*fb)
            ab = inner(*fa, *fb)
            row.update(norm_a=na, norm_b=nb, inner=ab,
                       norm_ratio=nb / na if na else None,
                       cosine=max(-1.0, min(1.0, ab / (na * nb))) if na and nb else None,
                       rel_diff=difference_norm(*fa, *fb) / na if na else None)
            if (ma.kind, ma.layout) != (mb.kind, mb.layout):
                row["note"] = f"{ma.kind}/{ma.layout} vs {mb.kind}/{mb.layout}"
            sum_inner += ab
            sum_a += na * na
            sum_b += nb * nb
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    cosines = [r["cosine"] for r in ok if r["cosine"] is not None]
    summary = {
        "modules_a": len(A_ad.modules), "modules_b": len(B_ad.modules),
        "common": len(ok),
        "only_a": [r["name"] for r in rows if r["status"] == "only_a"],
        "only_b": [r["name"] for r in rows if r["status"] == "only_b"],
        "not_compared": [r["name"] for r in rows if r["status"] in ("shape_mismatch", "dora")],
        # The whole adapter as one vector of all common modules' deltas:
        "cosine": sum_inner / math.sqrt(sum_a * sum_b) if sum_a and sum_b else None,
        "norm_ratio": math.sqrt(sum_b / sum_a) if sum_a else None,
        "cosine_mean": sum(cosines) / len(cosines) if cosines else None,
        "cosine_min": min(cosines) if cosines else None,
    }
    report = {"a": label_a, "b": label_b, "modules": rows, "summary": summary}
    if subspace:
        from .subspace import add_subspace
        report["subspace"] = add_subspace(rows, A_ad, B_ad, on)
    if plot is not None:
        from .subspace import plot_subspace
        report["plot"] = plot_subspace(report, plot, overwrite=overwrite, inputs=[a, b])
    return report


def _refuse_replacements(adapter, label: str) -> None:
    """A replacement overwrites a base tensor: scaling or summing it has no meaning (LT538)."""
    reps = list(getattr(adapter, "replacements", None) or {})
    if reps:
        more = f" and {len(reps) - 1} more" if len(reps) > 1 else ""
        raise OperationError(
            f"{label} replaces base tensor {reps[0]!r}{more} (PEFT modules_to_save, biases, "
            "embeddings or trainable tokens): a replacement is not a delta and cannot be "
            "scaled or summed; merge such adapters one at a time with `loratool merge`",
            code="LT538", module=reps[0])
