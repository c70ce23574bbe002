"""Low-rank kernels shared by every operation: delta W = s * B @ A handled in factored form.

Never forms the dense [out, in] matrix: a thin QR of B and of A^T and an SVD of the small
r x r core give the exact singular values and vectors in O((out + in) r^2).
"""

from __future__ import annotations

import torch


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0,
                 dtype: torch.dtype = torch.float64):
    """SVD of ``scale * B @ A`` for B [m, r], A [r, n]: returns U [m, k], S [k], Vh [k, n].

    k = min(m, n, r); the singular values come back in descending order.
    """
    B = B.to(dtype)
    A = A.to(dtype)
    Qb, Rb = torch.linalg.qr(B)  # [m, k1], [k1, r]
    Qa, Ra = torch.linalg.qr(A.T)  # [n, k2], [k2, r]
    core = (Rb @ Ra.T) * scale  # [k1, k2]
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``scale * B @ A`` (descending), from the r x r core only."""
    B = B.to(dtype)
    A = A.to(dtype)
    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.T, mode="r")[1]
    return torch.linalg.svdvals((Rb @ Ra.T) * scale)


def inner(B1, A1, s1, B2, A2, s2, dtype: torch.dtype = torch.float64) -> float:
    """Frobenius inner product <s1 B1 A1, s2 B2 A2> = s1 s2 tr((B1^T B2)(A2 A1^T))."""
    B1, A1, B2, A2 = (t.to(dtype) for t in (B1, A1, B2, A2))
    return float(s1 * s2 * torch.sum((B1.T @ B2) * (A1 @ A2.T)))


def frobenius_norm(B, A, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> float:
    """||scale * B @ A||_F in factored form."""
    return max(inner(B, A, scale, B, A, scale, dtype), 0.0) ** 0.5


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], eps: float) -> int:
    """Count of singular values above S_max * max(shape) * eps (the spec's effective rank)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > S[0] * max(shape) * eps).sum())
