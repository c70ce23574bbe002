"""Adapters, base checkpoints and independent references for the merge tests.

The reference never goes through loratool's merge code: deltas are numpy float64 matmuls of
the stored factors, and rounding to bf16 is done by choosing the nearest of the neighbouring
bf16 values with exact float64 comparisons (fp16 and fp32 by numpy's own conversions, which
round once). It is the "independent fp64 reference rounded once" of spec/merge.md.
"""

from __future__ import annotations

import numpy as np
import torch

from _factory import generator, randn, random_module
from loratool.model import Adapter, LoraModule

BITS = {torch.float32: np.uint32, torch.bfloat16: np.uint16, torch.float16: np.uint16}
NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bits(t: torch.Tensor) -> np.ndarray:
    """The stored bit patterns of a float tensor, as unsigned integers."""
    t = t.detach().contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(
        BITS[t.dtype])


def ref_round(x: np.ndarray, dtype) -> np.ndarray:
    """float64 array -> bit patterns of the nearest ``dtype`` values (ties to even)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return _ref_round(x, dtype)


def _ref_round(x: np.ndarray, dtype) -> np.ndarray:
    if dtype == torch.float32:
        return x.astype(np.float32).view(np.uint32)
    if dtype == torch.float16:
        return x.astype(np.float16).view(np.uint16)
    assert dtype == torch.bfloat16
    sign = np.signbit(x)
    a = np.abs(x)
    top = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    cands = np.stack([top - 1, top, top + 1]).clip(0, 0x7F80)  # 0x7F80 is +inf

    def value(c):
        return (c.astype(np.uint32) << 16).view(np.float32).astype(np.float64)

    vals = value(cands)
    with np.errstate(invalid="ignore"):
        dist = np.abs(vals - a)
    best = np.argmin(dist, axis=0)
    pick = np.take_along_axis(cands, best[None], 0)[0]
    d = np.take_along_axis(dist, best[None], 0)[0]
    # exact ties: the even neighbour
    for k in range(3):
        tie = (dist[k] == d) & (cands[k] != pick) & (cands[k] % 2 == 0)
        pick = np.where(tie, cands[k], pick)
    # beyond the largest bf16 by half an ulp or more: infinity
    pick = np.where(a >= value(np.array(0x7F7F)) + 2.0**119, 0x7F80, pick)
    pick = np.where(np.isnan(x), 0x7FC0, pick)
    return (pick.astype(np.uint16) | (sign.astype(np.uint16) << 15)).astype(np.uint16)


def ref_delta(m: LoraModule, *, absolute: bool = False) -> np.ndarray:
    """s * B @ A in numpy float64, in the base tensor's shape and orientation (with
    ``absolute``, |s| * |B| @ |A|: the scale of the float64 evaluation error)."""
    r = m.A.shape[0]
    A = m.A.double().numpy().reshape(r, -1)
    B = m.B.double().numpy().reshape(m.B.shape[0], r)
    d = abs(m.scale) * (np.abs(B) @ np.abs(A)) if absolute else m.scale * (B @ A)
    info = m.info
    if info.kind == "conv":
        return d.reshape(info.base_shape)
    if info.kind == "embedding" or info.layout == "in_out":
        return d.T
    return d


def _canonical(W: np.ndarray, m: LoraModule) -> np.ndarray:
    info = m.info
    if info.kind == "conv" or W.ndim > 2:
        return W.reshape(W.shape[0], -1)
    if info.kind == "embedding" or info.layout == "in_out":
        return W.T
    return W


def ref_merge(base: dict, adapters, sign: float = 1.0, *, with_error: bool = False):
    """name -> float64 merged value (before rounding) for every tensor an adapter touches.

    Adapters apply in order; DoRA as PEFT merges it (norm of the original weight plus delta).
    With ``with_error``, name -> (value, bound): a bound on the distance between any float64
    evaluation of the sum (any order, with or without FMA) and its exact value.
    """
    out = {k: v.double().numpy().copy() for k, v in base.items()
           if v.is_floating_point()}
    orig = {k: v.copy() for k, v in out.items()}
    mag = {k: np.abs(v) for k, v in out.items()}
    ops = {}
    touched = set()
    for adapter, scale in adapters:
        for name, m in adapter.modules.items():
            key = name + ".weight"
            W0 = orig[key]
            d = sign * scale * ref_delta(m)
            if m.magnitude is None:
                out[key] = out[key] + d
                mag[key] = mag[key] + abs(scale) * ref_delta(m, absolute=True)
                ops[key] = ops.get(key, 0) + m.A.shape[0] + 2
            else:
                V = _canonical(W0 + d.reshape(W0.shape), m)
                norm = np.sqrt((V * V).sum(axis=1))
                f = m.magnitude.double().numpy() / norm
                cur = _canonical(out[key] + d.reshape(W0.shape), m) * f[:, None]
                if m.info.kind == "conv" or W0.ndim > 2:
                    out[key] = cur.reshape(W0.shape)
                elif m.info.kind == "embedding" or m.info.layout == "in_out":
                    out[key] = cur.T
                else:
                    out[key] = cur
            touched.add(key)
            if m.bias is not None:
                bkey = name + ".bias"
                v = m.bias.double().numpy()
                out[bkey] = out[bkey] + sign * scale * m.scale * v
                mag[bkey] = mag[bkey] + abs(scale * m.scale) * np.abs(v)
                ops[bkey] = ops.get(bkey, 0) + 3
                touched.add(bkey)
    if with_error:
        return {k: (out[k], 2.0**-52 * (ops.get(k, 0) + 2) * mag[k]) for k in touched}
    return {k: out[k] for k in touched}


def check_rounded_once(got_bits: np.ndarray, value: np.ndarray, bound: np.ndarray, dtype,
                       name: str = "") -> int:
    """Assert ``got_bits`` is ``value`` rounded once: bit-identical wherever every float64
    evaluation within ``bound`` rounds the same way; where the exact sum is that close to a
    rounding boundary, one of the two neighbours. Returns the count of such close calls."""
    got = got_bits.reshape(-1)
    lo = ref_round(value - bound, dtype).reshape(-1)
    hi = ref_round(value + bound, dtype).reshape(-1)
    mid = ref_round(value, dtype).reshape(-1)
    clear = lo == hi
    bad = np.flatnonzero(clear & (got != mid))
    assert bad.size == 0, (f"{name}: {bad.size} of {got.size} entries differ from the float64 "
                           "reference rounded once")
    close = ~clear
    assert np.all((got[close] == lo[close]) | (got[close] == hi[close])), name
    return int(close.sum())


def mixed_adapter(seed: int = 0, *, dtype=torch.float32, rank: int = 4, alpha: float = 8.0,
                  dora: bool = False, bias: bool = False, mag: float = 0.3) -> Adapter:
    """One module of every kind: linear out_in, linear in_out (GPT-2 Conv1D), conv 1x1,
    conv 3x3, embedding, and an rsLoRA linear; optionally DoRA magnitudes and lora_bias."""
    g = generator(seed)
    shapes = [  # name, kind, layout, out, in, kernel
        ("model.layers.0.q_proj", "linear", "out_in", 24, 40, ()),
        ("h.0.attn.c_attn", "linear", "in_out", 48, 16, ()),
        ("unet.conv1x1", "conv", "out_in", 6, 8, (1, 1)),
        ("unet.conv3x3", "conv", "out_in", 8, 4, (3, 3)),
        ("embed_tokens", "embedding", "in_out", 16, 50, ()),
    ]
    mods = {name: random_module(g, name, kind=kind, layout=layout, out=out, inp=inp, rank=rank,
                                kernel=kernel, alpha=alpha, dtype=dtype, b_scale=mag)
            for name, kind, layout, out, inp, kernel in shapes}
    mods["model.layers.0.rs_proj"] = random_module(
        g, "model.layers.0.rs_proj", out=20, inp=12, rank=8, alpha=6.0, scaling="rslora",
        dtype=dtype, b_scale=mag)
    if dora:
        for name in ("model.layers.0.q_proj", "h.0.attn.c_attn", "unet.conv3x3",
                     "embed_tokens"):
            m = mods[name]
            mods[name] = m.with_tensors(magnitude=(torch.rand(m.B.shape[0], generator=g) * 4
                                                   + 3).to(dtype))
    if bias:
        for name in ("model.layers.0.q_proj", "h.0.attn.c_attn"):
            m = mods[name]
            mods[name] = m.with_tensors(bias=randn(g, m.B.shape[0], dtype=dtype))
    return Adapter(modules=mods, alpha=alpha)


def base_for(adapter: Adapter, dtype=torch.float32, seed: int = 100, *,
             biases: bool = True) -> dict[str, torch.Tensor]:
    """A base state dict with a weight (and bias) for every module, plus untouched tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in adapter.modules.items():
        out[name + ".weight"] = (torch.randn(*m.info.base_shape, generator=g)).to(dtype)
        if biases:
            out[name + ".bias"] = torch.randn(m.info.out_features, generator=g).to(dtype)
    out["model.norm.weight"] = torch.ones(24, dtype=dtype)
    out["step"] = torch.tensor([7, 8, 9], dtype=torch.int64)
    out["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    return out
