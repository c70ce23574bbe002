"""The exact delta of a LyCORIS module, in float64, and the merged weight (DoRA included).

Semantics are those of LyCORIS's forward pass (``W' = W + m * dW``; DoRA renormalizes), not
of its ``merge_to``, which in 4.1.3 applies alpha / r twice for LoHa and LoKr.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import codes
from .codes import fail
from .parse import check_shape
from .records import DoraAxis, Full, LoCon, LoHa, LoKr, LycorisModule

F64 = torch.float64
# LyCORIS keeps dora_scale in float32 and adds float32's eps to the norm, whatever the dtype
DORA_EPS = float(torch.finfo(torch.float32).eps)


def f64(x: torch.Tensor) -> torch.Tensor:
    # torch.kron raises on non-contiguous CPU input in torch 2.13: keep every operand contiguous
    return x.detach().to(F64).contiguous()


def _tucker_side(t: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """P[i, (q, k)] = sum_j t[i, j, k] w_b[j, q]: a Tucker term R = w_a^T @ P, flattened."""
    r = int(t.shape[0])
    core = f64(t).reshape(r, int(t.shape[1]), -1)
    return torch.einsum("ijk,jq->iqk", core, f64(w_b)).reshape(r, -1)


def locon_factors(rec: LoCon) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, cols]) with dW = scale * B @ A; Tucker ``lora_mid`` folded into A."""
    r = rec.rank
    B = f64(rec.up).reshape(int(rec.up.shape[0]), r)
    if rec.mid is None:
        return B, f64(rec.down).reshape(r, -1)
    return B, _tucker_side(rec.mid, f64(rec.down).reshape(r, -1))


def loha_terms(rec: LoHa) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(B1, A1), (B2, A2)] with dW = scale * (B1 @ A1) * (B2 @ A2), all 2-D float64."""
    terms = []
    for a, b, t in ((rec.w1_a, rec.w1_b, rec.t1), (rec.w2_a, rec.w2_b, rec.t2)):
        if t is None:
            terms.append((f64(a), f64(b).reshape(int(b.shape[0]), -1)))
        else:
            terms.append((f64(a).T.contiguous(), _tucker_side(t, b)))
    return terms


def lokr_sides(rec: LoKr):
    """(w1, w2): each a dense 2-D float64 matrix or a (B, A) pair of 2-D factors;
    dW = scale * kron(w1, w2) in the 2-D (out, cols) form."""
    w1 = f64(rec.w1) if rec.w1 is not None else (f64(rec.w1_a), f64(rec.w1_b))
    if rec.w2 is not None:
        w2 = f64(rec.w2).reshape(int(rec.w2.shape[0]), -1)
    elif rec.t2 is not None:
        w2 = (f64(rec.w2_a).T.contiguous(), _tucker_side(rec.t2, rec.w2_b))
    else:
        w2 = (f64(rec.w2_a), f64(rec.w2_b).reshape(int(rec.w2_b.shape[0]), -1))
    return w1, w2


def _dense(side) -> torch.Tensor:
    return side if isinstance(side, torch.Tensor) else side[0] @ side[1]


def delta_2d(rec: LycorisModule) -> torch.Tensor:
    """scale * core as the 2-D (out, in * prod(kernel)) float64 matrix."""
    if isinstance(rec, LoCon):
        B, A = locon_factors(rec)
        core = B @ A
    elif isinstance(rec, LoHa):
        (B1, A1), (B2, A2) = loha_terms(rec)
        core = (B1 @ A1) * (B2 @ A2)
    elif isinstance(rec, LoKr):
        w1, w2 = lokr_sides(rec)
        core = torch.kron(_dense(w1).contiguous(), _dense(w2).contiguous())
    elif isinstance(rec, Full):
        core = f64(rec.diff).reshape(rec.out_features, -1)
    else:
        raise TypeError(f"not a LyCORIS record: {type(rec).__name__}")
    return core * rec.scale if rec.scale != 1.0 else core


def resolve_shape(rec: LycorisModule, shape: Sequence[int] | None) -> tuple[int, ...]:
    """The weight shape to give the delta: ``shape`` (checked), or the record's own.

    A conv module whose factors are flattened knows only (out, in * prod(kernel)); when its
    dora_scale shows it is a conv (more than 2 dimensions) the base shape is required (LT242).
    """
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        check_shape(rec, shape)
        return shape
    if not rec.shape_known and rec.dora is not None and rec.dora.scale.dim() > 2:
        raise fail(codes.NEED_BASE_SHAPE, rec.name, "its conv factors are stored flattened "
                   f"({rec.out_features}, {rec.columns}); pass the base weight's shape "
                   "(shape=W.shape) to know the kernel")
    return rec.shape


def delta(rec: LycorisModule, shape: Sequence[int] | None = None) -> torch.Tensor:
    """dW (float64) of one module in the base weight's layout, equal to what LyCORIS's forward
    adds at multiplier 1 (without DoRA; see ``merged_weight``).

    ``shape`` is the base weight's shape; without it a LoHa/LoKr conv module stored with
    flattened factors comes back as the 2-D (out, in * prod(kernel)) matrix (the right shape
    for a Linear layer).
    """
    return delta_2d(rec).reshape(resolve_shape(rec, shape))


def bias_delta(rec: LycorisModule) -> torch.Tensor | None:
    """The bias update (float64): ``diff_b`` of a full module, else None."""
    if isinstance(rec, Full) and rec.diff_b is not None:
        return f64(rec.diff_b)
    return None


def merged_weight(rec: LycorisModule, W: torch.Tensor, multiplier: float = 1.0
                  ) -> torch.Tensor:
    """W' (float64) as LyCORIS's forward computes it, for base weight W.

    Without DoRA: W' = W + m * dW. With DoRA (``dora_scale`` g): V = W + dW (m does not scale
    dW), n = ||V|| per output row (axis out) or input column (axis in), over every other
    dimension, then W' = V * (m * (g / (n + eps) - 1) + 1), eps = float32's eps as in
    LyCORIS; at m = 1 that is g * V / (n + eps).
    """
    Wd = f64(W)
    dW = delta(rec, tuple(W.shape))
    if rec.dora is None:
        return Wd + dW * multiplier if multiplier != 1 else Wd + dW
    V = Wd + dW
    g = f64(rec.dora.scale)
    if rec.dora.axis is DoraAxis.OUT:
        norm = torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1)
        norm = norm.reshape(V.shape[0], *[1] * (V.dim() - 1))
    else:
        norm = torch.linalg.vector_norm(V.transpose(0, 1).reshape(V.shape[1], -1), dim=1)
        norm = norm.reshape(1, V.shape[1], *[1] * (V.dim() - 2))
    factor = g / (norm + DORA_EPS)
    if multiplier != 1:
        factor = multiplier * (factor - 1) + 1
    return V * factor

