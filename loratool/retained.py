"""How much of a merged delta survived the output's rounding: the report of every merge into
a quantized or 8-bit-float type (GGUF bases, spec/gguf.md; FP8 safetensors bases,
spec/merge.md section 4.6).

Per tensor, with W the (dequantized) base, delta the float64 update and eff = decode(out) - W
what the written file really changed: ``retained = ||eff|| / ||delta||``, ``kept = <eff,
delta> / ||delta||^2`` (the share of the delta's direction that survived) and ``rel_error =
||eff - delta|| / ||delta||``. Overall: the same ratios of the sums over tensors. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .stfile import matrix_shape


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


class TensorSums:
    """One tensor's ||delta||^2, ||eff||^2, <eff, delta> and ||eff - delta||^2, fed by row
    chunks: each row's float64 sum (numpy's pairwise sum), then the exactly rounded sum of the
    rows (``math.fsum``), so the figures do not depend on how the rows were chunked."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []  # (4, rows of a chunk) per chunk

    def update(self, eff: np.ndarray, delta: np.ndarray) -> None:
        """Rows of ``eff`` and ``delta`` (float64, 2-D: rows by columns)."""
        tmp = np.empty(eff.shape, np.float64)
        part = np.empty((4, eff.shape[0]), np.float64)
        for k, (x, y) in enumerate(((delta, delta), (eff, eff), (eff, delta))):
            np.multiply(x, y, out=tmp)
            np.add.reduce(tmp, axis=1, out=part[k])
        np.subtract(eff, delta, out=tmp)
        tmp *= tmp
        np.add.reduce(tmp, axis=1, out=part[3])
        self._rows.append(part)

    def totals(self) -> tuple[float, float, float, float]:
        if not self._rows:
            return 0.0, 0.0, 0.0, 0.0
        rows = np.concatenate(self._rows, axis=1)
        return tuple(math.fsum(r) for r in rows)


class RetainedDelta:
    """Accumulates ``TensorMerge`` rows and the overall ratios."""

    def __init__(self) -> None:
        self.tensors: list[TensorMerge] = []
        self._sums = np.zeros(4)  # ||delta||^2, ||eff||^2, <eff, delta>, ||eff - delta||^2

    def add(self, name: str, base_type: str, out_type: str, eff: np.ndarray,
            delta: np.ndarray) -> TensorMerge:
        """One whole tensor: ``eff`` = decode(out) - W and ``delta``, both float64."""
        sums = TensorSums()
        shape = matrix_shape(eff.shape)
        sums.update(eff.reshape(shape), delta.reshape(shape))
        return self.add_sums(name, base_type, out_type, sums)

    def add_sums(self, name: str, base_type: str, out_type: str, sums: TensorSums
                 ) -> TensorMerge:
        """One tensor from the ``TensorSums`` of its row chunks."""
        dd, ee, inner, rr = sums.totals()
        dn, cn, err = math.sqrt(dd), math.sqrt(ee), math.sqrt(rr)
        row = TensorMerge(name, base_type, out_type, dn, cn, ratio(cn, dn),
                          ratio(inner, dn * dn), ratio(err, dn))
        self.tensors.append(row)
        self._sums += (dn * dn, cn * cn, inner, err * err)
        return row

    def overall(self) -> tuple[float | None, float | None, float | None]:
        """(retained, kept, rel_error) over every tensor added."""
        dd, cc, ii, ee = (float(x) for x in self._sums)
        return ratio(cc ** 0.5, dd ** 0.5), ratio(ii, dd), ratio(ee ** 0.5, dd ** 0.5)
