"""The factored kernels (loratool/linalg.py) against dense fp64 references, and the exact rank
rules of spec/lowrank.md at their boundaries."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.errors import OperationError
from loratool.linalg import (CoreSVD, check_rank_rule, concat_factors, difference_norm,
                             frobenius_norm, inner, numerical_rank, rule_rank, select_rank,
                             singular_values)

from _lowrank_helpers import cosine, factored_svd, truncated


def _factors(m, n, r, seed=0, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * decay ** torch.arange(r)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    return B, A


# --- kernels vs dense ------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,r", [(30, 20, 5), (7, 40, 9), (40, 6, 8), (16, 16, 16)])
def test_core_svd_matches_dense(m, n, r):
    B, A = _factors(m, n, r)
    D = 0.75 * B @ A
    svd = CoreSVD(B, A, 0.75)
    ref = torch.linalg.svdvals(D)[:min(m, n, r)]
    assert svd.max_rank == min(m, n, r)
    assert torch.allclose(svd.S, ref, rtol=1e-12, atol=1e-12 * float(ref[0]))
    for k in range(1, svd.max_rank + 1):
        Uk, Vhk = svd.vectors(k)
        assert torch.allclose(Uk.T @ Uk, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(Vhk @ Vhk.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
        Bk, Ak = svd.factors(k)
        assert float((Bk @ Ak - truncated(D, k)).norm()) <= 1e-11 * float(D.norm())
        # balanced: column norms of B' equal row norms of A' (both sqrt(s_i))
        assert torch.allclose(Bk.norm(dim=0), Ak.norm(dim=1), rtol=1e-12)
        assert svd.retained(k) == pytest.approx(
            math.sqrt(float((ref[:k] ** 2).sum() / (ref ** 2).sum())), rel=1e-12)
        assert svd.residual(k) == pytest.approx(
            float((D - truncated(D, k)).norm() / D.norm()), rel=1e-9, abs=1e-13)


def test_factors_fold_a_scale_including_negative():
    B, A = _factors(12, 9, 4)
    svd = CoreSVD(B, A, 2.0)
    for scale in (0.25, 3.0, -0.5):
        Bk, Ak = svd.factors(3, scale)
        assert torch.allclose(scale * Bk @ Ak, truncated(2.0 * B @ A, 3), atol=1e-12)
    with pytest.raises(ValueError):
        svd.factors(2, 0.0)


def test_signs_are_canonical():
    B, A = _factors(20, 15, 5)
    Uk, Vhk = CoreSVD(B, A).vectors(5)
    U2, Vh2 = CoreSVD(-B, -A).vectors(5)  # same product, other LAPACK signs
    assert torch.allclose(Uk, U2, atol=1e-12) and torch.allclose(Vhk, Vh2, atol=1e-12)
    top = Uk.abs().argmax(dim=0)
    assert bool((Uk[top, torch.arange(5)] > 0).all())


def test_rank_deficient_and_zero_factors():
    B, A = _factors(10, 8, 3)
    Bc, Ac = concat_factors([(B, A, 1.0), (B, A, -1.0)])  # exactly zero sum
    svd = CoreSVD(Bc, Ac)
    assert float(svd.S.max()) <= 1e-12 * float(B.norm() * A.norm())
    z = CoreSVD(torch.zeros(10, 3), torch.zeros(3, 8))
    assert float(z.S.abs().max()) == 0.0 and z.retained(1) == 1.0 and z.residual(1) == 0.0
    Bk, Ak = z.factors(2)
    assert float(Bk.abs().max()) == 0.0 and float(Ak.abs().max()) == 0.0


def _conditioned(m, r, kappa, seed):
    """X [m, r] = Q diag(logspace(0, -log10 kappa)) V^T: unit-ish columns, condition kappa."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    return Q @ torch.diag(torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("kappa,method,solve", [
    (1.0, "cholesky", True), (50.0, "cholesky", True), (1e3, "householder", True),
    (1e5, "householder", False), (None, "householder", False)])
def test_each_qr_path_matches_dense(kappa, method, solve):
    """Cholesky QR, Householder + triangular solve, Householder + explicit Q: all exact."""
    m, n, r = 60, 45, 8
    if kappa is None:  # exactly rank deficient: a repeated column
        B = _conditioned(m, r, 10.0, 1)
        B[:, 3] = B[:, 2]
    else:
        B = _conditioned(m, r, kappa, 1)
    A = torch.randn(r, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = A * torch.logspace(0, -1, r, dtype=torch.float64)[:, None]
    svd = CoreSVD(B, A, 1.5)
    assert (svd._b.method, svd._b._solve) == (method, solve)
    D = 1.5 * B @ A
    ref = torch.linalg.svdvals(D)[:r]
    scale = float(B.norm() * A.norm()) * 1.5
    assert float((svd.S - ref).abs().max()) <= 1e-13 * scale
    for k in (1, 3, 5):
        Bk, Ak = svd.factors(k)
        if float(ref[k - 1] - ref[k]) > 1e-3 * float(ref[0]):  # truncation well defined
            assert float((Bk @ Ak - truncated(D, k)).norm()) <= 1e-11 * scale
        Uk, _ = svd.vectors(k)
        assert torch.allclose(Uk.T @ Uk, torch.eye(k, dtype=torch.float64), atol=1e-10)


def test_column_scaling_does_not_change_the_path():
    B = _conditioned(50, 6, 10.0, 3) * torch.logspace(0, -8, 6, dtype=torch.float64)
    A = torch.randn(6, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    svd = CoreSVD(B, A)
    assert svd._b.method == "cholesky"
    ref = torch.linalg.svdvals(B @ A)[:6]
    assert torch.allclose(svd.S, ref, rtol=1e-12)


def test_legacy_helpers_still_agree():
    B, A = _factors(25, 18, 6)
    D = 1.5 * B @ A
    U, S, Vh = factored_svd(B, A, 1.5)
    assert torch.allclose((U * S) @ Vh, D, atol=1e-11)
    assert torch.allclose(singular_values(B, A, 1.5), torch.linalg.svdvals(D)[:6], rtol=1e-12)
    assert frobenius_norm(B, A, 1.5) == pytest.approx(float(D.norm()), rel=1e-12)
    assert numerical_rank(S, (25, 18), 2.0**-52) == 6


def test_inner_cosine_difference_against_dense():
    B1, A1 = _factors(14, 11, 3, seed=1)
    B2, A2 = _factors(14, 11, 5, seed=2)
    D1, D2 = 0.5 * B1 @ A1, -2.0 * B2 @ A2
    assert inner(B1, A1, 0.5, B2, A2, -2.0) == pytest.approx(float((D1 * D2).sum()), rel=1e-12)
    assert cosine(B1, A1, 0.5, B2, A2, -2.0) == pytest.approx(
        float((D1 * D2).sum() / (D1.norm() * D2.norm())), rel=1e-12)
    assert difference_norm(B1, A1, 0.5, B2, A2, -2.0) == pytest.approx(
        float((D2 - D1).norm()), rel=1e-12)
    assert cosine(B1, A1, 0.5, B1, A1, 0.5) == pytest.approx(1.0, abs=1e-15)
    assert cosine(B1, A1, 0.5, torch.zeros_like(B1), A1, 1.0) is None
    # nearly equal deltas: the QR form keeps the small difference accurate
    eps = 1e-9
    d = difference_norm(B1, A1, 1.0, B1, A1, 1.0 + eps)
    assert d == pytest.approx(eps * float((B1 @ A1).norm()), rel=1e-5)


def test_concat_factors_is_the_weighted_sum():
    parts = [(*_factors(9, 7, r, seed=r), c) for r, c in ((2, 0.5), (3, -1.25), (1, 4.0))]
    B, A = concat_factors(parts)
    assert B.shape == (9, 6) and A.shape == (6, 7)
    ref = sum(c * b @ a for b, a, c in parts)
    assert torch.allclose(B @ A, ref, atol=1e-12)


# --- rank rules: exact boundaries --------------------------------------------------------------

def _after(x):
    return math.nextafter(x, math.inf)


def _before(x):
    return math.nextafter(x, -math.inf)


def S(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_fro_boundary():
    # S^2 = [9, 1 x7], total 16; F = 0.75 -> F^2 * 16 = 9 = first prefix exactly: kept at k=1.
    s = S(3, 1, 1, 1, 1, 1, 1, 1)
    assert rule_rank(s, fro=0.75) == 1
    assert rule_rank(s, fro=_before(0.75)) == 1
    assert rule_rank(s, fro=_after(0.75)) == 2
    # S^2 = [16, 9, 9 x4, 1 x3], total 64; F = 0.625 -> 25 = 16 + 9 exactly at k=2.
    s = S(4, 3, 3, 3, 3, 3, 1, 1, 1)
    assert rule_rank(s, fro=0.625) == 2
    assert rule_rank(s, fro=_after(0.625)) == 3
    assert rule_rank(s, fro=_before(0.625)) == 2
    assert rule_rank(s, fro=1.0) == 9
    # F = 1 drops exact zeros only
    assert rule_rank(S(2, 1, 1, 0, 0), fro=1.0) == 3


def test_sv_ratio_boundary():
    s = S(8, 4, 2, 1)
    assert rule_rank(s, sv_ratio=2.0) == 2  # 4 == 8 / 2 is kept (>=)
    assert rule_rank(s, sv_ratio=_before(2.0)) == 1
    assert rule_rank(s, sv_ratio=_after(2.0)) == 2
    assert rule_rank(s, sv_ratio=4.0) == 3
    assert rule_rank(s, sv_ratio=1.0) == 1
    assert rule_rank(S(4, 4, 1), sv_ratio=1.0) == 2  # ties with s_max are kept
    assert rule_rank(S(5, 0, 0), sv_ratio=1e300) == 1  # zeros never kept


def test_cumulative_boundary():
    s = S(4, 2, 1, 1)  # sum 8
    assert rule_rank(s, cumulative=0.75) == 2  # 4 + 2 == 0.75 * 8
    assert rule_rank(s, cumulative=_after(0.75)) == 3
    assert rule_rank(s, cumulative=_before(0.75)) == 2
    assert rule_rank(s, cumulative=0.5) == 1
    assert rule_rank(s, cumulative=1.0) == 4


def test_zero_delta_selects_one():
    for kw in ({"fro": 0.5}, {"sv_ratio": 3.0}, {"cumulative": 1.0}):
        assert rule_rank(S(0, 0, 0), **kw) == 1
        assert rule_rank(S(), **kw) == 1
    assert rule_rank(S(0, 0), rank=7) == 7


def test_boundaries_are_exact_not_float():
    # 0.1 is not 1/10 in binary: the rule uses the binary64 value exactly. With S = [1]*10,
    # cumulative 0.1 asks for sum >= 0.1000000000000000055... * 10, i.e. more than one value.
    s = S(*[1.0] * 10)
    assert Fraction(0.1) * 10 > 1
    assert rule_rank(s, cumulative=0.1) == 2
    assert rule_rank(s, cumulative=0.5) == 5


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=12), st.integers(1, 64),
       st.sampled_from(["fro", "cumulative", "sv_ratio"]))
def test_rules_against_integer_oracle(values, m, rule):
    """Integer singular values and F = m/64 (or R = 1 + m/8) make an exact integer oracle."""
    values = sorted(values, reverse=True)
    s = S(*values)
    if values[0] == 0:
        want = 1
    elif rule == "fro":
        total = sum(v * v for v in values)
        want = next(k for k in range(1, len(values) + 1)
                    if 64 * 64 * sum(v * v for v in values[:k]) >= m * m * total)
    elif rule == "cumulative":
        total = sum(values)
        want = next(k for k in range(1, len(values) + 1) if 64 * sum(values[:k]) >= m * total)
    else:  # R = (8 + m) / 8: keep v with v * (8 + m) >= 8 * s_max
        want = sum(1 for v in values if v * (8 + m) >= 8 * values[0])
    param = {"fro": m / 64, "cumulative": m / 64, "sv_ratio": (8 + m) / 8}[rule]
    assert rule_rank(s, **{rule: param}) == want


def test_select_rank_clamps_and_reports():
    s = S(8, 4, 2, 1)
    c = select_rank(s, 4, rank=10)
    assert (c.rank, c.rule_rank, c.limit, c.clamped) == (4, 10, 4, True)
    c = select_rank(s, 4, rank=4)
    assert (c.rank, c.clamped) == (4, False)
    c = select_rank(s, 4, sv_ratio=1.0, min_rank=3)
    assert (c.rank, c.rule_rank, c.clamped) == (3, 1, False)
    c = select_rank(s, 4, cumulative=1.0, max_rank=2)
    assert (c.rank, c.rule_rank) == (2, 4)
    c = select_rank(s, 3, fro=1.0, min_rank=5)  # min_rank above the limit: clamped
    assert (c.rank, c.clamped) == (3, True)


@pytest.mark.parametrize("kwargs", [
    {}, {"rank": 2, "fro": 0.5}, {"rank": 0}, {"rank": 2.5}, {"rank": True}, {"fro": 0.0},
    {"fro": 1.5}, {"fro": float("nan")}, {"sv_ratio": 0.5}, {"sv_ratio": float("inf")},
    {"cumulative": -0.1}, {"rank": 3, "min_rank": 0}, {"fro": 0.5, "min_rank": 5, "max_rank": 4},
    {"rank": "3"},
])
def test_check_rank_rule_rejects(kwargs):
    with pytest.raises(OperationError) as e:
        check_rank_rule(**kwargs)
    assert e.value.code == "LT530"


def test_check_rank_rule_accepts():
    assert check_rank_rule(rank=3) == "rank"
    assert check_rank_rule(fro=1.0, max_rank=4, min_rank=4) == "fro"
    assert check_rank_rule(sv_ratio=1.0) == "sv_ratio"
    assert check_rank_rule(cumulative=0.3) == "cumulative"
    assert check_rank_rule(required=False) is None
