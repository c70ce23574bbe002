"""Rank rules of ``extract`` (spec/extract.md section 5), evaluated on a ``Spectrum``.

A rule either picks k from the singular values it has, or says that the sketch is too small
to decide (``satisfied=False``), and the engine grows the sketch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from ...errors import OperationError

RULES = ("rank", "fro", "sv_ratio", "cumulative", "max_error", "auto_rank")
AUTO_MARGIN = 2.0  # auto rank keeps singular values above this many noise floors


@dataclass(frozen=True)
class Rule:
    name: str
    value: float | int | None
    max_rank: int | None
    min_rank: int


@dataclass(frozen=True)
class Choice:
    rank: int  # after clamps
    rule_rank: int  # what the rule alone selected
    reason: str
    satisfied: bool  # the spectrum at hand was enough to decide


def check_rule(*, rank, fro, sv_ratio, cumulative, max_error, auto_rank, max_rank,
               min_rank) -> Rule:
    """Exactly one rule, every value in range; LT530 otherwise (as resize)."""
    from ...linalg import check_rank_rule
    given = [n for n, v in (("rank", rank), ("fro", fro), ("sv_ratio", sv_ratio),
                            ("cumulative", cumulative), ("max_error", max_error))
             if v is not None]
    if auto_rank:
        given.append("auto_rank")
    if len(given) != 1:
        raise OperationError(
            ("no rank rule" if not given else f"{len(given)} rank rules ({', '.join(given)})")
            + ": pass exactly one of rank=K, fro=F, sv_ratio=R, cumulative=C, max_error=E, "
            "auto_rank=True (CLI: --rank, --fro, --sv-ratio, --cumulative, --max-error, "
            "--auto-rank)", code="LT530")
    check_rank_rule(rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative,
                    max_rank=max_rank, min_rank=min_rank, required=False)
    if max_error is not None:
        ok = not isinstance(max_error, bool)
        try:
            ok = ok and math.isfinite(float(max_error)) and 0 <= float(max_error) < 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise OperationError(f"max_error = {max_error!r}: must be a relative error in "
                                 "[0, 1)", code="LT530")
    name = given[0]
    value = {"rank": rank, "fro": fro, "sv_ratio": sv_ratio, "cumulative": cumulative,
             "max_error": max_error, "auto_rank": None}[name]
    return Rule(name, value, max_rank, min_rank or 1)


def sketch_size(rule: Rule, limit: int, oversample: int, start: int) -> int:
    """Columns of the first sketch."""
    want = int(rule.value) if rule.name == "rank" else start
    if rule.max_rank is not None:
        want = min(want, rule.max_rank)
    return min(limit, max(want, rule.min_rank) + oversample)


def choose(spec, rule: Rule, limit: int, m: int, n: int) -> Choice:
    """The rank for one tensor's spectrum (see the module docstring)."""
    S = [float(s) for s in spec.S]
    k, reason, ok = _rule_rank(spec, S, rule, m, n)
    wanted = max(k, rule.min_rank)
    notes = []
    if wanted > k:
        notes.append(f"raised to min_rank {rule.min_rank}")
    if rule.max_rank is not None and wanted > rule.max_rank:
        wanted = rule.max_rank
        notes.append(f"capped by max_rank {rule.max_rank}")
        ok = True  # more sketch cannot change the answer
    available = min(limit, len(S))
    if wanted > available:
        if spec.complete or len(S) >= limit:
            notes.append(f"clamped to the matrix rank limit {limit}")
            wanted = available
            ok = True
        else:
            ok = False
    if notes:
        reason += "; " + ", ".join(notes)
    return Choice(max(1, min(wanted, available)), k, reason, ok)


def _rule_rank(spec, S, rule: Rule, m: int, n: int) -> tuple[int, str, bool]:
    total = spec.fro2
    done = spec.complete
    if rule.name == "rank":
        return int(rule.value), f"fixed rank {rule.value}", True
    if not S or S[0] == 0.0:
        return 1, "zero difference", True
    if rule.name == "fro":
        f = Fraction(float(rule.value))
        target = f * f * Fraction(total)
        acc = Fraction(0)
        for i, s in enumerate(S):
            acc += Fraction(s) * Fraction(s)
            if acc >= target:
                return i + 1, f"smallest rank keeping {rule.value} of the Frobenius norm", True
        return len(S) + 1, "fro: not reached by the sketch", done
    if rule.name == "max_error":
        bound = float(rule.value) ** 2 * total
        for k in range(len(S) + 1):
            if spec.error2(k) <= bound:
                return max(k, 1), (f"smallest rank with relative error <= {rule.value}"), True
        return len(S) + 1, "max_error: not reached by the sketch", done
    if rule.name == "sv_ratio":
        r = Fraction(float(rule.value))
        k = sum(1 for s in S if Fraction(s) * r >= Fraction(S[0]))
        seen_cut = k < len(S) or done or math.sqrt(spec.res2) * float(rule.value) < S[0]
        return k, f"singular values >= s_max / {rule.value}", seen_cut
    if rule.name == "cumulative":  # exact path only (see spec): S is the whole spectrum
        from ...linalg import rule_rank
        return (rule_rank(spec.S, cumulative=rule.value),
                f"smallest rank keeping {rule.value} of the sum of singular values", True)
    # auto_rank
    floor = spec.noise_floor(m, n)
    cut = AUTO_MARGIN * floor
    k = sum(1 for s in S if s > cut)
    reached = k < len(S) or done
    if k == 0:
        return 1, (f"auto: no singular value above {AUTO_MARGIN:g} x the rounding-noise "
                   f"floor {floor:.3g} (s_max {S[0]:.3g}): the difference looks like noise"), True
    gap = f"{S[k - 1] / S[k]:.3g}x" if k < len(S) and S[k] > 0 else "inf"
    return k, (f"auto: {k} singular value(s) above {AUTO_MARGIN:g} x the rounding-noise floor "
               f"{floor:.3g}; gap s_{k}/s_{k + 1} = {gap}"), reached
