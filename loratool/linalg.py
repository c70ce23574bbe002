"""Low-rank kernels shared by every operation: delta W = s * B @ A handled in factored form.

Never forms the dense [out, in] matrix: a thin QR of B and of A^T and an SVD of the small
r x r core give the exact singular values and vectors in O((out + in) r^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


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


# ---------------------------------------------------------------------------------------------
# The resize/compose kernel (spec/lowrank.md): a thin QR on each side and an SVD of the core.
# ---------------------------------------------------------------------------------------------

class CoreSVD:
    """The SVD of ``scale * B @ A`` (B [m, r], A [r, n]) kept in factored form.

    ``B = Qb Rb`` and ``A^T = Qa Ra`` (thin QR); the core ``scale * Rb Ra^T`` is at most r x r
    and its SVD gives every singular value of the product. Nothing of size m x n is ever
    formed. ``S`` holds min(m, n, r) values, descending.

    Each side's R comes from the fastest method whose error stays below ``TOL`` (relative,
    about 1e-12 in float64), chosen per factor from kappa, the condition number of R with its
    columns scaled to unit norm (column scaling costs these methods no accuracy):

    * Cholesky QR: R from the Cholesky factor of the Gram matrix X^T X (one GEMM, several
      times faster than Householder), when eps * kappa^2 <= TOL;
    * otherwise Householder QR (any X, rank deficient included).

    Singular vectors need ``Q @ U_k``: computed as ``X @ (R^-1 U_k)`` (a small triangular
    solve and one GEMM) when eps * kappa <= TOL, else with Q formed from the Householder
    reflectors.

    >>> import torch
    >>> B, A = torch.randn(64, 32, dtype=torch.float64), torch.randn(32, 48, dtype=torch.float64)
    >>> svd = CoreSVD(B, A, scale=0.5)
    >>> B2, A2 = svd.factors(16)          # best rank-16 approximation, balanced, scale 1
    >>> tuple(B2.shape), tuple(A2.shape)
    ((64, 16), (16, 48))
    """

    TOL = 1e-12

    def __init__(self, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0,
                 dtype: torch.dtype = torch.float64):
        B = B.to(dtype)
        A = A.to(dtype)
        self._b = _QRSide(B)
        self._a = _QRSide(A.T)
        U, S, Vh = torch.linalg.svd((self._b.R @ self._a.R.T) * scale, full_matrices=False)
        self._U, self.S, self._Vh = U, S, Vh
        self.shape = (int(B.shape[0]), int(A.shape[1]))

    @property
    def max_rank(self) -> int:
        """Number of singular values: min(m, n, r)."""
        return int(self.S.numel())

    def vectors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k [m, k], Vh_k [k, n]): the leading singular vectors, signs made canonical.

        The sign of each pair is fixed so that the entry of largest magnitude of u_i is
        positive (ties: the first), so the output does not depend on LAPACK's sign choices.
        """
        Uk = self._b.apply_q(self._U[:, :k])
        Vhk = self._a.apply_q(self._Vh[:k].T).T
        if k:
            idx = Uk.abs().argmax(dim=0)
            signs = torch.sign(Uk.gather(0, idx[None, :])[0])
            signs[signs == 0] = 1
            Uk = Uk * signs
            Vhk = Vhk * signs[:, None]
        return Uk, Vhk

    def factors(self, k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced (B' [m, k], A' [k, n]) with ``scale * B' @ A' = U_k S_k Vh_k``.

        Each side carries sqrt(S_k / |scale|), so B' and A' have equal column/row norms; a
        negative scale (negative alpha) puts its sign on B'.
        """
        if scale == 0 or not math.isfinite(scale):
            raise ValueError(f"scale {scale!r} must be finite and non-zero")
        Uk, Vhk = self.vectors(k)
        root = torch.sqrt(self.S[:k] / abs(scale))
        return Uk * (root * math.copysign(1.0, scale)), root[:, None] * Vhk

    def retained(self, k: int) -> float:
        """Fraction of the Frobenius norm kept by rank k: sqrt(sum_{i<k} s_i^2 / sum s_i^2)."""
        total = float(torch.sum(self.S * self.S))
        if total == 0.0:
            return 1.0
        return min(1.0, float(torch.sum(self.S[:k] ** 2)) / total) ** 0.5

    def residual(self, k: int) -> float:
        """Relative Frobenius error of the rank-k truncation: sqrt(sum_{i>=k} s_i^2 / sum s_i^2).

        Computed from the dropped values themselves, so it stays accurate when tiny.
        """
        total = float(torch.sum(self.S * self.S))
        if total == 0.0:
            return 0.0
        return (float(torch.sum(self.S[k:] ** 2)) / total) ** 0.5


class _QRSide:
    """Thin QR of a factor X [m, r] (see ``CoreSVD``): ``R``, and ``apply_q(Y)`` = Q @ Y."""

    def __init__(self, X: torch.Tensor):
        self.X = X
        m, r = X.shape
        self.k = min(m, r)
        self._Q = self._h = None
        self._solve = False
        self.method = "householder"
        eps = torch.finfo(X.dtype).eps
        if m >= r and r > 0:
            self.R = self._cholesky(X, eps)
            if self.R is not None:
                self.method, self._solve = "cholesky", True
                return
        self._h, self._tau = torch.geqrf(X)
        self.R = self._h[:self.k].triu()  # [k, r]
        if m >= r and r > 0:
            kappa = _scaled_cond(self.R)
            self._solve = kappa is not None and eps * kappa <= CoreSVD.TOL

    @staticmethod
    def _cholesky(X, eps):
        G = X.T @ X
        d = torch.sqrt(torch.diagonal(G))
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            return None
        L, info = torch.linalg.cholesky_ex(G / d[:, None] / d[None, :])
        if int(info) != 0:
            return None
        Rs = L.T  # upper, unit-norm columns scaled: X D^-1 = Q Rs
        kappa = float(torch.linalg.cond(Rs))
        if not math.isfinite(kappa) or eps * kappa * kappa > CoreSVD.TOL:
            return None
        return Rs * d[None, :]

    def apply_q(self, Y: torch.Tensor) -> torch.Tensor:
        """Q @ Y for Y [k, j]."""
        if self._solve:  # Q = X R^-1
            return self.X @ torch.linalg.solve_triangular(self.R, Y, upper=True)
        if self._Q is None:
            self._Q = torch.linalg.householder_product(self._h[:, :self.k], self._tau[:self.k])
        return self._Q @ Y


def _scaled_cond(R) -> float | None:
    """Condition number of R with unit-norm columns (None if a column is zero)."""
    d = torch.linalg.vector_norm(R, dim=0)
    if not bool((d > 0).all()):
        return None
    kappa = float(torch.linalg.cond(R / d[None, :]))
    return kappa if math.isfinite(kappa) else None


def concat_factors(parts, dtype: torch.dtype = torch.float64):
    """Exact factors of ``sum_i c_i B_i @ A_i``: ``B = [c_1 B_1 | c_2 B_2 ...]``, ``A = [A_1; A_2 ...]``.

    ``parts`` is an iterable of (B_i [m, r_i], A_i [r_i, n], c_i). The coefficient goes on the
    B side only, so A keeps its values exactly; computed in ``dtype``.
    """
    Bs, As = [], []
    for B, A, c in parts:
        Bs.append(B.to(dtype) * c)
        As.append(A.to(dtype))
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def difference_norm(B1, A1, s1, B2, A2, s2, dtype: torch.dtype = torch.float64) -> float:
    """||s2 B2 A2 - s1 B1 A1||_F from the R factors of the concatenation.

    Unlike sqrt(|d1|^2 + |d2|^2 - 2<d1, d2>), this does not lose half the digits when the two
    deltas are nearly equal.
    """
    B, A = concat_factors([(B2, A2, s2), (B1, A1, -s1)], dtype)
    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.T, mode="r")[1]
    return float(torch.linalg.matrix_norm(Rb @ Ra.T))


# ---------------------------------------------------------------------------------------------
# Rank selection (spec/lowrank.md, "Rank rules"): evaluated exactly, in rational arithmetic, on
# the binary64 singular values and the binary64 parameter, so a boundary is never off by one.
# ---------------------------------------------------------------------------------------------

RANK_RULES = ("rank", "fro", "sv_ratio", "cumulative")


@dataclass(frozen=True)
class RankChoice:
    """The rank chosen for one module and why."""

    rank: int  # the new rank, 1 <= rank <= limit
    rule_rank: int  # what the rule alone asked for (before min/max clamps and the limit)
    limit: int  # the largest rank the module can have: min(r, out, in * prod(kernel))
    clamped: bool  # the rule (after --min-rank/--max-rank) asked for more than ``limit``


def check_rank_rule(*, rank=None, fro=None, sv_ratio=None, cumulative=None, max_rank=None,
                    min_rank=None, required: bool = True) -> str | None:
    """Validate a rank rule; return the name of the rule given (or None when optional).

    Raises ``OperationError`` LT530 naming the bad argument and its allowed range.
    """
    from .errors import OperationError
    given = {k: v for k, v in (("rank", rank), ("fro", fro), ("sv_ratio", sv_ratio),
                               ("cumulative", cumulative)) if v is not None}
    if len(given) > 1:
        raise OperationError(f"give one rank rule, not {len(given)} ({', '.join(given)}): "
                             "choose one of rank, fro, sv_ratio, cumulative", code="LT530")
    if not given and required:
        raise OperationError("no rank rule: pass one of rank=K, fro=F, sv_ratio=R or "
                             "cumulative=C (CLI: --rank, --fro, --sv-ratio, --cumulative)",
                             code="LT530")

    def need(name, value, ok, what):
        if value is None:
            return
        good = False
        try:
            good = not isinstance(value, bool) and ok(value)
        except TypeError:
            pass
        if not good:
            raise OperationError(f"{name} = {value!r}: must be {what}", code="LT530")

    is_int = lambda v: isinstance(v, int) or (hasattr(v, "__index__") and int(v) == v)  # noqa: E731
    finite = lambda v: math.isfinite(float(v))  # noqa: E731
    need("rank", rank, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("max_rank", max_rank, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("min_rank", min_rank, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("fro", fro, lambda v: finite(v) and 0 < float(v) <= 1, "a fraction in (0, 1]")
    need("cumulative", cumulative, lambda v: finite(v) and 0 < float(v) <= 1,
         "a fraction in (0, 1]")
    need("sv_ratio", sv_ratio, lambda v: finite(v) and float(v) >= 1, "a ratio >= 1")
    if min_rank is not None and max_rank is not None and min_rank > max_rank:
        raise OperationError(f"min_rank {min_rank} is larger than max_rank {max_rank}",
                             code="LT530")
    return next(iter(given), None)


def rule_rank(S, *, rank=None, fro=None, sv_ratio=None, cumulative=None) -> int:
    """The rank a rule selects from descending singular values S (exact, see module notes).

    - rank K:        K
    - fro F:         smallest k with  sum_{i<=k} s_i^2  >=  F^2 * sum_i s_i^2
    - sv_ratio R:    number of i with  s_i * R >= s_1   (keeps s_i >= s_1 / R)
    - cumulative C:  smallest k with  sum_{i<=k} s_i  >=  C * sum_i s_i
    A zero delta (s_1 = 0, or no values) selects 1. The result is not clamped to len(S).
    """
    if rank is not None:
        return int(rank)
    values = [Fraction(float(s)) for s in S]
    if not values or values[0] == 0:
        return 1
    if fro is not None:
        sq = [v * v for v in values]
        return _prefix_rank(sq, Fraction(float(fro)) ** 2 * sum(sq))
    if cumulative is not None:
        return _prefix_rank(values, Fraction(float(cumulative)) * sum(values))
    if sv_ratio is not None:
        r = Fraction(float(sv_ratio))
        return sum(1 for v in values if v * r >= values[0])
    raise ValueError("no rank rule given")


def _prefix_rank(values, target) -> int:
    acc = Fraction(0)
    for i, v in enumerate(values):
        acc += v
        if acc >= target:
            return i + 1
    return len(values)  # unreachable for fractions <= 1; kept for safety


def select_rank(S, limit: int, *, rank=None, fro=None, sv_ratio=None, cumulative=None,
                max_rank=None, min_rank=None) -> RankChoice:
    """Apply a rule, then ``min_rank``/``max_rank``, then the module's ``limit`` (reported)."""
    k = rule_rank(S, rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative)
    wanted = k
    if min_rank is not None:
        wanted = max(wanted, int(min_rank))
    if max_rank is not None:
        wanted = min(wanted, int(max_rank))
    return RankChoice(rank=max(1, min(wanted, limit)), rule_rank=k, limit=limit,
                      clamped=wanted > limit)


# ---------------------------------------------------------------------------------------------
# Subspace similarity and amplification (spec/lowrank.md, sections 6 and 7): Hu et al. 2021,
# section 7, computed from the factors. Singular vectors come from ``CoreSVD``.
# ---------------------------------------------------------------------------------------------

def nonzero_rank(S: torch.Tensor, shape) -> int:
    """Number of singular values that binary64 can tell from zero: s_i > s_1 * max(shape) * 2^-52.

    Directions beyond it are not determined by the matrix (any orthonormal completion would
    do), so the subspace analyses use only these.
    """
    if S.numel() == 0 or not float(S[0]) > 0.0:
        return 0
    return int((S > S[0] * max(shape) * 2.0**-52).sum())


def singular_bases(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0):
    """(S, U [m, k], V [n, k]) of ``scale * B @ A`` in binary64, with k = ``nonzero_rank``.

    Columns ordered by descending singular value; from the thin QRs and the core SVD only.
    """
    svd = CoreSVD(B, A, scale)
    k = nonzero_rank(svd.S, svd.shape)
    U, Vh = svd.vectors(k)
    return svd.S, U, Vh.T


def row_space_basis(A: torch.Tensor):
    """(S, V [n, k]): right singular vectors of A [r, n] (the factored kernel with B = I)."""
    A = A.to(torch.float64)
    S, _, V = singular_bases(torch.eye(A.shape[0], dtype=torch.float64), A)
    return S, V


def subspace_similarity(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j) for orthonormal V1, V2.

    One product M = V1^T V2 and 2-D prefix sums of M^2. The two arguments are put in a fixed
    order (by size, then bytes) and the result transposed back, so that swapping them gives
    exactly the transposed grid. Values are clamped to [0, 1] (rounding can exceed 1 by ulps).
    """
    swap = (V1.shape[1], _key(V1)) > (V2.shape[1], _key(V2))
    if swap:
        V1, V2 = V2, V1
    M = V1.to(torch.float64).T @ V2.to(torch.float64)
    C = (M * M).cumsum(0).cumsum(1)
    i = torch.arange(1, M.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, M.shape[1] + 1, dtype=torch.float64)[None, :]
    phi = (C / torch.minimum(i, j)).clamp(0.0, 1.0)
    return phi.T if swap else phi


def _key(V: torch.Tensor) -> bytes:
    return V.detach().to(torch.float64).contiguous().numpy().tobytes()


def projection_norm(W2: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W2 V||_F for W2 [m, n], U [m, k], V [n, k] (binary64; one pass over W2)."""
    return float(torch.linalg.matrix_norm(U.T @ (W2 @ V)))


def random_basis(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal basis [n, k] of a uniformly random k-dimensional subspace of R^n.

    The span of k independent standard normal vectors is uniformly distributed; Q of its
    (Householder) QR is an orthonormal basis of that span.
    """
    G = torch.randn(n, k, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(G).Q
