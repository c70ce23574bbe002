"""Reading one LyCORIS module: family detection and shape checks (spec/lycoris.md).

Facts from lycoris-lora 4.1.3 (modules/locon.py, loha.py, lokr.py, full.py and
functional/general.py), checked by running it (research notes, section A).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from . import codes
from .codes import fail
from .records import Dora, DoraAxis, Family, Full, LoCon, LoHa, LoKr, LycorisModule

if TYPE_CHECKING:  # parsing reads shapes only, so header stubs work without torch
    import torch

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2", "lora_te3", "lycoris")

# parameter name -> family; "alpha" and "dora_scale" are shared and decide nothing
_MARKERS: dict[str, Family] = {
    "lora_up.weight": Family.LOCON, "lora_down.weight": Family.LOCON,
    "lora_mid.weight": Family.LOCON,
    **{f"hada_{p}": Family.LOHA for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{p}": Family.LOKR for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1",
                                           "t2")},
    "diff": Family.FULL, "diff_b": Family.FULL,
    "w_norm": Family.NORM, "b_norm": Family.NORM,
    "weight": Family.IA3, "on_input": Family.IA3,
    **{f"{p}.weight": Family.GLORA for p in ("a1", "a2", "b1", "b2", "bm")},
    "oft_blocks": Family.OFT, "rescale": Family.OFT,
}
_SHARED = {"alpha", "dora_scale"}
_WHY_NOT = {
    Family.IA3: "(IA)3 scales the base weight (dW = W * w): it needs the base and has no "
                "low-rank form",
    Family.GLORA: "GLoRA's delta (alpha/r)(W a1 a2 + b1 b2) depends on the base weight",
    Family.OFT: "OFT rotates the base weight (dW = (R^T - I) W): it needs the base",
    Family.BOFT: "BOFT rotates the base weight in butterfly stages: it needs the base",
    Family.NORM: "w_norm/b_norm replace a normalization layer's weight and bias",
}


def split_state_dict(state_dict: Mapping[str, torch.Tensor]
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """Group kohya/LyCORIS keys ``<prefix>_<path>.<param>`` by module: {module: {param: t}}.

    The module name holds no dot, so the key splits at its first dot (``param`` may hold one,
    as in ``lora_up.weight``). A key without a dot is its own module with param ``""``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        module, _, param = key.partition(".")
        out.setdefault(module, {})[param] = t
    return out


def detect_family(params: Iterable[str] | Mapping[str, torch.Tensor]) -> Family:
    """The family a module's parameter names belong to (ValueError if none or several).

    Unsupported families (IA3, GLoRA, OFT, BOFT, norms) are returned too, so a caller can
    refuse them by name; ``parse_module`` raises LT231 for them. OFT and BOFT share their
    names: given the tensors (a mapping), a 4-D ``oft_blocks`` (stages, blocks, bs, bs) is
    BOFT; given names only, both are OFT.
    """
    blocks = params.get("oft_blocks") if isinstance(params, Mapping) else None
    params = list(params)
    families = {_MARKERS[p] for p in params if p in _MARKERS}
    unknown = sorted(p for p in params if p not in _MARKERS and p not in _SHARED)
    if unknown or len(families) != 1:
        what = (f"unknown parameter(s) {unknown}" if unknown else
                f"parameters of several families ({', '.join(sorted(f.value for f in families))})"
                if families else "no parameter that names a family")
        raise ValueError(what)
    family = families.pop()
    if family is Family.OFT and blocks is not None and len(blocks.shape) == 4:
        return Family.BOFT
    return family


def parse_module(name: str, tensors: Mapping[str, torch.Tensor], *,
                 shape: Sequence[int] | None = None) -> LycorisModule:
    """The typed record of one module from its tensors {param: tensor} (keys as in the file
    after ``<module>.``, e.g. ``hada_w1_a``, ``lora_up.weight``, ``alpha``).

    ``shape`` is the base weight's shape (out, in[, *kernel]); it is checked against the
    tensors (LT241) and is needed later for conv LoHa/LoKr stored with flattened factors.
    Raises ``LycorisError`` (LT230-LT244) naming the module and the rule.
    """
    try:
        family = detect_family(tensors)
    except ValueError as e:
        raise fail(codes.UNKNOWN_PARAMS, name, f"{e}; known families: LoCon (lora_up/"
                   "lora_down), LoHa (hada_*), LoKr (lokr_*), full (diff)") from None
    if family in _WHY_NOT:
        raise fail(codes.UNSUPPORTED_FAMILY, name, f"is {family.value}, which loratool does "
                   f"not read: {_WHY_NOT[family]}")
    t = dict(tensors)
    for p, v in t.items():
        if p != "on_input" and not (hasattr(v, "is_floating_point") and v.is_floating_point()):
            raise fail("LT203", name, f"{p} is not a floating-point tensor")
        if p != "alpha" and hasattr(v, "shape") and len(v.shape) and 0 in v.shape:
            raise fail(codes.ZERO_DIMENSION, name, f"{p} has shape {tuple(v.shape)}, with a "
                       "dimension of size 0")
    alpha = _alpha(name, t.get("alpha"))
    given = None if shape is None else tuple(int(s) for s in shape)
    rec = {Family.LOCON: _locon, Family.LOHA: _loha, Family.LOKR: _lokr,
           Family.FULL: _full}[family](name, t, alpha)
    if given is not None:
        check_shape(rec, given)
        rec = _with_shape(rec, given)
    return rec


def check_shape(rec: LycorisModule, shape: tuple[int, ...]) -> None:
    """LT241/LT237 unless the module's delta fits a base weight of ``shape``."""
    shape = tuple(int(s) for s in shape)
    bad = (len(shape) < 2 or shape[0] != rec.out_features
           or math.prod(shape[1:]) != rec.columns
           or (rec.shape_known and shape != rec.shape))
    if bad:
        raise fail(codes.SHAPE_MISMATCH, rec.name, f"its delta has shape {_fmt(rec)}, which "
                   f"does not fit the base weight's shape {shape}")
    if isinstance(rec, LoKr) and not rec.shape_known and len(shape) > 2:
        # kron with a flattened conv w2 is the conv kron only if w2's width is d * prod(k)
        a, c = rec.w1_shape
        if shape[1] % c or math.prod(rec.w2_b.shape[1:]) % math.prod(shape[2:]):
            raise fail(codes.LOKR_BAD_SHAPE, rec.name, f"w1 has {c} columns and w2 "
                       f"{rec.columns // c}: that is no kron of a conv weight {shape}")
    if rec.dora is not None:
        _check_dora_fits(rec, rec.dora, shape)


def _fmt(rec: LycorisModule) -> str:
    if rec.shape_known:
        return str(rec.shape)
    return f"({rec.out_features}, {rec.columns}) (conv factors flattened, kernel unknown)"


def _with_shape(rec: LycorisModule, shape: tuple[int, ...]) -> LycorisModule:
    from dataclasses import replace
    return replace(rec, shape=shape, shape_known=True)


def _alpha(name: str, t) -> float | None:
    if t is None:
        return None
    if t.numel() != 1:
        raise fail(codes.BAD_ALPHA, name, f"alpha has shape {tuple(t.shape)}; it must be "
                   "one number")
    a = float(t.reshape(()).item())
    if not math.isfinite(a):
        raise fail(codes.BAD_ALPHA, name, f"alpha is {a}; it must be finite")
    return None if a == 0 else a


def _need(name: str, t: dict, params: Sequence[str], why: str) -> None:
    missing = [p for p in params if p not in t]
    if missing:
        raise fail(codes.MISSING_TENSOR, name, f"{why}: {', '.join(missing)} missing")


def _ndim(name: str, role: str, x: torch.Tensor, allowed) -> None:
    if x.dim() not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise fail(codes.BAD_NDIM, name, f"{role} has {x.dim()} dimensions "
                   f"{tuple(x.shape)}; it must have {want}")


def _rank_eq(name: str, what: str, r1: int, r2: int) -> None:
    if r1 != r2:
        raise fail(codes.RANK_MISMATCH, name, f"{what}: ranks {r1} and {r2} differ")


def _flat(x: torch.Tensor) -> tuple[int, int]:
    return int(x.shape[0]), math.prod(int(s) for s in x.shape[1:])


def _core(name: str, role: str, core: torch.Tensor, r_i: int, r_j: int,
          kernel: tuple[int, ...] | None = None) -> tuple[int, ...]:
    if core.dim() < 3:
        raise fail(codes.BAD_NDIM, name, f"{role} has shape {tuple(core.shape)}; a Tucker "
                   "core has (r, r, *kernel)")
    if (int(core.shape[0]), int(core.shape[1])) != (r_i, r_j):
        raise fail(codes.BAD_TUCKER_CORE, name, f"{role} has shape {tuple(core.shape)}; its "
                   f"factors need ({r_i}, {r_j}, *kernel)")
    k = tuple(int(s) for s in core.shape[2:])
    if kernel is not None and k != kernel:
        raise fail(codes.BAD_TUCKER_CORE, name, f"{role} has kernel {k}, the other core {kernel}")
    return k


def _locon(name, t, alpha):
    _need(name, t, ("lora_up.weight", "lora_down.weight"), "LoCon needs lora_up and lora_down")
    up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
    _ndim(name, "lora_up.weight", up, range(2, 6))
    _ndim(name, "lora_down.weight", down, range(2, 6))
    if any(int(s) != 1 for s in up.shape[2:]):
        raise fail(codes.BAD_NDIM, name, f"lora_up.weight has shape {tuple(up.shape)}; its "
                   "spatial dimensions must be 1 (the kernel lives in lora_down)")
    r = int(down.shape[0])
    _rank_eq(name, "lora_up.weight (out, r) and lora_down.weight (r, in)", int(up.shape[1]), r)
    if mid is None:
        if up.dim() > 2 and up.dim() != down.dim():
            raise fail(codes.BAD_NDIM, name, f"lora_up.weight {tuple(up.shape)} and lora_down."
                       f"weight {tuple(down.shape)} differ in their number of dimensions")
        shape = (int(up.shape[0]), *(int(s) for s in down.shape[1:]))
    else:
        k = _core(name, "lora_mid.weight", mid, r, r)
        if down.dim() != 2 + len(k) or any(int(s) != 1 for s in down.shape[2:]):
            raise fail(codes.BAD_NDIM, name, f"lora_down.weight has shape {tuple(down.shape)}; "
                       f"with lora_mid it must be (r, in{', 1' * len(k)})")
        shape = (int(up.shape[0]), int(down.shape[1]), *k)
    dora = _dora(name, t.get("dora_scale"), shape, True)
    return LoCon(name=name, shape=shape, shape_known=True, alpha=alpha, dora=dora, tensors=t,
                 up=up, down=down, mid=mid)


def _loha(name, t, alpha):
    _need(name, t, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
          "LoHa needs both Hadamard terms")
    tucker = "hada_t1" in t or "hada_t2" in t
    if tucker:
        _need(name, t, ("hada_t1", "hada_t2"), "Tucker LoHa needs both cores")
    terms, kernel = [], None
    for i in (1, 2):
        a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
        _ndim(name, f"hada_w{i}_a", a, (2,))
        _ndim(name, f"hada_w{i}_b", b, (2,) if tucker else range(2, 6))
        if tucker:
            # Tucker stores w_a transposed: (r, out)
            kernel = _core(name, f"hada_t{i}", t[f"hada_t{i}"], int(a.shape[0]),
                           int(b.shape[0]), kernel)
            terms.append((int(a.shape[1]), int(b.shape[1])))
        else:
            _rank_eq(name, f"hada_w{i}_a (out, r) and hada_w{i}_b (r, in)", int(a.shape[1]),
                     int(b.shape[0]))
            terms.append((int(a.shape[0]), _flat(b)[1]))
    if terms[0] != terms[1]:
        raise fail(codes.LOHA_TERMS_DIFFER, name, f"the Hadamard terms have shapes {terms[0]} "
                   f"and {terms[1]}")
    out, cols = terms[0]
    if tucker:
        shape, known = (out, cols, *kernel), True
    else:
        b = t["hada_w1_b"]
        known = b.dim() > 2 or t["hada_w2_b"].dim() > 2
        shape = (out, *(int(s) for s in b.shape[1:])) if b.dim() > 2 else (out, cols)
    dora = _dora(name, t.get("dora_scale"), shape, known)
    return LoHa(name=name, shape=shape, shape_known=known, alpha=alpha, dora=dora, tensors=t,
                w1_a=t["hada_w1_a"], w1_b=t["hada_w1_b"], w2_a=t["hada_w2_a"],
                w2_b=t["hada_w2_b"], t1=t.get("hada_t1"), t2=t.get("hada_t2"))


def _lokr(name, t, alpha):
    if "lokr_t1" in t:
        raise fail(codes.UNKNOWN_PARAMS, name, "lokr_t1 is not a LyCORIS 4.x parameter "
                   "(w1 has no Tucker form)")
    for side in ("w1", "w2"):
        full, fa, fb = f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b"
        if (full in t) == (fa in t or fb in t):
            raise fail(codes.MISSING_TENSOR, name, f"{side} must be either {full} or the pair "
                       f"{fa}, {fb}" + (" (both given)" if full in t else ""))
        if full not in t:
            _need(name, t, (fa, fb), f"factored {side} needs both factors")
    if "lokr_t2" in t and "lokr_w2" in t:
        raise fail(codes.MISSING_TENSOR, name, "lokr_t2 goes with lokr_w2_a/lokr_w2_b, not "
                   "with a full lokr_w2")
    if "lokr_w1" in t:
        _ndim(name, "lokr_w1", t["lokr_w1"], (2,))
        a, c = (int(s) for s in t["lokr_w1"].shape)
    else:
        w1a, w1b = t["lokr_w1_a"], t["lokr_w1_b"]
        _ndim(name, "lokr_w1_a", w1a, (2,))
        _ndim(name, "lokr_w1_b", w1b, (2,))
        _rank_eq(name, "lokr_w1_a (a, r) and lokr_w1_b (r, c)", int(w1a.shape[1]),
                 int(w1b.shape[0]))
        a, c = int(w1a.shape[0]), int(w1b.shape[1])
    known = True
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
        _ndim(name, "lokr_w2", w2, range(2, 6))
        b, d, k = int(w2.shape[0]), int(w2.shape[1]), tuple(int(s) for s in w2.shape[2:])
    elif "lokr_t2" in t:
        w2a, w2b = t["lokr_w2_a"], t["lokr_w2_b"]
        _ndim(name, "lokr_w2_a", w2a, (2,))
        _ndim(name, "lokr_w2_b", w2b, (2,))
        # Tucker stores w2_a transposed: (r, b)
        k = _core(name, "lokr_t2", t["lokr_t2"], int(w2a.shape[0]), int(w2b.shape[0]))
        b, d = int(w2a.shape[1]), int(w2b.shape[1])
    else:
        w2a, w2b = t["lokr_w2_a"], t["lokr_w2_b"]
        _ndim(name, "lokr_w2_a", w2a, (2,))
        _ndim(name, "lokr_w2_b", w2b, range(2, 6))
        _rank_eq(name, "lokr_w2_a (b, r) and lokr_w2_b (r, d)", int(w2a.shape[1]),
                 int(w2b.shape[0]))
        b = int(w2a.shape[0])
        if w2b.dim() > 2:  # the functional API's (r, d, *k)
            d, k = int(w2b.shape[1]), tuple(int(s) for s in w2b.shape[2:])
        else:
            d, k, known = int(w2b.shape[1]), (), False
    shape = (a * b, c * d, *k)
    dora = _dora(name, t.get("dora_scale"), shape, known)
    return LoKr(name=name, shape=shape, shape_known=known, alpha=alpha, dora=dora, tensors=t,
                w1=t.get("lokr_w1"), w1_a=t.get("lokr_w1_a"), w1_b=t.get("lokr_w1_b"),
                w2=t.get("lokr_w2"), w2_a=t.get("lokr_w2_a"), w2_b=t.get("lokr_w2_b"),
                t2=t.get("lokr_t2"))


def _full(name, t, alpha):
    _need(name, t, ("diff",), "a full module needs diff")
    if "dora_scale" in t:
        raise fail(codes.UNKNOWN_PARAMS, name, "dora_scale does not go with a full diff")
    diff, diff_b = t["diff"], t.get("diff_b")
    if diff.dim() < 2:
        raise fail(codes.BAD_DIFF, name, f"diff has shape {tuple(diff.shape)}; it must have "
                   "the base weight's shape (out, in[, *kernel])")
    if diff_b is not None and tuple(diff_b.shape) != (int(diff.shape[0]),):
        raise fail(codes.BAD_DIFF, name, f"diff_b has shape {tuple(diff_b.shape)}; it must be "
                   f"({int(diff.shape[0])},)")
    return Full(name=name, shape=tuple(int(s) for s in diff.shape), shape_known=True,
                alpha=alpha, dora=None, tensors=t, diff=diff, diff_b=diff_b)


def _dora(name: str, g, shape: tuple[int, ...], known: bool) -> Dora | None:
    """The axis of dora_scale from its shape: (out, 1, ...) or (1, in, ...) (LT239)."""
    if g is None:
        return None
    gs = tuple(int(s) for s in g.shape)
    out = shape[0]
    rest_ones = all(s == 1 for s in gs[2:])
    if len(gs) >= 2 and rest_ones and gs[0] == out and gs[1] == 1:
        axis = DoraAxis.OUT
    elif len(gs) >= 2 and rest_ones and gs[0] == 1 and (
            gs[1] == shape[1] if known else math.prod(shape[1:]) % gs[1] == 0):
        axis = DoraAxis.IN
    else:
        raise fail(codes.BAD_DORA_SCALE, name, f"dora_scale has shape {gs}; for a delta of "
                   f"shape {shape} it must be ({out}, 1, ...) or (1, in, ...)")
    if known and len(gs) != len(shape):
        raise fail(codes.BAD_DORA_SCALE, name, f"dora_scale has shape {gs}; it must have "
                   f"{len(shape)} dimensions like the weight {shape}")
    return Dora(scale=g, axis=axis)


def _check_dora_fits(rec: LycorisModule, dora: Dora, shape: tuple[int, ...]) -> None:
    gs = tuple(int(s) for s in dora.scale.shape)
    want = ((shape[0],) + (1,) * (len(shape) - 1) if dora.axis is DoraAxis.OUT
            else (1, shape[1]) + (1,) * (len(shape) - 2))
    if gs != want:
        raise fail(codes.BAD_DORA_SCALE, rec.name, f"dora_scale has shape {gs}; for the base "
                   f"weight {shape} it must be {want}")
