"""How much of a merged delta survived the output's rounding: the report of every merge into
a quantized or 8-bit-float type (GGUF bases, spec/gguf.md; FP8 safetensors bases,
spec/merge.md section 4.6).

Per tensor, with W the (dequantized) base, delta the float64 update and eff = decode(out) - W
what the written file really changed: ``retained = ||eff|| / ||delta||``, ``kept = <eff,
delta> / ||delta||^2`` (the share of the delta's direction that survived) and ``rel_error =
||eff - delta|| / ||delta||``. Overall: the same ratios of the sums over tensors. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorMerge:
    name: str
    base_type: str
    out_type: str
    delta_norm: float
    change_norm: float       # ||decode(out) - W||
    retained: float | None   # change_norm / delta_norm
    kept: float | None       # <eff, delta> / ||delta||^2
    rel_error: float | None  # ||eff - delta|| / ||delta||


def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class RetainedDelta:
    """Accumulates ``TensorMerge`` rows and the overall ratios."""

    def __init__(self) -> None:
        self.tensors: list[TensorMerge] = []
        self._sums = np.zeros(4)  # ||delta||^2, ||eff||^2, <eff, delta>, ||eff - delta||^2

    def add(self, name: str, base_type: str, out_type: str, eff: np.ndarray,
            delta: np.ndarray) -> TensorMerge:
        """One tensor: ``eff`` = decode(out) - W and ``delta``, both float64."""
        dn, cn = float(np.linalg.norm(delta)), float(np.linalg.norm(eff))
        inner, err = float(np.vdot(eff, delta)), float(np.linalg.norm(eff - delta))
        row = TensorMerge(name, base_type, out_type, dn, cn, ratio(cn, dn),
                          ratio(inner, dn * dn), ratio(err, dn))
        self.tensors.append(row)
        self._sums += (dn * dn, cn * cn, inner, err * err)
        return row

    def overall(self) -> tuple[float | None, float | None, float | None]:
        """(retained, kept, rel_error) over every tensor added."""
        dd, cc, ii, ee = (float(x) for x in self._sums)
        return ratio(cc ** 0.5, dd ** 0.5), ratio(ii, dd), ratio(ee ** 0.5, dd ** 0.5)
