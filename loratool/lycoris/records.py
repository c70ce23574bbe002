"""Typed records of one LyCORIS module, one class per family (spec/lycoris.md).

A record keeps the file's tensors untouched (``tensors``, by LyCORIS parameter name) so a
writer can reproduce them bit for bit; every computation on it happens in float64 elsewhere
(``delta``, ``to_lora``). ``shape`` is the base weight's shape as far as it is known: given by
the caller, or read from the tensors; LoHa and LoKr store conv factors flattened to
(r, in * prod(kernel)), so without the base shape such a module only knows the 2-D
(out, in * prod(kernel)) form, and ``shape_known`` is False.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # records also hold header-only shape stubs (interop.lycoris): no torch
    import torch


class Family(str, enum.Enum):
    """LyCORIS algorithms, as detected from parameter names."""

    LOCON = "locon"  # also plain kohya LoRA
    LOHA = "loha"
    LOKR = "lokr"
    FULL = "full"
    # detected and named, not supported (their delta depends on the base weight)
    IA3 = "ia3"
    GLORA = "glora"
    OFT = "oft"
    BOFT = "boft"
    NORM = "norm"


SUPPORTED = (Family.LOCON, Family.LOHA, Family.LOKR, Family.FULL)


class DoraAxis(str, enum.Enum):
    """The axis along which DoRA takes the norm of W + dW, read from dora_scale's shape."""

    OUT = "out"  # dora_scale (out, 1, ...): one norm per output row (LyCORIS default since 2025)
    IN = "in"  # dora_scale (1, in, ...): one norm per input column (older files)


@dataclass(frozen=True)
class Dora:
    """``dora_scale`` (g) and its axis."""

    scale: torch.Tensor
    axis: DoraAxis


@dataclass(frozen=True, kw_only=True)
class LycorisModule:
    """What every family shares. ``alpha`` is the stored alpha; None when absent or 0."""

    family: ClassVar[Family]
    name: str
    shape: tuple[int, ...]
    shape_known: bool
    alpha: float | None
    dora: Dora | None
    tensors: Mapping[str, torch.Tensor]

    @property
    def rank(self) -> int | None:
        """The r of scale = alpha / r (None when no factor is low-rank)."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """The factor LyCORIS's forward applies to the core product: alpha / r, alpha absent
        or 0 meaning alpha = r (so 1); 1 when the family has no alpha (full, LoKr both full)."""
        r = self.rank
        if r is None or self.alpha is None:
            return 1.0
        return self.alpha / r

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def columns(self) -> int:
        """in * prod(kernel): the width of the 2-D form of the delta."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True, kw_only=True)
class LoCon(LycorisModule):
    """kohya LoRA / LoCon: ``lora_up`` (out, r[, 1...]), ``lora_down`` (r, in[, *k]) or,
    with Tucker, ``lora_down`` (r, in, 1...) and ``lora_mid`` (r, r, *k)."""

    family: ClassVar[Family] = Family.LOCON
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True, kw_only=True)
class LoHa(LycorisModule):
    """LoHa: dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b). Without Tucker ``w*_a`` is (out, r)
    and ``w*_b`` (r, in * prod(k)); with Tucker ``w*_a`` is (r, out), ``w*_b`` (r, in) and
    ``t*`` (r, r, *k). r = w1_b.shape[0]."""

    family: ClassVar[Family] = Family.LOHA
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def ranks(self) -> tuple[int, int]:
        """(r1, r2), the ranks of the two Hadamard terms."""
        return int(self.w1_b.shape[0]), int(self.w2_b.shape[0])


@dataclass(frozen=True, kw_only=True)
class LoKr(LycorisModule):
    """LoKr: dW = scale * reshape(kron(w1, w2), shape). w1 is ``lokr_w1`` (a, c) or
    ``w1_a`` (a, r) @ ``w1_b`` (r, c); w2 is ``lokr_w2`` (b, d[, *k]) or ``w2_a`` (b, r) @
    ``w2_b`` (r, d * prod(k)), or with Tucker ``t2`` (r, r, *k), ``w2_a`` (r, b), ``w2_b``
    (r, d). out = a * b, in = c * d."""

    family: ClassVar[Family] = Family.LOKR
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """w2_b's rank if w2 is factored, else w1_b's; None when both are full (scale 1:
        LyCORIS sets alpha = r before saving, the stored alpha means nothing)."""
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    @property
    def w1_shape(self) -> tuple[int, int]:
        """(a, c)."""
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        return int(self.w1_a.shape[0]), int(self.w1_b.shape[1])


@dataclass(frozen=True, kw_only=True)
class Full(LycorisModule):
    """Full / diff: dW = ``diff`` (the weight's shape), db = ``diff_b`` (out,); no alpha."""

    family: ClassVar[Family] = Family.FULL
    diff: torch.Tensor
    diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> None:
        return None
