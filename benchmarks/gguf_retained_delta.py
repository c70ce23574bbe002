"""How much of a LoRA delta survives a merge into a GGUF base, per base type and delta size.

A 1024x1024 Gaussian base (sigma 0.02), a rank-16 delta scaled to ||dW||/||W|| = 1e-1, 1e-2,
1e-3, merged with loratool.gguf.merge_gguf; prints its retained-delta report (spec/gguf.md).
Run: python benchmarks/gguf_retained_delta.py   (needs loratool[gguf])
"""
import os, tempfile, numpy as np, gguf
from gguf import GGMLQuantizationType as Q
from loratool.gguf import merge_gguf, LoraFactors
rng = np.random.default_rng(0); d = tempfile.mkdtemp()
W = (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)
for qt in (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0):
    p = os.path.join(d, f"{qt.name}.gguf"); w = gguf.GGUFWriter(p, "qwen2")
    data = gguf.quants.quantize(W, qt); w.add_tensor("blk.0.attn_v.weight", data, raw_dtype=None if qt == Q.F16 else qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    for rel in (1e-1, 1e-2, 1e-3):
        A = rng.standard_normal((16, 1024)); B = rng.standard_normal((1024, 16))
        s = rel * np.linalg.norm(W) / np.linalg.norm(B @ A)
        r = merge_gguf(p, os.path.join(d, "o.gguf"), [LoraFactors("model.layers.0.self_attn.v_proj", A, B, s)], overwrite=True)
        print(f"{qt.name:5s} rel={rel:g} retained={r.retained:.3f} kept={r.kept:.3f} rel_error={r.rel_error:.3f}")
