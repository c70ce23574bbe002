"""LoRA on a parameter (PEFT ``target_parameters``): one low-rank delta per expert of a
stacked 3-D parameter, such as an MoE layer's ``experts.gate_up_proj`` [E, ., .].

Expert ``e`` of the parameter gets ``s * B[e] @ A[e]`` ([out, in]), with ``A`` [E, r, in] and
``B`` [E, out, r]; the parameter holds each expert's matrix as [out, in] (layout ``out_in``)
or transposed [in, out] (``in_out``, transformers' ``is_transposed`` experts such as GptOss).
A 2-D parameter is the one-expert case (PEFT's ``num_experts == 1``), stored [out, in].
The base tensor is the parameter itself (``<module>``, no ``.weight`` suffix).

The merge adds the per-expert deltas when it reaches the parameter (``merge_fn``); the other
operations see the exact factor form of the delta in the base tensor's 2-D view
``W.reshape(E, -1)``: the identity [E, E] times the flattened per-expert deltas. It is
additive, so ``unmerge`` subtracts it the same way. The loratool format and the other
writers have no such kind (yet): ``convert`` refuses it by name. No torch at import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .format import LAYOUT_IN_OUT
from .model import LoraModule, ModuleInfo
from .variants import ModuleVariant, ParamLora

KIND_EXPERTS = "experts"
LAYOUT_UNKNOWN = "unknown"  # read without a base: the parameter's orientation is not known


@dataclass(frozen=True)
class ExpertsModuleInfo(ModuleInfo):
    """``ModuleInfo`` of a parameter LoRA: ``a_shape`` [E, r, in], ``b_shape`` [E, out, r];
    ``stacked`` False for a 2-D parameter (one expert)."""

    stacked: bool = True
    parameter: str = ""  # the parameter's own name (``gate_up_proj``), for inspect

    tensor_suffix = ""  # the base tensor is ``<name>`` itself

    @property
    def experts(self) -> int:
        return self.a_shape[0]

    @property
    def rank(self) -> int:
        return self.a_shape[1]

    @property
    def out_features(self) -> int:
        return self.b_shape[1]

    @property
    def in_features(self) -> int:
        return self.a_shape[2]

    @property
    def kernel(self) -> tuple[int, ...]:
        return ()

    @property
    def transposed(self) -> bool:
        return False  # base_shape already says the orientation; the factor form is row-wise

    @property
    def expert_shape(self) -> tuple[int, int]:
        o, i = self.out_features, self.in_features
        return (i, o) if self.layout == LAYOUT_IN_OUT else (o, i)

    @property
    def base_shape(self) -> tuple[int, ...]:
        return (self.experts, *self.expert_shape) if self.stacked else self.expert_shape

    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of the factor form's product: the parameter's view [E, d1 * d2]."""
        return self.experts, math.prod(self.expert_shape)

    @property
    def parameters(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape)

    @property
    def variant(self) -> type[ModuleVariant]:
        return ParamLora


@dataclass
class ExpertsLoraModule(LoraModule):
    """A parameter LoRA with its tensors: ``A`` [E, r, in], ``B`` [E, out, r] (torch)."""

    stacked: bool = True
    parameter: str = ""

    @property
    def info(self) -> ExpertsModuleInfo:
        from .tensors import st_dtype
        return ExpertsModuleInfo(self.name, self.kind, self.layout, tuple(self.A.shape),
                                 tuple(self.B.shape), float(self.alpha), self.scaling,
                                 st_dtype(self.A), stacked=self.stacked,
                                 parameter=self.parameter)

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def variant(self) -> type[ModuleVariant]:
        return ParamLora

    def expert_deltas(self, dtype=None):
        """[E, d1, d2]: ``B[e] @ A[e]`` per expert in the parameter's orientation, unscaled
        (float64 unless told otherwise)."""
        import torch
        dtype = dtype or torch.float64
        d = torch.bmm(self.B.to(dtype), self.A.to(dtype))  # [E, out, in]
        return d.transpose(1, 2) if self.layout == LAYOUT_IN_OUT else d

    def factors(self, dtype=None):
        """(L, R) with delta = scale * L @ R in the parameter's 2-D view [E, d1 * d2]: the
        identity and the flattened per-expert products (exact: each entry is 1 * x)."""
        import torch
        dtype = dtype or torch.float64
        E = int(self.A.shape[0])
        return torch.eye(E, dtype=dtype), self.expert_deltas(dtype).reshape(E, -1)

    def merge_fn(self, scale: float):
        """The merge's ``fn`` update of the parameter's 2-D view ``W2`` [E, d1 * d2]:
        ``W2 + scale * deltas``, the deltas made in W2's dtype (float64 on the exact path) only
        when this parameter is merged, so a merge never holds them all."""
        def apply(w2):
            d = self.expert_deltas(w2.dtype).reshape(w2.shape).to(w2.device)
            return w2.add(d, alpha=scale)
        return apply

    def delta(self, dtype=None):
        """Dense delta in the parameter's shape."""
        return self.delta_matrix(dtype).reshape(self.info.base_shape)


def is_experts(module) -> bool:
    return getattr(module, "kind", None) == KIND_EXPERTS
