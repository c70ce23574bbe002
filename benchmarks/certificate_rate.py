"""Benchmark: how often the binary32 certificate of BF16 outputs sends an entry to repair.

For each of the first tensors a PEFT adapter changes, emulates in numpy the compiled kernel's
test for BF16 outputs (``_fastmerge_lowp.h``): e = W + s B A (float64 here; the kernel's
binary32 value differs only far below the bound), mu the BF16 midpoint of the interval
holding |e| (binary32 pattern), and "near" when ||e| - mu| <= g or g >= 2^-10 |e|, with

    old bound (before issue 11's sixth pass):  g = (r + 5) 2^-24 (|W| + P1)
    new bound:                                 g = (r + 4) 2^-24 P1 + 3 2^-24 |e|
    new bound, the engine's P':                g = (r + 4) 2^-24 P' + 3 2^-24 |e|

P1 = (sum_k |s B_ik|) max_k |A_kj|; P' is what the engine passes the kernel
(``operands._compiled_operands``: P1, or the product of the 2-norms of row i of s B and column
j of A when that is tighter for the tensor). Every near entry costs a binary64
recomputation (about 0.1 us). ``--scale-b`` multiplies the adapter's B, to see smaller or
larger deltas.

    python benchmarks/certificate_rate.py /dev/shm/fx/model-bf16.safetensors \\
        /dev/shm/fx/peft-adapter --scale-b 0.1
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="a safetensors base (any float dtype)")
    ap.add_argument("peft_dir", help="a PEFT adapter directory")
    ap.add_argument("--tensors", type=int, default=7)
    ap.add_argument("--scale-b", type=float, default=1.0)
    args = ap.parse_args()
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as torch_load
    ad = load_file(os.path.join(args.peft_dir, "adapter_model.safetensors"))
    with open(os.path.join(args.peft_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    s = cfg["lora_alpha"] / cfg["r"]
    base = torch_load(args.base)
    u = 2.0**-24
    from loratool.ops.merge.exact import _NpOp
    from loratool.ops.merge.operands import _compiled_operands
    ratio_label = "median P1/|W|"
    print(f"{'tensor':40s} {'shape':>13s} {ratio_label:>14s} {'near, old':>11s} "
          f"{'new, P1':>11s} {'new, P_':>11s}".replace("P_", "P'"))
    names = sorted(k for k in ad if k.endswith("lora_A.weight"))[:args.tensors]
    for key in names:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A = ad[key].astype(np.float64)
        B = ad[key.replace("lora_A", "lora_B")].astype(np.float64) * args.scale_b
        W = base[module + ".weight"].float().numpy().astype(np.float64)
        L, r = s * B, A.shape[0]
        e = W + L @ A
        bound = np.abs(L).sum(1)[:, None] * np.abs(A).max(0)[None, :]
        ea = np.abs(e).astype(np.float32)
        bits = ea.view(np.uint32)
        mu = ((bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
        dist = np.abs(ea.astype(np.float64) - mu.astype(np.float64))
        far = ea.astype(np.float64) * 2.0**-10
        _, rb, ca, _ = _compiled_operands(_NpOp("lowrank", 1.0, "m", L, A, None), "BF16",
                                          "BF16")
        chosen = rb[:, None] * ca[None, :]
        rates = []
        for g in ((r + 5) * u * (np.abs(W) + bound),
                  (r + 4) * u * bound + 3 * u * ea.astype(np.float64),
                  (r + 4) * u * chosen + 3 * u * ea.astype(np.float64)):
            rates.append(((dist <= g) | (g >= far)).mean())
        ratio = np.median(bound / np.maximum(np.abs(W), 1e-30))
        print(f"{module:40s} {str(W.shape):>13s} {ratio:14.3f} "
              + " ".join(f"{'1 in %.0f' % (1 / x) if x else 'none':>11s}" for x in rates))


if __name__ == "__main__":
    main()
