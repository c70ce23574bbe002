"""The merge plan: which base tensor gets which low-rank update, from which adapter module.

Pure bookkeeping on names, shapes and dtypes (the base is known by its header); the tensors
in the plan are views of the adapters' own, converted only when their base tensor is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import CheckpointError
from ...experts import is_experts
from .fp8_base import FP8_DTYPES

MERGEABLE_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_LISTED = 40


@dataclass
class Op:
    """One update of one base tensor, in the 2-D view ``W.reshape(W.shape[0], -1)``."""

    kind: str  # "lowrank" (W2 += s L @ R), "dora" (PEFT's DoRA merge), "vector" (bias += s v),
    #            "fn" (W2 = fn(W2) in float64: LyCORIS DoRA, lycoris.modules.merge_fn),
    #            "replace" (W = vec) and "rows" (W[index] = vec): replacement entries,
    #            applied first
    scale: float
    adapter: int
    module: str
    L: object = None  # [rows, r]
    R: object = None  # [r, cols]
    magnitude: object = None  # [out] (DoRA)
    axis: int = 1  # DoRA: the norm runs along this axis of the 2-D view (1: rows are outputs)
    vec: object = None  # [n] (lora_bias); the values of a replacement
    fn: object = None  # "fn": the whole 2-D weight in, the merged one out
    index: object = None  # int64 [k]: the rows a "rows" op replaces

    def cast(self, dtype, device=None) -> Op:
        """The same op with contiguous tensors of ``dtype`` (exact for float64)."""
        def c(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()
        return replace(self, L=c(self.L), R=c(self.R), magnitude=c(self.magnitude),
                       vec=c(self.vec))


def nonfinite_error(name: str, bad: int, ops) -> CheckpointError:
    """LT412: merging ``ops`` into base tensor ``name`` produced ``bad`` NaN/Inf values where
    the base held finite ones (every engine raises this one error)."""
    mods = sorted({op.module for op in ops})
    return CheckpointError(
        f"merging into `{name}` produced {bad} NaN/Inf value(s) (modules "
        f"{', '.join(mods[:5])}): the adapter has huge or non-finite values or the scale "
        "is too large for the stored dtype; nothing was written", code="LT412")


def _squeeze_tail(shape) -> tuple[int, ...]:
    shape = list(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _orientation(info, base_shape) -> str | None:
    """"rows" when the base's 2-D view is [out, in*k], "cols" when it is [in, out]; None when
    the base tensor's shape does not fit the module."""
    base_shape = tuple(base_shape)
    cols = info.transposed
    if base_shape == tuple(info.base_shape):
        return "cols" if cols else "rows"
    # A linear adapter on a 1x1 conv weight (or the reverse), as in Stable Diffusion's proj_in.
    if not cols and len(base_shape) >= 2 and _squeeze_tail(base_shape) == _squeeze_tail(
            info.base_shape):
        return "rows"
    return None


def _shape_hint(info, base_shape) -> str:
    want = list(info.base_shape)
    got = list(base_shape)
    text = (f"expects base shape {want} ({info.kind}, layout {info.layout}) but the base "
            f"tensor is {got}")
    if len(want) == 2 and got == want[::-1]:
        text += ("; the base stores the transpose: the adapter's layout is wrong for this base "
                 "(PEFT's fan_in_fan_out flag, GPT-2 Conv1D weights are [in, out])")
    return text


@dataclass
class Loaded:
    source: str
    source_format: str
    adapter: object
    scale: float
    identity: str
    merged: int = 0
    skipped: int = 0
    replaced: int = 0  # replacement entries planned
    dropped: list = None  # tensors the reader dropped (--allow-unknown), listed in the report
    notes: list = None  # the reader's notes


def load_item(item, base: str, name_map, adapter_options: dict | None = None, *,
          numpy: bool = False):
    """(adapter, label, format, dropped tensor names, reader notes) of one adapter."""
    from ...interop import detect_format, reader_for
    if hasattr(item, "modules"):
        return (item, getattr(item, "source_label", None) or "<in memory>",
                getattr(item, "source_format", "loratool"), [], [])
    fmt = detect_format(item)
    opts = reader_options(fmt, base, name_map, adapter_options)
    if numpy:  # a safetensors file without DoRA (checked by the caller): no torch
        from .npadapter import load_foreign_numpy, load_numpy
        if fmt == "loratool":
            return load_numpy(item), item, fmt, [], []
        adapter, result = load_foreign_numpy(item, fmt, opts)
        return adapter, item, fmt, list(result.unknown), list(result.notes)
    result = reader_for(item, opts).load_report(item, opts)
    return result.adapter, item, fmt, list(result.unknown), list(result.notes)


def reader_options(fmt: str, base: str, name_map, adapter_options: dict | None):
    """The ``ReaderOptions`` ``merge`` reads an adapter of format ``fmt`` with."""
    from ...interop.base import ReaderOptions
    # Foreign formats read names and layouts against the base (kohya names, PEFT's global
    # fan_in_fan_out flag); loratool files state both.
    # A module whose base tensor has another shape is listed with the others by make_plan
    # (LT411, honouring --allow-missing), the same for every format.
    # (a loratool file's LyCORIS module stored without its conv shape takes it from the base)
    options = {"base": base} if fmt == "loratool" else {
        "base": base, "name_map": name_map or {}, "defer_base_mismatch": True,
        **(adapter_options or {})}
    return ReaderOptions.of(**options)


def make_plan(loaded: list[Loaded], base_tensors: dict, name_map, *, sign: float,
          allow_missing: bool, base_label: str):
    """base tensor name -> [ops]; plus the list of skipped (adapter, module, reason)."""
    plan: dict[str, list[Op]] = {}
    problems: list[tuple[str, str, str]] = []
    keys = list(base_tensors)
    owners: dict[str, str] = {}  # base tensor -> the adapter that replaces it
    for ai, ld in enumerate(loaded):
        mapping, unmatched = _resolve(ld.adapter.modules, keys, name_map)
        for module in unmatched:
            problems.append((ai, module, f"has no target: no base tensor "
                                                f"`{module}.weight` (nor one ending in it)"))
        seen: dict[str, str] = {}
        for module, target in mapping.items():
            if target in seen:
                raise CheckpointError(
                    f"{ld.source}: modules `{seen[target]}` and `{module}` both resolve to "
                    f"base tensor `{target}.weight`; pass --map MODULE=BASE_PATH to say which "
                    "is which", code="LT416")
            seen[target] = module
            m = ld.adapter.modules[module]
            info = m.info
            wkey = target + getattr(info, "tensor_suffix", ".weight")
            dtype, shape = base_tensors[wkey]
            orient = _orientation(info, shape)
            why = None
            if orient is None:
                why = _shape_hint(info, shape)
            elif dtype not in MERGEABLE_DTYPES + FP8_DTYPES:
                why = (f"base tensor `{wkey}` is {dtype}; merging needs F16, BF16, F32 or F64 "
                       "weights, or F8_E4M3/F8_E5M2 (dequantize the base first)")
            bkey = target + ".bias"
            if why is None and m.bias is not None:
                if bkey not in base_tensors:
                    why = (f"has lora_bias but the base has no `{bkey}` to add it to")
                elif tuple(base_tensors[bkey][1]) != (info.out_features,):
                    why = (f"lora_bias has shape [{info.out_features}] but base `{bkey}` is "
                           f"{list(base_tensors[bkey][1])}")
                elif base_tensors[bkey][0] not in MERGEABLE_DTYPES:
                    why = f"base tensor `{bkey}` is {base_tensors[bkey][0]}, not a float type"
            if why is not None:
                problems.append((ai, module, why))
                continue
            if getattr(m, "merge_fn", None) is not None:  # LoRA on a parameter (experts.py):
                s = sign * ld.scale * m.scale  # its per-expert deltas are made when merged
                plan.setdefault(wkey, []).append(Op("fn", s, ai, module, fn=m.merge_fn(s)))
                ld.merged += 1
                continue
            # Views of the adapter's own tensors; converted to float64 only while their base
            # tensor is merged, so memory does not grow with the adapter either.
            B2, A2 = m.factors()
            if orient == "rows":
                L, R, axis = B2, A2, 1
            else:
                L, R, axis = A2.T, B2.T, 0
            s = sign * ld.scale * m.scale
            if getattr(m, "record", None) is not None and not m.variant.additive:
                from ...lycoris.modules import merge_fn
                op = Op("fn", s, ai, module, fn=merge_fn(m.record, shape, sign * ld.scale))
            elif m.magnitude is not None:
                op = Op("dora", s, ai, module, L, R, m.magnitude, axis)
            else:
                op = Op("lowrank", s, ai, module, L, R)
            plan.setdefault(wkey, []).append(op)
            if m.bias is not None:
                plan.setdefault(bkey, []).append(Op("vector", s, ai, module, vec=m.bias))
            ld.merged += 1
        _plan_replacements(ai, ld, plan, base_tensors, name_map, problems, owners)
    if problems and not allow_missing:
        lines = [f"  {loaded[ai].source}: module `{mod}` {why}"
                 for ai, mod, why in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        raise CheckpointError(
            f"{len(problems)} adapter module(s) cannot be merged into {base_label}:\n"
            + "\n".join(lines) + "\nFix the names with --map OLD=NEW (a trailing '.' maps a "
            "prefix, e.g. --map base_model.model.=), or pass --allow-missing to skip these "
            "modules (they are listed in the report).", code="LT411")
    skipped = [{"adapter": loaded[ai].source, "module": mod, "reason": why}
               for ai, mod, why in problems]
    for ai, _, _ in problems:
        loaded[ai].skipped += 1
    return plan, skipped


def _resolve(modules, keys, name_map):
    """``resolve_modules`` per base-tensor suffix: ``.weight``, or none for a LoRA on a
    parameter (``experts.ExpertsModuleInfo``: the base tensor is the parameter itself)."""
    from ...naming import resolve_modules
    on_param = [m for m, mod in modules.items() if is_experts(mod)]
    mapping, unmatched = resolve_modules([m for m in modules if m not in set(on_param)], keys,
                                         name_map)
    if on_param:
        more, left = resolve_modules(on_param, keys, name_map, suffix="")
        mapping.update(more)
        unmatched += left
    return mapping, unmatched


def _plan_replacements(ai, ld, plan, base_tensors, name_map, problems, owners) -> None:
    """Replacement entries of adapter ``ai``: checked against the base (LT411 when one does
    not fit), planned before the tensor's low-rank updates."""
    from ...naming import resolve_modules
    reps = getattr(ld.adapter, "replacements", None) or {}
    if not reps:
        return
    mapping, unmatched = resolve_modules(reps, list(base_tensors), name_map, suffix="")
    for target in unmatched:
        problems.append((ai, target, f"(a replacement) has no base tensor `{target}`"))
    for target, key in mapping.items():
        rep = reps[target]
        dtype, shape = base_tensors[key]
        shape = tuple(shape)
        values = tuple(rep.value.shape)
        why = None
        if dtype not in MERGEABLE_DTYPES:
            why = f"(a replacement): base tensor `{key}` is {dtype}, not a float type"
        elif rep.index is None and values != shape:
            why = f"(a replacement) has shape {list(values)} but base `{key}` is {list(shape)}"
        elif rep.index is not None:
            rows = shape[0] if shape else 0
            if values[1:] != shape[1:]:
                why = (f"(a row replacement) has rows of shape {list(values[1:])} but base "
                       f"`{key}` has rows of shape {list(shape[1:])}")
            elif rep.index.numel() and int(rep.index.max()) >= rows:
                why = (f"(a row replacement) replaces row {int(rep.index.max())} but base "
                       f"`{key}` has {rows} rows (an adapter for a larger vocabulary?)")
        if why is not None:
            problems.append((ai, target, why))
            continue
        if key in owners:
            raise CheckpointError(
                f"{owners[key]} and {ld.source} both replace base tensor `{key}`; merge them "
                "in separate runs, in the order you mean", code="LT433")
        owners[key] = ld.source
        op = Op("replace" if rep.index is None else "rows", 1.0, ai, target, vec=rep.value,
                index=rep.index)
        ops = plan.setdefault(key, [])
        ops.insert(sum(o.kind in ("replace", "rows") for o in ops), op)
        ld.replaced += 1
