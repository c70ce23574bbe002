"""LyCORIS -> plain LoRA: the closed-form conversion against a dense SVD of the delta (what
PEFT's ``convert_to_lora`` does), on SDXL-sized layers; then the per-case errors of
loratool.lycoris against lycoris-lora 4.1.3's forward pass (the cases of
tests/test_lycoris_core.py).

    python benchmarks/lycoris_convert.py

Prints ratios against the dense-SVD baseline measured in the same run, never asserts them.
Takes about 2 minutes on 2 cores (the dense SVDs).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from loratool import lycoris as ly

HERE = os.path.dirname(os.path.abspath(__file__))


def _best(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _layers():
    g = torch.Generator().manual_seed(0)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float32) * 0.1
    r = 8
    yield "LoHa 1280x1280 r=8", {"hada_w1_a": rn(1280, r), "hada_w1_b": rn(r, 1280),
                                 "hada_w2_a": rn(1280, r), "hada_w2_b": rn(r, 1280),
                                 "alpha": torch.tensor(4.0)}, (1280, 1280)
    yield "LoHa conv 320x320x3x3 r=8", {"hada_w1_a": rn(320, r), "hada_w1_b": rn(r, 2880),
                                        "hada_w2_a": rn(320, r), "hada_w2_b": rn(r, 2880),
                                        "alpha": torch.tensor(4.0)}, (320, 320, 3, 3)
    # factor=-1: w1 (32, 32), w2 (40, 40) as (40, 8)(8, 40): exact rank 256
    yield "LoKr 1280x1280 f=-1 r=8", {"lokr_w1": rn(32, 32), "lokr_w2_a": rn(40, r),
                                      "lokr_w2_b": rn(r, 40), "alpha": torch.tensor(4.0)}, \
        (1280, 1280)
    # factor=8: w1 (8, 8), w2 (160, 160) as (160, 8)(8, 160): exact rank 64
    yield "LoKr 1280x1280 f=8 r=8", {"lokr_w1": rn(8, 8), "lokr_w2_a": rn(160, r),
                                     "lokr_w2_b": rn(r, 160), "alpha": torch.tensor(4.0)}, \
        (1280, 1280)


def conversion():
    print("| layer | exact rank | closed form (s) | dense SVD (s) | ratio | rel. error closed | "
          "rel. error SVD at same rank |")
    print("|---|---|---|---|---|---|---|")
    for label, tensors, shape in _layers():
        rec = ly.parse_module("m", tensors, shape=shape)
        t_exact, f = _best(lambda: ly.to_lora(rec))
        dW = ly.delta(rec).reshape(shape[0], -1)

        def dense():
            U, S, Vh = torch.linalg.svd(ly.delta(rec).reshape(shape[0], -1), full_matrices=False)
            return U[:, :f.rank] * S[:f.rank], Vh[:f.rank]
        t_svd, (B, A) = _best(dense, repeat=1)  # seconds each: once is enough
        n = torch.linalg.matrix_norm(dW)
        e1 = float(torch.linalg.matrix_norm(f.delta().reshape(dW.shape) - dW) / n)
        e2 = float(torch.linalg.matrix_norm(B @ A - dW) / n)
        print(f"| {label} | {f.rank} | {t_exact:.4f} | {t_svd:.4f} | {t_svd / t_exact:.1f}x | "
              f"{e1:.1e} | {e2:.1e} |")


def accuracy():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import test_lycoris_core as T
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    worst = {}
    print("\n| case | forward error | LoRA rank | conversion error |\n|---|---|---|---|")
    for cid, cls, kind, kw, _, _ in T.CASES:
        mod, base, W, b, x, y, y0 = T._lycoris(cls, kind, **kw)
        rec = ly.parse_module(T.NAME, ly.split_state_dict(T._saved(mod))[T.NAME],
                              shape=W.shape)
        e = T._rel(T._op(base, x, ly.merged_weight(rec, W) - W), y - y0)
        key = "DoRA forward" if rec.dora else "forward"
        worst[key] = max(worst.get(key, 0.0), e)
        rank = conv = "-"
        if rec.dora is None:
            f = ly.to_lora(rec)
            c = T._rel(f.delta(), ly.delta(rec))
            worst["conversion"] = max(worst.get("conversion", 0.0), c)
            rank, conv = str(f.rank), f"{c:.1e}"
        print(f"| {cid} | {e:.1e} | {rank} | {conv} |")
    torch.set_default_dtype(old)
    print("\nworst:", {k: f"{v:.1e}" for k, v in worst.items()})


if __name__ == "__main__":
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    conversion()
    accuracy()
