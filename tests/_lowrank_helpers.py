"""Builders and dense fp64 oracles for the resize/compose/compare tests (spec/lowrank.md).

The oracles here never use loratool's kernels: the dense delta is the plain formula
``s * B.reshape(out, r) @ A.reshape(r, -1)`` and truncations use ``torch.linalg.svd``.
"""

from __future__ import annotations

import math

import torch

from _factory import adapter  # noqa: F401  (the tests import it from here)
from _factory import generator, randn, random_module
from loratool.linalg import frobenius_norm, inner
from loratool.model import LoraModule

# Unit roundoff (half an ulp at 1) of each storage dtype: the "u" of spec/lowrank.md.
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11}


def module(name="m", out=10, inp=12, rank=4, alpha=8.0, *, scaling="standard", kind="linear",
           layout="out_in", kernel=(), dtype=torch.float32, seed=0, decay=None, bias=False,
           magnitude=False) -> LoraModule:
    """A random module (``_factory.random_module``, drawn in fp64); ``decay`` scales B's
    columns by decay**i for a decaying spectrum."""
    g = generator(seed)
    m = random_module(g, name, out=out, inp=inp, rank=rank, alpha=alpha, kind=kind,
                      layout=layout, kernel=kernel, scaling=scaling, dtype=dtype,
                      draw=torch.float64, decay=decay)
    if bias:
        m.bias = randn(g, out, dtype=dtype, draw=torch.float64)
    if magnitude:
        m.magnitude = torch.rand(out, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return m


def scale_of(m: LoraModule) -> float:
    r = m.A.shape[0]
    return m.alpha / math.sqrt(r) if m.scaling == "rslora" else m.alpha / r


def dense(m: LoraModule) -> torch.Tensor:
    """The 2-D delta [out, in*k] in fp64 by the plain formula."""
    r = m.A.shape[0]
    B = m.B.to(torch.float64).reshape(m.B.shape[0], r)
    A = m.A.to(torch.float64).reshape(r, -1)
    return scale_of(m) * (B @ A)


def dense_bias(m: LoraModule) -> torch.Tensor | None:
    return None if m.bias is None else scale_of(m) * m.bias.to(torch.float64)


def truncated(D: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def svals(D: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(D)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    n = float(ref.norm())
    return float((x - ref).norm()) / n if n else float(x.norm())


def rebuild_bound(k: int, dtype) -> float:
    """spec/lowrank.md: a rebuilt rank-k module is within 3*sqrt(k)*u of its target (relative)."""
    return 3 * math.sqrt(k) * UNIT[dtype] + 1e-10


def diagonal_module(values, *, name="d", out=None, inp=None, alpha=None,
                    dtype=torch.float64) -> LoraModule:
    """A module whose delta is diag(values) padded: its singular values are exactly |values|.

    rank = len(values), alpha = rank (scale 1), B = diag(values) on top, A = identity rows.
    """
    r = len(values)
    out = out or r
    inp = inp or r
    B = torch.zeros(out, r, dtype=dtype)
    B[:r, :r] = torch.diag(torch.tensor(values, dtype=dtype))
    A = torch.zeros(r, inp, dtype=dtype)
    A[:, :r] = torch.eye(r, dtype=dtype)
    return LoraModule(name, "linear", "out_in", A, B, float(alpha or r))


# Test-only helpers moved out of loratool.linalg (no library code used them).

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


def cosine(B1, A1, s1, B2, A2, s2, dtype: torch.dtype = torch.float64) -> float | None:
    """Cosine similarity <d1, d2> / (|d1| |d2|) of two deltas in factored form; None if one is 0."""
    n1 = frobenius_norm(B1, A1, s1, dtype)
    n2 = frobenius_norm(B2, A2, s2, dtype)
    if n1 == 0.0 or n2 == 0.0:
        return None
    c = inner(B1, A1, s1, B2, A2, s2, dtype) / (n1 * n2)
    return max(-1.0, min(1.0, c))
