"""The adapter model: what every format is read into and every operation works on.

``ModuleInfo`` and ``AdapterInfo`` describe an adapter from its header alone (no torch, no
tensor data); ``LoraModule`` and ``Adapter`` hold the tensors. Rank is always the shape of A.

Conventions (spec section "Tensors"): for every kind, delta W is the matrix
``s * B.reshape(out, r) @ A.reshape(r, -1)`` of shape [out, in * prod(kernel)], where
``s = alpha / r`` (standard) or ``alpha / sqrt(r)`` (rsLoRA). It is added to the base tensor
``<module>.weight`` as:
  linear, layout out_in: W[out, in]      += delta
  linear, layout in_out: W[in, out]      += delta.T   (GPT-2 Conv1D / fan_in_fan_out)
  embedding (in_out):    W[num, dim]     += delta.T   (in = num_embeddings, out = dim)
  conv:                  W[out, in, *k]  += delta.reshape(out, in, *k)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .format import (KIND_CONV, KIND_EMBEDDING, LAYOUT_IN_OUT, SCALING_STANDARD,
                     scale_for)
from .variants import ModuleVariant, variant_of

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModuleInfo:
    """Shape-level facts of one adapted module."""

    name: str
    kind: str
    layout: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    alpha: float
    scaling: str = SCALING_STANDARD
    dtype: str = "F32"
    magnitude: bool = False  # DoRA
    bias: bool = False

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def out_features(self) -> int:
        return self.b_shape[0]

    @property
    def in_features(self) -> int:
        return self.a_shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.a_shape[2:])

    @property
    def scale(self) -> float:
        return scale_for(self.alpha, self.rank, self.scaling)

    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of the 2-D delta matrix s * B @ A."""
        return self.out_features, self.in_features * math.prod(self.kernel)

    @property
    def variant(self) -> type[ModuleVariant]:
        """How this module updates its base weight (``variants.Lora``, ``variants.Dora``)."""
        return variant_of(self.magnitude)

    @property
    def transposed(self) -> bool:
        """Whether the base tensor holds the delta transposed ([in, out]): embeddings and
        ``in_out`` linears. The one place this rule is written."""
        return self.kind == KIND_EMBEDDING or self.layout == LAYOUT_IN_OUT

    @property
    def base_shape(self) -> tuple[int, ...]:
        """Shape the base tensor ``<name>.weight`` must have."""
        if self.kind == KIND_CONV:
            return (self.out_features, self.in_features, *self.kernel)
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def parameters(self) -> int:
        n = math.prod(self.a_shape) + math.prod(self.b_shape)
        return n + (self.out_features if self.magnitude else 0) + (
            self.out_features if self.bias else 0)


@dataclass
class LoraModule:
    """One adapted module with its tensors (torch)."""

    name: str
    kind: str
    layout: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    scaling: str = SCALING_STANDARD
    magnitude: torch.Tensor | None = None  # DoRA magnitude, shape [out]
    bias: torch.Tensor | None = None  # lora_bias, shape [out]; bias += scale * lora_bias

    @property
    def info(self) -> ModuleInfo:
        from .tensors import st_dtype
        return ModuleInfo(self.name, self.kind, self.layout, tuple(self.A.shape),
                          tuple(self.B.shape), float(self.alpha), self.scaling,
                          st_dtype(self.A), self.magnitude is not None, self.bias is not None)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def variant(self) -> type[ModuleVariant]:
        """How this module updates its base weight (``variants.Lora``, ``variants.Dora``)."""
        return variant_of(self.magnitude is not None)

    @property
    def scale(self) -> float:
        return scale_for(self.alpha, self.rank, self.scaling)

    def factors(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B2, A2): 2-D factors with delta = scale * B2 @ A2, shapes [out, r] and [r, in*k]."""
        B2 = self.B.reshape(self.B.shape[0], self.rank)
        A2 = self.A.reshape(self.rank, -1)
        if dtype is not None:
            B2, A2 = B2.to(dtype), A2.to(dtype)
        return B2, A2

    def delta_matrix(self, dtype=None) -> torch.Tensor:
        """Dense scale * B @ A as a 2-D [out, in*k] matrix (in fp64 unless told otherwise)."""
        import torch
        B2, A2 = self.factors(dtype or torch.float64)
        return (B2 @ A2) * self.scale

    def delta(self, dtype=None) -> torch.Tensor:
        """Dense delta in the shape and orientation of the base tensor ``<name>.weight``.

        DoRA modules have no additive delta; merging them needs the base (see ops.merge).
        """
        d = self.delta_matrix(dtype)
        return to_base_layout(d, self.info)

    def with_tensors(self, **changes) -> LoraModule:
        return replace(self, **changes)


def to_base_layout(delta2d, info: ModuleInfo):
    """Reshape/transpose a 2-D [out, in*k] delta into the base tensor's shape."""
    if info.kind == KIND_CONV:
        return delta2d.reshape(info.base_shape)
    return delta2d.T if info.transposed else delta2d


@dataclass(frozen=True)
class ReplacementInfo:
    """Header-level facts of one replacement entry (format 1.1): a base tensor replaced whole
    (``rows is None``) or in the rows given by an index."""

    target: str  # the base tensor, e.g. "score.weight"
    shape: tuple[int, ...]  # of the stored values: the whole tensor, or [rows, ...]
    dtype: str
    rows: int | None = None

    @property
    def kind(self) -> str:
        return "full" if self.rows is None else "rows"

    def to_dict(self) -> dict:
        return {"target": self.target, "kind": self.kind, "shape": list(self.shape),
                "dtype": self.dtype, **({} if self.rows is None else {"rows": self.rows})}


@dataclass
class Replacement:
    """A base tensor replaced by stored values, as PEFT's ``modules_to_save``, saved embedding
    layers and trained biases (whole tensor) or ``trainable_token_indices`` (rows) are merged:
    the values are written, not added. ``index`` (int64 [k]) names the rows ``value`` [k, ...]
    replaces; None means ``value`` is the whole tensor."""

    target: str
    value: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def info(self) -> ReplacementInfo:
        from .tensors import st_dtype
        return ReplacementInfo(self.target, tuple(self.value.shape), st_dtype(self.value),
                               None if self.index is None else int(self.index.numel()))


@dataclass(kw_only=True)
class _AdapterFacts:
    alpha: float
    base_model: str | None = None
    base_model_hash: str | None = None
    provenance: str | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)  # other tools' keys, kept
    source_format: str = "loratool"
    # how the factors were initialised when that changed the base (PiSSA, OLoRA...): the
    # adapter then applies to the residual model, not the original base (``loratool.init``)
    init: dict | None = None


@dataclass(kw_only=True)
class AdapterInfo(_AdapterFacts):
    """An adapter described from its header: no tensor data read, no torch imported."""

    path: str
    format_version: str
    modules: dict[str, ModuleInfo]
    tensor_hash: str | None = None
    tensor_bytes: int = 0
    details: dict = field(default_factory=dict)  # source-format facts for inspect
    replacements: dict[str, ReplacementInfo] = field(default_factory=dict)

    @property
    def scaling(self) -> str:
        return _common_scaling(m.scaling for m in self.modules.values())


@dataclass(kw_only=True)
class Adapter(_AdapterFacts):
    """An adapter with its tensors; modules are kept sorted by name."""

    modules: dict[str, LoraModule]
    replacements: dict[str, Replacement] = field(default_factory=dict)  # by base tensor

    def __post_init__(self):
        self.modules = dict(sorted(self.modules.items()))
        self.replacements = dict(sorted(self.replacements.items()))

    @property
    def scaling(self) -> str:
        return _common_scaling(m.scaling for m in self.modules.values())


def _common_scaling(scalings) -> str:
    found = set(scalings)
    if len(found) == 1:
        return found.pop()
    return "mixed" if found else SCALING_STANDARD
