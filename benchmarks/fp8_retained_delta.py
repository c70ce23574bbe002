"""How much of a LoRA delta survives a merge into an FP8 safetensors base, per delta size.

A 1024x1024 Gaussian base (sigma 0.02) stored as F8_E4M3 with 128x128 block scales
(`weight_scale_inv` = amax/448 per block, as transformers' FineGrainedFP8 writes them), as
F8_E4M3 with one scale per row, and as unscaled F8_E5M2; a rank-16 delta scaled to
||dW||/||W|| = 1e-1, 1e-2, 1e-3 against the dequantized base, merged with loratool.merge
(--dtype keep); prints the report's `fp8` figures (spec/merge.md section 4.6).
Run: python benchmarks/fp8_retained_delta.py
"""
import os
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

from loratool.adapter import save_adapter
from loratool.model import Adapter, LoraModule
from loratool.ops.merge import merge

rng = np.random.default_rng(0)
d = tempfile.mkdtemp()
W = rng.standard_normal((1024, 1024)) * 0.02


def stored(kind):
    if kind == "e4m3-block128":
        s = np.abs(W.reshape(8, 128, 8, 128)).max(axis=(1, 3)) / 448
        full = np.repeat(np.repeat(s, 128, 0), 128, 1)
        q = torch.from_numpy(W / full).to(torch.float8_e4m3fn)
        return {"m.weight": q, "m.weight_scale_inv": torch.from_numpy(s).float()}, \
            q.double().numpy() * full
    if kind == "e4m3-row":
        s = np.abs(W).max(axis=1, keepdims=True) / 448
        q = torch.from_numpy(W / s).to(torch.float8_e4m3fn)
        return {"m.weight": q, "m.weight_scale": torch.from_numpy(s).float()}, \
            q.double().numpy() * s
    q = torch.from_numpy(W * 1000).to(torch.float8_e5m2)  # unscaled: values in E5M2's range
    return {"m.weight": q}, q.double().numpy()


for kind in ("e4m3-block128", "e4m3-row", "e5m2-unscaled"):
    tensors, deq = stored(kind)
    base = os.path.join(d, f"{kind}.safetensors")
    save_file(tensors, base)
    for rel in (1e-1, 1e-2, 1e-3):
        A = rng.standard_normal((16, 1024))
        B = rng.standard_normal((1024, 16))
        s = rel * np.linalg.norm(deq) / np.linalg.norm(B @ A)
        ad = Adapter(modules={"m": LoraModule("m", "linear", "out_in", torch.from_numpy(A),
                                              torch.from_numpy(B * s), 16.0)}, alpha=16.0)
        path = os.path.join(d, "a.safetensors")
        save_adapter(ad, path, overwrite=True)
        r = merge(base, [path], output=os.path.join(d, "o.safetensors"), overwrite=True,
                  device="cpu").fp8
        print(f"{kind:14s} rel={rel:g} retained={r['retained']:.3f} kept={r['kept']:.3f} "
              f"rel_error={r['rel_error']:.3f} saturated={r['saturated']}")
