"""Accuracy of LyCORIS files through loratool's commands (spec/lycoris.md, section 6), on the
cases of tests/test_lycoris_io.py: the relative error (Frobenius, over a batch of outputs) of

* `merge` (float64 base, exact engine) against the LyCORIS modules' forward pass, and
* `convert --to peft` loaded in PEFT (float32 layers) against the LyCORIS forward pass.

Run: python benchmarks/lycoris_io.py   (needs the test extra: lycoris-lora, peft)
"""
import os
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_lycoris_io as T
from loratool.ops.merge import merge
from loratool.ops.convert import convert
from safetensors.torch import load_file
for cid, cls, kw, fam, *_ in T.CASES + [(d[0], d[1], d[2], "dora") for d in T.DORA]:
    tmp = pathlib.Path(tempfile.mkdtemp())
    path, base, ref = T.build(tmp, cls, kw)
    merge(base, [path], output=str(tmp / "m.safetensors"), device="cpu")
    m = load_file(tmp / "m.safetensors")
    errs = [T._rel(T._op(l, x, m[f"unet.{l}.weight"], m[f"unet.{l}.bias"] if fam != "dora" else b), y) for l, (W, b, x, y) in ref.items()]
    line = f"{cid:14s} merge rel err max {max(errs):.2e}"
    if fam not in ("full", "dora"):
        p32, b32, r32 = T.build(tmp, cls, kw, dtype=torch.float32, tag="f")
        convert(p32, str(tmp / "peft"), to="peft", base=b32)
        got = T._peft_outputs(tmp, tmp / "peft")
        line += f"   PEFT(float32) vs LyCORIS max {max(T._rel(got[l], r32[l][3]) for l in got):.2e}"
    print(line)
