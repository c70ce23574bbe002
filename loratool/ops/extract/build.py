"""From a tensor pair to a LoRA module: spectrum, rank, balanced factors, report row."""

from __future__ import annotations

import math

import torch

from ...errors import OperationError
from ...format import KIND_CONV, LAYOUT_IN_OUT
from . import engine
from .ranks import Rule, choose, sketch_size


def spectrum_for(pair, rule: Rule, *, seed: int):
    """(Spectrum, Choice), growing the sketch until the rule is decided; None if identical."""
    m, n = pair.m, pair.n
    limit = min(m, n)
    noise = rule.name == "auto_rank"
    ell = sketch_size(rule, limit, engine.OVERSAMPLE, engine.START_RANK)
    # cumulative needs the sum of every singular value: only the dense SVD knows it.
    if rule.name == "cumulative" or engine.use_exact(pair, ell):
        spec = engine.exact(pair, noise=noise)
        return None if spec is None else (spec, choose(spec, rule, limit, m, n))
    sketch = engine.Sketch(pair, seed=seed, noise=noise)
    if not sketch.grow(ell):
        return None
    while True:
        spec = sketch.spectrum()
        choice = choose(spec, rule, limit, m, n)
        if choice.satisfied or spec.complete:
            return spec, choice
        ell = sketch.Z.shape[1]
        if 2 * (2 * ell) >= limit:  # the next sketch would cover half the spectrum
            spec = engine.exact(pair, noise=noise)
            return spec, choose(spec, rule, limit, m, n)
        sketch.grow(ell)


def build_module(target, pair, spec, choice, *, dtype: str):
    """The LoRA module of rank ``choice.rank`` and its report row."""
    from ...model import LoraModule
    from ...tensors import TORCH_DTYPES, round_once
    k = choice.rank
    U, S, Vh = spec.U[:, :k], spec.S[:k], spec.Vh[:k]
    # The stored matrix M = U S Vh is [d0, rest]; the delta is M for out_in and conv, M^T
    # for in_out (Conv1D, embeddings): swap the sides so that B is always the output side.
    if target.layout == LAYOUT_IN_OUT and target.kind != KIND_CONV:
        out_vecs, in_vecs = Vh.T, U.T
    else:
        out_vecs, in_vecs = U, Vh
    if k:  # canonical signs: the largest entry of each output vector is positive
        idx = out_vecs.abs().argmax(dim=0)
        signs = torch.sign(out_vecs.gather(0, idx[None, :])[0])
        signs[signs == 0] = 1
        out_vecs, in_vecs = out_vecs * signs, in_vecs * signs[:, None]
    root = torch.sqrt(S)
    B2, A2 = out_vecs * root, root[:, None] * in_vecs
    tdtype = TORCH_DTYPES[dtype]
    if target.kind == KIND_CONV:
        shape = target.shape
        A = A2.reshape(k, *shape[1:])
        B = B2.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    else:
        A, B = A2, B2
    A, B = round_once(A.contiguous(), tdtype), round_once(B.contiguous(), tdtype)
    for role, x in (("lora_A", A), ("lora_B", B)):
        if not bool(torch.isfinite(x).all()):
            raise OperationError(f"module {target.module!r}: {role} does not fit {dtype} "
                                 "(overflow); extract with dtype='fp32'", code="LT546",
                                 module=target.module)
    module = LoraModule(target.module, target.kind, target.layout, A, B, float(k))
    return module, _row(target, pair, spec, choice, k, dtype, B2, A2)


def _row(target, pair, spec, choice, k, dtype, B2, A2) -> dict:
    err2 = spec.error2(k)
    norm = math.sqrt(spec.fro2)
    error = math.sqrt(max(err2, 0.0))
    S = [float(s) for s in spec.S]
    # Rounding the float64 factors to the storage dtype adds at most this (spec 6.2).
    u = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}[dtype]
    kept = math.sqrt(sum(s * s for s in S[:k]))
    row = {
        "name": target.module, "tensor": target.name, "kind": target.kind,
        "layout": target.layout, "shape": list(target.shape), "dtype": target.dtype,
        "method": spec.method, "passes": spec.passes, "sketch": len(S),
        "rank": k, "rule_rank": choice.rule_rank, "reason": choice.reason,
        "norm": norm, "error": error,
        "relative_error": 0.0 if norm == 0 else error / norm,
        "retained": 1.0 if norm == 0 else math.sqrt(max(0.0, 1.0 - err2 / spec.fro2)),
        "rounding_bound": 3.0 * math.sqrt(k) * u * kept,
        "sv_max": S[0] if S else 0.0,
        "sv_last_kept": S[k - 1] if len(S) >= k else None,
        "sv_first_dropped": S[k] if len(S) > k else None,
    }
    if spec.noise2:
        row["noise_floor"] = spec.noise_floor(pair.m, pair.n)
    return row
