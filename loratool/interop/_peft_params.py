"""PEFT ``target_parameters`` adapters (LoRA on ``nn.Parameter``s, e.g. MoE experts), read into
``experts.ExpertsLoraModule`` (spec/interop.md, "PEFT target_parameters").

What PEFT (0.17 to 0.21, ``peft/tuners/lora/layer.py``, ``ParamWrapper``) saves for a
parameter of E experts ([E, d1, d2]; a 2-D parameter is E = 1, [out, in]) at rank r:

* ``lora_A.weight`` [E*r, in], grouped by expert (expert e: rows e*r .. e*r + r - 1);
* ``lora_B.weight`` [out, E*r], interleaved (expert e: columns e, e + E, e + 2E, ...);
* the delta of expert e is ``scale * B_e @ A_e`` [out, in], added to the parameter as
  [E, out, in], or as [E, in, out] when the experts module ``is_transposed`` (GptOss);
* the keys name the module, not the parameter: several parameters of one module are nested
  wrappers, the first one wrapped (in the module's parameter order) innermost, so its keys
  carry the most ``.base_layer`` parts (``experts.base_layer.lora_A.weight`` for
  ``gate_up_proj``, ``experts.lora_A.weight`` for ``down_proj`` in GptOss).

Which parameter each wrapper adapts and its orientation come from the base's shapes (the
module's parameter order is not in a safetensors header); when shapes cannot tell, the
reader refuses (LT309) rather than guess. Without a base the wrappers keep their key paths.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import InteropError
from ..experts import KIND_EXPERTS, LAYOUT_UNKNOWN, ExpertsLoraModule, ExpertsModuleInfo
from ..format import LAYOUT_IN_OUT, LAYOUT_OUT_IN, SCALING_STANDARD
from . import _common as C
from ._peft_config import rank_alpha
from .base import ModuleRecord

BASE_LAYER = ".base_layer"
# model_type values whose experts transformers marks ``is_transposed`` ([E, in, out]), which is
# what PEFT reads (``getattr(base_layer, "is_transposed", False)``); transformers 5.x. Other
# model types with square expert matrices need the option: a newer one may be transposed too.
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "ergo", "openai_privacy_filter"})


@dataclass
class ParamRecord(ModuleRecord):
    path: str = ""  # the module holding the parameter (``...mlp.experts``)
    depth: int = 0  # how many ``.base_layer`` parts its keys have
    parameter: str = ""  # "" while not known (no base)
    stacked: bool = True

    def info(self) -> ExpertsModuleInfo:
        return ExpertsModuleInfo(self.name, self.kind, self.layout, tuple(self.a_shape),
                                 tuple(self.b_shape), float(self.alpha), self.scaling,
                                 self.dtype, stacked=self.stacked, parameter=self.parameter)


def targets(cfg: dict, path: str) -> list[str]:
    tp = cfg.get("target_parameters") or []
    if not isinstance(tp, list) or not all(isinstance(t, str) and t for t in tp):
        raise InteropError(f"target_parameters {tp!r} is not a list of parameter names",
                           code="LT305", path=path)
    return tp


def _unwrap(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(BASE_LAYER):
        module, depth = module[: -len(BASE_LAYER)], depth + 1
    return module, depth


def _candidates(path: str, tp: list[str]) -> list[str]:
    """Parameter names of ``path`` that PEFT targets: ``f"{path}.{p}"`` equal to an entry or
    ending in ``"." + entry`` (``BaseTuner._inject_parameters``)."""
    out = []
    for t in tp:
        p = t.rpartition(".")[2]
        key = f"{path}.{p}"
        if (key == t or key.endswith("." + t)) and p not in out:
            out.append(p)
    return out


def take(modules: dict, tp: list[str], path: str) -> dict[str, list]:
    """Remove the parameter wrappers' records from ``modules``: module path -> records."""
    groups: dict[str, list] = {}
    for name in list(modules):
        mpath, depth = _unwrap(name)
        if not _candidates(mpath, tp):
            continue
        rec = modules.pop(name)
        if set(rec.tensors) - {"A", "B"} or getattr(rec, "embedding", None):
            raise InteropError(f"module {name!r}: a parameter LoRA (target_parameters) has "
                               "only lora_A and lora_B weights", code="LT305", path=path,
                               module=name)
        groups.setdefault(mpath, []).append(
            ParamRecord(name, dict(rec.tensors), path=mpath, depth=depth))
    for mpath, recs in groups.items():
        if sorted(r.depth for r in recs) != list(range(len(recs))):
            raise InteropError(f"module {mpath!r}: the wrappers' keys have .base_layer depths "
                               f"{sorted(r.depth for r in recs)}; PEFT nests one per targeted "
                               "parameter (0, 1, ...)", code="LT305", path=path, module=mpath)
        recs.sort(key=lambda r: r.depth)
    return groups


def resolve(groups: dict[str, list], cfg: dict, entries: dict, options, path: str) -> list:
    """Each wrapper's parameter, experts, rank, alpha and layout: the planned records."""
    tp = targets(cfg, path)
    shapes = C.base_shapes(options)
    out, mismatched = [], []
    for mpath, recs in sorted(groups.items()):
        cands = _candidates(mpath, tp)
        found = {}
        if shapes is not None:
            keys = C.resolve_base({f"{mpath}.{p}": None for p in cands}, options, suffixes=("",))
            found = {p: shapes[keys[f"{mpath}.{p}"]] for p in cands if f"{mpath}.{p}" in keys}
        facts = [_factors(r, entries, path) for r in recs]
        fits = {}  # (depth, parameter) -> (E, r, alpha, layouts, stacked)
        for rec, (a, b) in zip(recs, facts):
            for p in cands:
                fit = _fit(cfg, f"{mpath}.{p}", a, b, found.get(p) if shapes else None)
                if fit is not None:
                    fits[rec.depth, p] = fit
        names = [perm for perm in itertools.permutations(found if shapes else cands, len(recs))
                 if all((r.depth, p) in fits for r, p in zip(recs, perm))]
        if shapes is not None and not names:
            names = [_best_effort(recs, cands, fits)]
            if names[0] is None:
                raise InteropError(f"module {mpath!r}: {len(recs)} parameter wrappers but "
                                   f"target_parameters names {len(cands)} parameter(s) there",
                                   code="LT305", path=path, module=mpath)
            for rec, (a, b), p in zip(recs, facts, names[0]):
                if (rec.depth, p) in fits:
                    continue
                mismatched.append(f"module {mpath + '.' + p!r} (PEFT target_parameters, lora_A "
                                  f"{list(a)}, lora_B {list(b)}) fits no base parameter "
                                  f"{list(found.get(p) or [])}")
                fits[rec.depth, p] = _fit(cfg, f"{mpath}.{p}", a, b, None) or (
                    1, a[0], 1.0, SCALING_STANDARD, (LAYOUT_UNKNOWN,), True)
        elif shapes is not None and len(names) > 1:
            raise InteropError(
                f"module {mpath!r}: {len(recs)} nested parameter wrappers and parameters "
                f"{', '.join(found)} whose shapes fit either way; PEFT nests them in the "
                "module's parameter order, which a checkpoint does not record. Such an "
                "adapter cannot be read without guessing", code="LT309", path=path,
                module=mpath)
        known = len(names) == 1
        for rec, (a, b) in zip(recs, facts):
            p = names[0][rec.depth] if known else None
            # without a base and with several candidates, the wrapper keeps its key path: its
            # experts, rank and alpha must then not depend on which parameter it is
            options_ = {fits[rec.depth, p]} if p else {
                f for (d, _), f in fits.items() if d == rec.depth}
            if len(options_) != 1:
                raise InteropError(
                    f"module {rec.name!r}: lora_A {list(a)} is not [E*r, in] for the rank the "
                    "config gives (r / rank_pattern)" if not options_ else
                    f"module {rec.name!r}: which of the parameters {', '.join(cands)} it adapts "
                    "decides its rank and alpha (rank_pattern / alpha_pattern), and without a "
                    "base that cannot be told; pass --base", code="LT305" if not options_
                    else "LT309", path=path, module=rec.name)
            fit = options_.pop()
            E, r, alpha, scaling, layouts, stacked = fit
            name = f"{mpath}.{p}" if p else rec.name
            if len(layouts) > 1:  # a square expert matrix: [E, in, out] or [E, out, in]?
                if options.fan_in_fan_out is None and C.base_model_type(options) in \
                        TRANSPOSED_EXPERTS:
                    layouts = (LAYOUT_IN_OUT,)
                elif options.fan_in_fan_out is None:
                    raise InteropError(
                        f"parameter {name!r}: each expert is {a[1]}x{a[1]}, so whether the base "
                        "stores it [E, out, in] or transposed [E, in, out] (transformers' "
                        "is_transposed experts, e.g. GptOss) cannot be told from shapes. Pass "
                        "--base with the model's config.json beside it (GptOss-style models), "
                        "--fan-in-fan-out ([E, in, out]) or --no-fan-in-fan-out ([E, out, in])",
                        code="LT309", path=path, module=name)
                else:
                    layouts = (LAYOUT_IN_OUT if options.fan_in_fan_out else LAYOUT_OUT_IN,)
            rec.name, rec.parameter = name, p or ""
            rec.kind, rec.layout, rec.stacked = KIND_EXPERTS, layouts[0], stacked
            rec.alpha, rec.scaling = float(alpha), scaling
            rec.a_shape, rec.b_shape = (E, r, a[1]), (E, b[0], r)
            rec.dtype = entries[rec.tensors["A"]][0]
            out.append(rec)
    C.check_mismatches(mismatched, options, path)
    return out


def _best_effort(recs, cands, fits):
    """The assignment of parameters to wrappers when no full one fits the base: the one that
    fits the most wrappers, ties broken by PEFT's nesting in the config's order (innermost
    first). Only used to name the modules that ``merge`` then lists as not fitting (LT411)
    and to merge the others (``--allow-missing``); None when there are too few names."""
    if len(cands) < len(recs):
        return None
    config_order = tuple(reversed(cands[: len(recs)]))
    perms = [config_order] + list(itertools.permutations(cands, len(recs)))
    return max(perms, key=lambda perm: sum((r.depth, p) in fits for r, p in zip(recs, perm)))


def _factors(rec, entries, path):
    t = rec.tensors
    if "A" not in t or "B" not in t:
        raise InteropError(f"module {rec.name!r} has no {'lora_A' if 'A' not in t else 'lora_B'}"
                           " tensor", code="LT305", path=path, module=rec.name)
    (a_dtype, a), (b_dtype, b) = entries[t["A"]], entries[t["B"]]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise InteropError(f"module {rec.name!r}: lora_A {list(a)} and lora_B {list(b)} are not "
                           "[E*r, in] and [out, E*r]", code="LT305", path=path, module=rec.name)
    C.check_factors(rec.name, {"A": a_dtype, "B": b_dtype}, a, b, path)
    return tuple(a), tuple(b)


def _fit(cfg, key, a, b, base_shape):
    """(E, r, alpha, scaling, layouts, stacked) when the factors fit parameter ``key`` (its
    base shape, or any shape when None), else None."""
    r, alpha, scaling = rank_alpha(cfg, key)
    r = int(r)
    if r <= 0 or a[0] % r:
        return None
    E, (out, in_) = a[0] // r, (b[0], a[1])
    if base_shape is None:
        return E, r, alpha, scaling, (LAYOUT_UNKNOWN,), True
    base_shape = tuple(base_shape)
    if len(base_shape) == 2:
        ok = E == 1 and base_shape == (out, in_)
        return (E, r, alpha, scaling, (LAYOUT_OUT_IN,), False) if ok else None
    if len(base_shape) != 3 or base_shape[0] != E:
        return None
    layouts = tuple(lay for lay, want in ((LAYOUT_OUT_IN, (out, in_)), (LAYOUT_IN_OUT, (in_, out)))
                    if base_shape[1:] == want)
    return (E, r, alpha, scaling, layouts, True) if layouts else None


def load_module(rec: ParamRecord, tensors: dict) -> ExpertsLoraModule:
    """The module from the stored [E*r, in] / [out, E*r] factors (PEFT's ``get_delta_weight``
    reshapes: A to [E, r, in], B to [out, r, E])."""
    E, r, in_ = rec.a_shape
    out = rec.b_shape[1]
    A = tensors["A"].reshape(E, r, in_)
    B = tensors["B"].reshape(out, r, E).permute(2, 0, 1).contiguous()
    return ExpertsLoraModule(rec.name, rec.kind, rec.layout, A, B, rec.alpha, rec.scaling,
                             stacked=rec.stacked, parameter=rec.parameter)
