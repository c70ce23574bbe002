"""File size and time of `convert` for a LyCORIS LoHa file: the loratool format's native LoHa
kind (format 1.2) against the plain-LoRA forms (`--lycoris lora`, fp64 and fp16, and truncated
with `--cumulative`), the native file being the baseline of the ratios.

    python benchmarks/lycoris_native_sizes.py [MODULES]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from loratool.ops.convert import convert


def main(modules: int = 4) -> None:
    d = tempfile.mkdtemp()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(modules):  # 1280x1280 LoHa modules, r = 8, fp16, as LyCORIS saves them
        k = f"lora_unet_m{i}"
        for p, s in (("hada_w1_a", (1280, 8)), ("hada_w1_b", (8, 1280)),
                     ("hada_w2_a", (1280, 8)), ("hada_w2_b", (8, 1280))):
            sd[f"{k}.{p}"] = (torch.randn(s, generator=g) * 0.05).half()
        sd[f"{k}.alpha"] = torch.tensor(4.0)
    src = os.path.join(d, "loha.safetensors")
    save_file(sd, src)
    print(f"{modules} LoHa modules 1280x1280 r=8 fp16: LyCORIS file "
          f"{os.path.getsize(src) / 2**20:.2f} MiB")
    base = None
    for label, kw in (("native (default)", {}), ("--lycoris lora", {"lycoris": "lora"}),
                      ("--lycoris lora --dtype fp16", {"lycoris": "lora", "dtype": "fp16"}),
                      ("--lycoris lora --dtype fp16 --cumulative 0.9",
                       {"lycoris": "lora", "dtype": "fp16", "cumulative": 0.9})):
        out = os.path.join(d, f"{len(kw)}{label[-4:]}.safetensors")
        t = time.perf_counter()
        convert(src, out, **kw)
        t = time.perf_counter() - t
        size = os.path.getsize(out)
        base = base or size
        print(f"  {label:45s} {size / 2**20:7.2f} MiB  {size / base:5.1f}x  {t:6.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
