"""Exact conversion of LyCORIS modules to plain LoRA factors, in closed form (spec/lycoris.md).

* LoCon: (up, down), Tucker ``lora_mid`` folded into down: rank r.
* LoHa: (B1 A1) * (B2 A2) = (B1 . B2)(A1 .' A2), the row-wise Khatri-Rao (face-splitting)
  product on the left and the column-wise one on the right: rank r1 * r2 (Tucker: B_k = w_k_a^T,
  A_k = t_k contracted with w_k_b, then the same).
* LoKr: kron(W1, B2 A2) = kron(U1 S1, B2) kron(V1^T, A2) with the thin SVD W1 = U1 S1 V1^T:
  rank rank(W1) * r; a factored w1 needs no SVD (rank r1 * r); a full w2 is split the same way
  by its own SVD (rank rank(W1) * rank(W2), generically min(out, in): exact, not smaller). A
  factored side whose r exceeds its dimensions is SVD'd too (it counts its numerical rank).
* Full diff: no closed form; on request a dense SVD (``dense_svd=True``), error reported.
* DoRA: no LoRA form at all (its update depends on W): refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import codes
from .codes import fail
from .deltas import f64, lokr_sides, locon_factors, loha_terms, resolve_shape
from .records import Full, LoCon, LoHa, LoKr, LycorisModule


@dataclass(frozen=True)
class LoraFactors:
    """A plain LoRA equivalent of one module: dW = scale * B @ A (float64, 2-D).

    ``B`` is (out, rank) and ``A`` (rank, in * prod(kernel)); ``up()``/``down()`` give them in
    the kohya/LoCon layout of ``shape``. ``exact``: built in closed form (error at rounding
    level, <= 1e-12 relative in float64); ``retained``/``residual``: the Frobenius fraction
    kept and the relative Frobenius error of a truncation or dense SVD (1.0 and 0.0 when
    exact); ``source_rank``: the rank before truncation.
    """

    name: str
    B: torch.Tensor
    A: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    exact: bool = True
    retained: float = 1.0
    residual: float = 0.0
    source_rank: int | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def alpha(self) -> float:
        """The alpha a plain LoRA file stores for this scale: scale * rank."""
        return self.scale * self.rank

    def up(self) -> torch.Tensor:
        """B as ``lora_up.weight``: (out, rank) for linear, (out, rank, 1, ...) for conv."""
        return self.B.reshape(self.B.shape[0], self.rank, *[1] * (len(self.shape) - 2))

    def down(self) -> torch.Tensor:
        """A as ``lora_down.weight``: (rank, in) or (rank, in, *kernel)."""
        return self.A.reshape(self.rank, *self.shape[1:])

    def delta(self) -> torch.Tensor:
        """scale * B @ A in the weight's shape (float64)."""
        return (self.B @ self.A * self.scale).reshape(self.shape)


def to_lora(rec: LycorisModule, shape: Sequence[int] | None = None, *,
            dense_svd: bool = False) -> LoraFactors:
    """The plain LoRA form of one module, exact and in closed form.

    ``shape`` is the base weight's shape (needed for the conv layout of flattened LoHa/LoKr
    factors, see ``delta``). A full ``diff`` is refused (LT243) unless ``dense_svd``: then it
    is factored by a dense SVD at its numerical rank and the error is reported. DoRA modules
    are refused (LT243): their update depends on the base weight.

    Example::

        f = to_lora(parse_module("lora_unet_x", tensors))
        f.rank, f.up().shape, f.down().shape
    """
    if rec.dora is not None:
        raise fail(codes.NO_LORA_FORM, rec.name, "has dora_scale: DoRA renormalizes the whole "
                   "weight W + dW, which no plain LoRA of this module expresses; merge it into "
                   "the base instead")
    shp = resolve_shape(rec, shape)
    if isinstance(rec, LoCon):
        B, A = locon_factors(rec)
    elif isinstance(rec, LoHa):
        (B1, A1), (B2, A2) = loha_terms(rec)
        B, A = face_split(B1, B2), khatri_rao(A1, A2)
    elif isinstance(rec, LoKr):
        B, A = _lokr(*lokr_sides(rec))
    elif isinstance(rec, Full):
        if not dense_svd:
            raise fail(codes.NO_LORA_FORM, rec.name, "is a full diff: it has no closed-form "
                       "low-rank factors; ask for a dense SVD (dense_svd=True) to factor it "
                       "with a reported error, or keep it as a diff")
        return _dense_svd(rec, shp)
    else:
        raise TypeError(f"not a LyCORIS record: {type(rec).__name__}")
    return LoraFactors(rec.name, B, A, rec.scale, shp, source_rank=int(A.shape[0]))


def face_split(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: (m, r1), (m, r2) -> (m, r1 * r2), row i = kron(B1_i, B2_i)."""
    return (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], -1)


def khatri_rao(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: (r1, n), (r2, n) -> (r1 * r2, n)."""
    return (A1[:, None, :] * A2[None, :, :]).reshape(-1, A1.shape[1])


def _split(side) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with side = L @ R: a factored side as it is when its r fits its dimensions,
    else (and for a dense side) the thin SVD at its numerical rank (L = U S, R = V^T), so the
    Kronecker rank is as small as the factors allow."""
    if not isinstance(side, torch.Tensor):
        L, R = side
        if L.shape[1] <= min(L.shape[0], R.shape[1]):
            return L, R
        side = L @ R  # e.g. decompose_both with r > c: w1_b (r, c) caps the rank at c
    U, S, Vh = torch.linalg.svd(side, full_matrices=False)
    k = _numerical_rank(S, side.shape)
    return (U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous()


def _numerical_rank(S: torch.Tensor, shape) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 1  # a zero factor: keep one (zero) column so the factors stay well-formed
    tol = float(S[0]) * max(shape) * torch.finfo(S.dtype).eps
    return max(1, int((S > tol).sum()))


def _lokr(w1, w2) -> tuple[torch.Tensor, torch.Tensor]:
    """kron(L1 R1, L2 R2) = kron(L1, L2) @ kron(R1, R2) (mixed-product rule)."""
    # torch.kron (torch 2.13, CPU) raises on strided input, even on a "contiguous" (n, 1)
    # column of stride (1, n) as an SVD slice gives: copy to standard strides
    L1, R1 = (t.clone(memory_format=torch.contiguous_format) for t in _split(w1))
    L2, R2 = (t.clone(memory_format=torch.contiguous_format) for t in _split(w2))
    return torch.kron(L1, L2), torch.kron(R1, R2)


def _dense_svd(rec: Full, shape: tuple[int, ...]) -> LoraFactors:
    D = f64(rec.diff).reshape(rec.out_features, -1)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = _numerical_rank(S, D.shape)
    total = float((S * S).sum())
    residual = 0.0 if total == 0 else math.sqrt(float((S[k:] ** 2).sum()) / total)
    return LoraFactors(rec.name, (U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), 1.0,
                       shape, exact=False, retained=math.sqrt(max(0.0, 1 - residual ** 2)),
                       residual=residual, source_rank=k)


def truncate(f: LoraFactors, *, rank: int | None = None, fro: float | None = None,
             sv_ratio: float | None = None, cumulative: float | None = None,
             max_rank: int | None = None, min_rank: int | None = None) -> LoraFactors:
    """The best approximation of ``f`` at the rank a rule selects (loratool's resize kernel,
    ``linalg.CoreSVD``: thin QR of B and A^T, SVD of the small core; never the dense delta).

    Exactly one rule, as for ``loratool resize``: ``rank``, ``fro`` (keep that fraction of the
    Frobenius norm), ``sv_ratio`` or ``cumulative``; ``max_rank``/``min_rank`` clamp. The
    result keeps ``scale`` and reports ``retained`` (Frobenius fraction kept) and ``residual``.
    A rule that keeps the whole rank returns ``f`` itself.
    """
    from ..linalg import CoreSVD, check_rank_rule, select_rank
    check_rank_rule(rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative,
                    max_rank=max_rank, min_rank=min_rank)
    svd = CoreSVD(f.B, f.A, f.scale)
    limit = min(f.rank, f.B.shape[0], f.A.shape[1])
    k = select_rank(svd.S, limit, rank=rank, fro=fro, sv_ratio=sv_ratio,
                    cumulative=cumulative, max_rank=max_rank, min_rank=min_rank).rank
    if k >= f.rank:
        return f
    B, A = svd.factors(k, f.scale)
    residual = svd.residual(k)
    if f.residual:  # a dense SVD already dropped directions orthogonal to these: add them
        residual = math.sqrt(f.residual ** 2 + (1 - f.residual ** 2) * residual ** 2)
    return replace(f, B=B, A=A, exact=False, retained=math.sqrt(max(0.0, 1 - residual ** 2)),
                   residual=residual, source_rank=f.source_rank)


def lora_rank(rec: LycorisModule, shape: Sequence[int] | None = None) -> int:
    """The rank of ``to_lora(rec)`` (LoCon r; LoHa r1 * r2; LoKr rank(w1) * rank(w2), a
    factored side counting its r when r <= min of its dimensions). Computes the small SVDs LoKr needs, nothing dense."""
    return to_lora(rec, shape, dense_svd=True).rank
