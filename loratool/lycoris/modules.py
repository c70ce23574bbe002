"""LyCORIS modules inside loratool's adapter model (``model.ModuleInfo``/``LoraModule``).

Every LyCORIS module is carried as its plain-LoRA form (spec/lycoris.md section 5), so every
command that works on LoRA factors works on it unchanged; the parsed record rides along for
what that form cannot say:

* LoCon, LoHa, LoKr: the exact factors, float64 (variant ``lora``);
* full ``diff``: identity factors ``I @ diff`` (exact in any dtype) at rank min(out, in*k),
  ``diff_b`` as the bias (variant ``FullDiff``: plain-LoRA writers refuse it);
* DoRA: the factors of its delta and the record, whose ``merged_weight`` the merge applies
  (variant ``LycorisDora``: not additive, so unmerge, resize and compose refuse it).

No torch here: ``HeaderTensor`` lets the parser check shapes from a safetensors header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..model import LoraModule, ModuleInfo
from ..variants import FullDiff, Lora, LycorisDora, ModuleVariant
from .records import Full, LoHa, LoKr, LycorisModule

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class HeaderTensor:
    """A tensor known by its header entry: what ``parse_module`` reads (shape, dtype, and for
    ``alpha`` the value, read on request without torch)."""

    def __init__(self, dtype: str, shape, value=None):
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self._value = value  # callable giving the float (alpha only)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype in FLOAT_DTYPES or self.dtype.startswith("F8")

    def reshape(self, *shape):
        return self

    def item(self) -> float:
        return float(self._value())


def variant_for(rec: LycorisModule) -> type[ModuleVariant]:
    if isinstance(rec, Full):
        return FullDiff
    return LycorisDora if rec.dora is not None else Lora


def _full_rank(rows: int, cols: int, r: int | None) -> int:
    """The rank of one LoKr side: its stored r when factored and r fits, else min(dims)."""
    return r if r is not None and r <= min(rows, cols) else min(rows, cols)


def structural_rank(rec: LycorisModule) -> int:
    """The rank of the plain-LoRA form from shapes alone: exact for LoCon, LoHa and full
    (generic rank); for LoKr a full side counts min of its dimensions, which its numerical
    rank (``lycoris.lora_rank``, from the values) can only lower."""
    if isinstance(rec, LoHa):
        r1, r2 = rec.ranks
        return r1 * r2
    if isinstance(rec, LoKr):
        a, c = rec.w1_shape
        r1 = _full_rank(a, c, None if rec.w1_b is None else int(rec.w1_b.shape[0]))
        b, cols2 = rec.out_features // a, rec.columns // c
        r2 = _full_rank(b, cols2, None if rec.w2_b is None else int(rec.w2_b.shape[0]))
        return r1 * r2
    if isinstance(rec, Full):
        return min(rec.out_features, rec.columns)
    return rec.rank


def rank_is_exact(rec: LycorisModule) -> bool:
    """Whether ``structural_rank`` is the plain-LoRA rank itself: all but a LoKr side stored
    full (or factored at an r above its dimensions), whose rank is numerical."""
    if not isinstance(rec, LoKr):
        return True
    a, c = rec.w1_shape
    sides = ((rec.w1_b, min(a, c)),
             (rec.w2_b, min(rec.out_features // a, rec.columns // c)))
    return all(b is not None and int(b.shape[0]) <= lim for b, lim in sides)


def describe(rec: LycorisModule, plain_rank: int, exact_rank: bool) -> dict:
    """The per-module facts ``inspect`` shows (``lycoris`` in a module's row)."""
    ranks = (list(rec.ranks) if isinstance(rec, LoHa) else
             [] if rec.rank is None else [rec.rank])
    tucker = any(rec.tensors.get(p) is not None for p in ("lora_mid.weight", "hada_t1",
                                                            "lokr_t2"))
    return {"family": rec.family.value, "ranks": ranks, "plain_lora_rank": plain_rank,
            "plain_lora_rank_exact": exact_rank, "tucker": tucker,
            "dora": None if rec.dora is None else rec.dora.axis.value,
            "shape": list(rec.shape), "shape_known": rec.shape_known,
            "stored_alpha": rec.alpha, "scale": rec.scale}


def lora_shapes(rec: LycorisModule, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) of the plain-LoRA form at ``rank`` in kohya/loratool layout."""
    k = tuple(rec.shape[2:])
    return (rank, *rec.shape[1:]), (rec.out_features, rank, *[1] * len(k))


@dataclass(frozen=True)
class LycorisModuleInfo(ModuleInfo):
    """``ModuleInfo`` of a LyCORIS module (shapes of its plain-LoRA form) with its facts."""

    lycoris: dict = field(default_factory=dict, compare=False)
    variant_name: str = Lora.name

    @property
    def variant(self) -> type[ModuleVariant]:
        return {v.name: v for v in (Lora, LycorisDora, FullDiff)}[self.variant_name]

    @property
    def parameters(self) -> int:
        return int(self.lycoris.get("parameters", 0)) or super().parameters


@dataclass
class LycorisLoraModule(LoraModule):
    """A LyCORIS module in its plain-LoRA form, with the parsed record (``record``)."""

    record: Any = None

    @property
    def variant(self) -> type[ModuleVariant]:
        return variant_for(self.record)

    @property
    def info(self) -> LycorisModuleInfo:
        base = LoraModule.info.fget(self)
        facts = describe(self.record, self.rank, True)
        facts["parameters"] = sum(math.prod(t.shape) for p, t in self.record.tensors.items()
                                  if p != "alpha")
        return LycorisModuleInfo(**{f: getattr(base, f) for f in (
            "name", "kind", "layout", "a_shape", "b_shape", "alpha", "scaling", "dtype",
            "magnitude", "bias")}, lycoris=facts, variant_name=self.variant.name)

    def with_tensors(self, **changes) -> LoraModule:
        """A renamed module keeps its record; one whose factors, alpha or bias change is a
        plain LoRA module from then on (the record would no longer describe it)."""
        if set(changes) <= {"name"}:
            from dataclasses import replace
            return replace(self, **changes)
        if not self.variant.additive:
            raise ValueError(f"module {self.name!r}: {self.variant.described} has no "
                             "plain-LoRA form to change")
        fields = {f: getattr(self, f) for f in ("name", "kind", "layout", "A", "B", "alpha",
                                                "scaling", "magnitude", "bias")}
        return LoraModule(**{**fields, **changes})


def merge_fn(rec: LycorisModule, shape, multiplier: float):
    """The merge of a module whose result depends on W (DoRA): 2-D W in, W' out (float64),
    computed by ``lycoris.merged_weight`` on W in its own ``shape``."""
    shape = tuple(int(s) for s in shape)

    def apply(w2):
        from . import merged_weight
        W = w2.reshape(shape).cpu()  # the record's tensors are on the CPU
        return merged_weight(rec, W, multiplier).reshape(w2.shape).to(w2.device)
    return apply


def identity_factors(rec: Full):
    """A full diff as ``I @ diff`` on its smaller side: exact in the diff's own dtype.
    Returns (A, B, bias)."""
    import torch
    out, cols = rec.out_features, rec.columns
    d2 = rec.diff.reshape(out, cols)
    k = tuple(rec.shape[2:])
    if out <= cols:
        A = d2.reshape(out, *rec.shape[1:])
        B = torch.eye(out, dtype=rec.diff.dtype).reshape(out, out, *[1] * len(k))
    else:
        A = torch.eye(cols, dtype=rec.diff.dtype).reshape(cols, *rec.shape[1:])
        B = d2.reshape(out, cols, *[1] * len(k))
    return A, B, rec.diff_b
