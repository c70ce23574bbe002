"""LyCORIS modules stored natively in the loratool format (format 1.2, spec/adapter-format.md
section 4.2): kinds ``locon``, ``loha``, ``lokr``, ``full`` whose tensors are LyCORIS's own,
byte for byte, under roles named after LyCORIS's parameters (``lora_up.weight`` ->
``lora_up``: a role holds no dot).

A native module is parsed by the same ``parse_module`` as a LyCORIS file (rules LT230-LT244),
so it reads back as the very record the LyCORIS reader makes, and every operation (merge,
convert, inspect) treats both alike. No torch at import: the header checks use stubs.
"""

from __future__ import annotations

import math

from ..errors import TensorError
from .. import format as F
from ..format import ADAPTER_DTYPES, LAYOUT_OUT_IN, SCALING_STANDARD

# kind -> the roles it may hold (the family's parameters, spec section 4.2)
KIND_ROLES = {kind: frozenset(roles) for kind, roles in F.LYCORIS_KIND_ROLES.items()}
_DOTTED = ("lora_down", "lora_up", "lora_mid")  # LyCORIS names them ``<role>.weight``


def param_of(role: str) -> str:
    """Native role -> LyCORIS parameter name (``lora_up`` -> ``lora_up.weight``)."""
    return role + ".weight" if role in _DOTTED else role


def role_of(param: str) -> str:
    return param[: -len(".weight")] if param.endswith(".weight") else param


def record_problem(rec: dict) -> str | None:
    """Why a LyCORIS-kind module record is malformed (LT218), or None."""
    if rec.get("layout") != LAYOUT_OUT_IN:
        return f"layout is {rec.get('layout')!r}; LyCORIS kinds use {LAYOUT_OUT_IN!r}"
    if "alpha" in rec:
        return "has an alpha field; a LyCORIS kind keeps its alpha in its `alpha` tensor"
    shape = rec.get("shape")
    if shape is not None and not (isinstance(shape, list) and 2 <= len(shape) <= 5 and all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s < 1 << 53
            for s in shape)):
        return (f"shape is {str(shape)[:60]}; expected the base weight's shape, 2 to 5 "
                "positive integers")
    extra = rec.get("lycoris")
    if extra is not None and not (isinstance(extra, dict) and isinstance(
            extra.get("name", ""), str) and all(isinstance(v, str) for v in extra.values())):
        return "lycoris is not a JSON object of strings"
    return None


def check_module(module: str, roles: dict, rec: dict, read_alpha, add):
    """The rules of one LyCORIS-kind module from its header entries ``{role: TensorInfo}``:
    roles of its kind (LT219), dtypes (LT203), and every LyCORIS rule (LT230-LT244) through
    ``parse_module``. ``read_alpha()`` reads the alpha value. Returns the module's info, or
    None after reporting through ``add(code, message, module)``."""
    from . import LycorisError, parse_module
    from .modules import HeaderTensor
    kind = rec["kind"]
    foreign = sorted(set(roles) - KIND_ROLES[kind])
    if foreign:
        add("LT219", f"module {module!r}: kind {kind} has no role(s) {', '.join(foreign)} "
                     f"(its roles: {', '.join(sorted(KIND_ROLES[kind]))})", module)
        return None
    bad = sorted(r for r, t in roles.items() if t.dtype not in ADAPTER_DTYPES)
    if bad:
        add("LT203", f"module {module!r}: {', '.join(f'{r} is {roles[r].dtype}' for r in bad)}"
                     f"; adapter tensors must be one of {', '.join(ADAPTER_DTYPES)}", module)
        return None
    # LyCORIS keeps alpha and dora_scale in float32 beside fp16/bf16 factors: not a warning
    if len({t.dtype for r, t in roles.items() if r not in ("alpha", "dora_scale")}) > 1:
        add("LT211", f"module {module!r}: tensors mix dtypes ("
                     f"{', '.join(f'{r}={t.dtype}' for r, t in sorted(roles.items()))})",
            module)
    params = {param_of(r): HeaderTensor(t.dtype, t.shape, read_alpha if r == "alpha" else None)
              for r, t in roles.items()}
    try:
        parsed = parse_module(source_name(module, rec), params, shape=rec.get("shape"))
    except LycorisError as e:
        add(e.code, f"module {module!r}: {e.message}", module)
        return None
    if parsed.family.value != kind:
        add("LT219", f"module {module!r}: its roles are those of {parsed.family.value}, not of "
                     f"its kind {kind}", module)
        return None
    return module_info(module, parsed, {r: (t.dtype, t.shape) for r, t in roles.items()})


def source_name(module: str, rec: dict) -> str:
    """The module's LyCORIS name: recorded, or the kohya spelling of ``module``."""
    name = (rec.get("lycoris") or {}).get("name")
    return name or "lora_" + module.replace(".", "_")


def module_info(name: str, rec, entries: dict):
    """The ``LycorisModuleInfo`` of a parsed record; ``entries``: param or role -> (dtype,
    shape) of its stored tensors."""
    from ..format import KIND_CONV, KIND_LINEAR
    from .modules import LycorisModuleInfo, describe, lora_shapes, rank_is_exact, \
        structural_rank, variant_for
    rank = structural_rank(rec)
    a_shape, b_shape = lora_shapes(rec, rank)
    facts = describe(rec, rank, rank_is_exact(rec))
    facts["parameters"] = sum(math.prod(s) for p, (_, s) in entries.items() if p != "alpha")
    dtypes = sorted({d for p, (d, _) in entries.items() if p != "alpha"})
    return LycorisModuleInfo(
        name, KIND_CONV if len(rec.shape) > 2 else KIND_LINEAR, LAYOUT_OUT_IN, a_shape,
        b_shape, rec.scale * rank, SCALING_STANDARD,
        dtypes[0] if len(dtypes) == 1 else "mixed", False, rec.tensors.get("diff_b") is not None,
        lycoris=facts, variant_name=variant_for(rec).name)


def as_module(name: str, rec):
    """A parsed record as the adapter model's module: its exact plain-LoRA form (float64),
    identity factors for a full diff, the record kept (``LycorisLoraModule``)."""
    from dataclasses import replace

    from ..format import KIND_CONV, KIND_LINEAR
    from . import to_lora
    from .modules import LycorisLoraModule, identity_factors
    from .records import Full
    if isinstance(rec, Full):
        A, B, bias = identity_factors(rec)
        alpha = float(A.shape[0])
    else:
        f = to_lora(replace(rec, dora=None) if rec.dora is not None else rec)
        A, B, alpha, bias = f.down(), f.up(), f.alpha, None
    kind = KIND_CONV if len(rec.shape) > 2 else KIND_LINEAR
    return LycorisLoraModule(name, kind, LAYOUT_OUT_IN, A, B, alpha, SCALING_STANDARD,
                             bias=bias, record=rec)


def load_module(name: str, rec: dict, tensors: dict):
    """A native module from its record and its tensors ``{role: torch tensor}``."""
    from . import parse_module
    params = {param_of(r): t for r, t in tensors.items()}
    return as_module(name, parse_module(source_name(name, rec), params,
                                        shape=rec.get("shape")))


def native_entry(name: str, m) -> tuple[dict, dict]:
    """(module record, {role: tensor}) that store ``m`` (a ``LycorisLoraModule``) natively."""
    rec = m.record
    tensors = {role_of(p): t for p, t in rec.tensors.items()}
    bad = sorted(r for r, t in tensors.items() if _st_dtype(t) not in ADAPTER_DTYPES)
    if bad:
        raise TensorError(f"module {name!r}: LyCORIS tensor(s) {', '.join(bad)} are "
                          f"{_st_dtype(tensors[bad[0]])}, which the loratool format does not "
                          "store; convert with --lycoris lora (plain LoRA, float factors)",
                          code="LT203", module=name)
    out = {"kind": rec.family.value, "layout": LAYOUT_OUT_IN, "lycoris": {"name": rec.name}}
    if rec.shape_known:
        out["shape"] = [int(s) for s in rec.shape]
    return out, tensors


def _st_dtype(t) -> str:
    from ..tensors import st_dtype
    return st_dtype(t)
