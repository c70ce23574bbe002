"""The numerical engine: the spectrum of dW = tuned - base for one tensor, streamed.

Small matrices (or a sketch that would cover half the spectrum) get an exact float64 SVD of
the dense difference. Larger ones get a randomized subspace iteration on the right side that
reads row blocks of both checkpoints (see spec/extract.md section 4):

* pass 1: ``Y = dW Omega`` and ``H = dW^T Y`` per row block (Omega Gaussian, seeded), fused
  with the byte comparison that skips unchanged tensors, ``||dW||_F^2`` and the rounding-noise
  estimate; ``Z = orth(H)``;
* each of the ``power`` passes: ``H = dW^T (dW Z)``, ``Z = orth(H)``;
* last pass: ``Y = dW Z`` and, in the same pass, the residual ``||dW - Y Z^T||_F^2`` summed
  block by block (``Y`` rows of a block depend only on that block).

``dW ~ Y Z^T`` and the SVD of the small ``Y`` give singular triplets whose truncation error is
``res2 + sum_{i>k} s_i^2``, both terms computed directly (no subtraction of large numbers).
Growing the sketch adds columns orthogonal to ``Z``; the old ``Y`` columns are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import OperationError
from .reader import Pair

# Matrices with at most this many elements take the exact path (a dense float64 SVD). A test
# knob, not an option: the answer does not depend on it beyond rounding.
EXACT_MAX_ELEMENTS = 1 << 18
OVERSAMPLE = 10  # extra sketch columns beyond the rank looked for
POWER = 1  # power passes (each one more read of both tensors)
START_RANK = 32  # first sketch size of the adaptive rules (doubles while not satisfied)

# Significant bits of each float dtype: one ulp of x is 2^(exponent(x) - bits).
PRECISION_BITS = {"BF16": 8, "F16": 11, "F32": 24, "F64": 53}


@dataclass
class Spectrum:
    """Singular triplets of an approximation of dW ([m, n], the stored tensor as a matrix).

    ``dW = U diag(S) Vh + R`` with ``||R||_F^2 = res2`` exactly (R = 0 on the exact path) and
    R orthogonal to every rank-k truncation of ``U diag(S) Vh``, so the error of keeping k
    triplets is ``sqrt(res2 + sum_{i>k} S_i^2)``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    fro2: float  # ||dW||_F^2, summed in float64 block by block
    res2: float
    method: str  # "exact" or "randomized"
    passes: int  # reads of both tensors
    noise2: float  # sum over elements of (ulp of tuned)^2 / 12: the rounding noise variance
    complete: bool  # the sketch spans the whole row space: no further singular values

    def error2(self, k: int) -> float:
        tail = self.S[k:]
        return self.res2 + float(torch.sum(tail * tail))

    def noise_floor(self, m: int, n: int) -> float:
        """Expected largest singular value of the tuned checkpoint's rounding noise: iid
        entries of variance noise2/(m n) have a top singular value near std (sqrt m + sqrt n)."""
        if m * n == 0:
            return 0.0
        return math.sqrt(self.noise2 / (m * n)) * (math.sqrt(m) + math.sqrt(n))


class Stats:
    """What the first pass learns besides the sketch."""

    def __init__(self, noise: bool):
        self.fro2 = 0.0
        self.noise2 = 0.0
        self.identical = True
        self.zero_blocks: set[int] = set()
        self._noise = noise

    def add(self, i: int, d: torch.Tensor, t: torch.Tensor, same: bool, dtype: str) -> None:
        if same:
            self.zero_blocks.add(i)
        else:
            self.identical = False
            self.fro2 += _sq(d)
        if self._noise and dtype in PRECISION_BITS:
            x = t.to(torch.float64).abs()
            exponent = torch.frexp(x).exponent
            ulp = torch.ldexp(torch.ones_like(x), exponent - PRECISION_BITS[dtype])
            ulp[x == 0] = 0.0
            self.noise2 += float(torch.sum(ulp * ulp)) / 12.0


def _diff(b, t) -> torch.Tensor:
    # float64 holds every bf16/fp16/fp32 value exactly, so the difference is rounded once.
    return t.to(torch.float64) - b.to(torch.float64)


class Scratch:
    """Two reused float64 block buffers: per-block allocations of tens of MiB fragment the C
    heap until RSS grows with the number of tensors; reusing them keeps it flat."""

    def __init__(self):
        self._bufs = [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]

    def get(self, i: int, shape) -> torch.Tensor:
        need = shape[0] * shape[1]
        if self._bufs[i].numel() < need:
            self._bufs[i] = torch.empty(need, dtype=torch.float64)
        return self._bufs[i][:need].view(shape[0], shape[1])

    def diff(self, b, t) -> torch.Tensor:
        """t - b in float64, in buffer 0 (buffer 1 stays free for the caller)."""
        d = self.get(0, tuple(t.shape))
        d.copy_(t)
        tmp = self.get(1, tuple(b.shape))
        tmp.copy_(b)
        return d.sub_(tmp)


def _sq(x) -> float:
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat))


def check_finite(pair: Pair, stats: Stats) -> None:
    if not math.isfinite(stats.fro2):
        raise OperationError(f"tensor {pair.name!r}: tuned - base holds NaN or Inf values (or "
                             "overflows float64); exclude it with --modules", code="LT543",
                             module=pair.name)


def exact(pair: Pair, *, noise: bool) -> Spectrum | None:
    """Dense float64 SVD of dW; None when the tensors are bit-identical."""
    stats = Stats(noise)
    parts = []
    for i, (start, stop) in enumerate(pair.blocks()):
        b, t, same = pair.read(start, stop)
        d = _diff(b, t)
        stats.add(i, d, t, same, pair.dtype)
        parts.append(d)
    if stats.identical:
        return None
    check_finite(pair, stats)
    dW = torch.cat(parts) if parts else torch.zeros(pair.m, pair.n, dtype=torch.float64)
    del parts
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return Spectrum(U, S, Vh, stats.fro2, 0.0, "exact", 1, stats.noise2, True)


class Sketch:
    """The growing randomized sketch of one tensor's difference (module docstring)."""

    def __init__(self, pair: Pair, *, seed: int, noise: bool, power: int = POWER):
        self.pair = pair
        self.power = power
        self.gen = torch.Generator().manual_seed(seed)
        self.Z = torch.zeros(pair.n, 0, dtype=torch.float64)
        self.Y = torch.zeros(pair.m, 0, dtype=torch.float64)
        self.stats: Stats | None = None
        self.scratch = pair.scratch or Scratch()
        self._noise = noise
        self.passes = 0
        self.res2 = 0.0

    def _pass(self, Z, *, final: bool):
        """One read of both tensors: Y = dW Z, and H = dW^T Y (or, on a final pass, the
        residual of the projection onto span([old Z, Z]))."""
        first = self.stats is None
        stats = Stats(self._noise) if first else None
        Y = torch.empty(self.pair.m, Z.shape[1], dtype=torch.float64)
        H = None if final else torch.zeros(self.pair.n, Z.shape[1], dtype=torch.float64)
        Zall = torch.cat([self.Z, Z], dim=1) if final else None
        res2 = 0.0
        for i, (start, stop) in enumerate(self.pair.blocks()):
            if not first and i in self.stats.zero_blocks:
                Y[start:stop] = 0.0  # identical rows: dW is zero there, no need to read
                continue
            b, t, same = self.pair.read(start, stop)
            d = self.scratch.diff(b, t)
            if first:
                stats.add(i, d, t, same, self.pair.dtype)
            if same:
                Y[start:stop] = 0.0
                continue
            y = d @ Z
            Y[start:stop] = y
            if final:
                r = self.scratch.get(1, tuple(d.shape))
                torch.mm(torch.cat([self.Y[start:stop], y], dim=1), Zall.T, out=r)
                res2 += _sq(r.sub_(d))
            else:
                H.addmm_(d.T, y)
        self.passes += 1
        if first:
            self.stats = stats
        return Y, H, res2

    def _orth(self, H):
        """Orthonormal basis of H's columns with the current Z projected out (twice: one
        Gram-Schmidt sweep loses orthogonality when H is nearly inside span(Z))."""
        for _ in range(2):
            if self.Z.shape[1]:
                H = H - self.Z @ (self.Z.T @ H)
        Q, _ = torch.linalg.qr(H)
        return Q

    def grow(self, extra: int) -> bool:
        """Add ``extra`` directions (2 + power passes). False when the tensors are identical."""
        n = self.pair.n
        extra = min(extra, n - self.Z.shape[1])
        omega = torch.randn(n, extra, generator=self.gen, dtype=torch.float64)
        Z = self._orth(omega) if self.Z.shape[1] else omega
        _, H, _ = self._pass(Z, final=False)
        if self.stats.identical:
            return False
        check_finite(self.pair, self.stats)
        for _ in range(self.power):
            _, H, _ = self._pass(self._orth(H), final=False)
        Z = self._orth(H)
        Y, _, self.res2 = self._pass(Z, final=True)
        self.Z = torch.cat([self.Z, Z], dim=1)
        self.Y = torch.cat([self.Y, Y], dim=1)
        return True

    def spectrum(self) -> Spectrum:
        """dW ~ Y Z^T = Uy Sy (Z Vy)^T."""
        Uy, S, Vyh = torch.linalg.svd(self.Y, full_matrices=False)
        complete = self.Z.shape[1] >= min(self.pair.m, self.pair.n)
        return Spectrum(Uy, S, Vyh @ self.Z.T, self.stats.fro2, self.res2, "randomized",
                        self.passes, self.stats.noise2, complete)


def use_exact(pair: Pair, sketch: int) -> bool:
    """The dense path for small matrices, and where a sketch would cover half the spectrum."""
    return pair.m * pair.n <= EXACT_MAX_ELEMENTS or 2 * sketch >= min(pair.m, pair.n)
