"""Benchmark: `loratool extract` vs mergekit's approach (issue 13), on a LLaMA-shaped fp32 pair.

The pair: a seeded LLaMA-shaped fp32 base (embeddings, per layer q,k,v,o [H,H], gate,up [I,H],
down [H,I], two norms; lm_head) and TUNED = loratool.merge(base, a rank-16 adapter on all
seven projections of every layer). Then, each in a fresh worker process of this script (so
that peak RSS is each method's own), for two model sizes (LAYERS and 2 x LAYERS):

  loratool   loratool.extract(base, tuned, rank=R): streamed row blocks, randomized sketch,
             exact per-module error (section 4 of spec/extract.md)
  mergekit   mergekit-extract-lora's algorithm, re-implemented here as the baseline: for every
             projection, dW = tuned - base in fp32 (whole tensors), torch.linalg.svd(dW,
             full_matrices=False), keep R triplets (sqrt(S) on both sides)

Reported: wall and CPU seconds, ratios baseline / loratool, peak RSS (ru_maxrss of the
worker), and per-module relative errors ||dW - BA||_F / ||dW||_F computed afterwards in
float64 against the dense difference for both methods (loratool's reported error is checked
against the same dense value).

    python benchmarks/extract.py                       # H=1024, I=2752, 2 and 4 layers
    python benchmarks/extract.py --hidden 4096 --inter 11008 --layers 8   # ~2.8 GB at 16 layers
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def shapes(h: int, i: int) -> dict[str, tuple[int, int]]:
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


def build(root: str, h: int, inter: int, layers: int, vocab: int, true_rank: int):
    import torch
    from safetensors.torch import save_file

    import loratool
    from loratool.model import Adapter, LoraModule
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.02,
            "model.norm.weight": torch.ones(h), "lm_head.weight":
            torch.randn(vocab, h, generator=g) * 0.02}
    mods = {}
    for layer in range(layers):
        for p, (o, i) in shapes(h, inter).items():
            name = f"model.layers.{layer}.{p}"
            base[f"{name}.weight"] = torch.randn(o, i, generator=g) * 0.02
            mods[name] = LoraModule(name, "linear", "out_in",
                                    torch.randn(true_rank, i, generator=g) * 0.01,
                                    torch.randn(o, true_rank, generator=g) * 0.01,
                                    float(true_rank))
        for n in ("input_layernorm", "post_attention_layernorm"):
            base[f"model.layers.{layer}.{n}.weight"] = torch.ones(h)
    bpath, tpath = os.path.join(root, "base.safetensors"), os.path.join(root, "tuned.safetensors")
    save_file(base, bpath)
    size = sum(t.numel() * 4 for t in base.values())
    del base
    loratool.merge(bpath, [(Adapter(modules=mods, alpha=float(true_rank)), 1.0)], output=tpath)
    return bpath, tpath, size


def worker(method: str, bpath: str, tpath: str, rank: int, out: str) -> None:
    import torch
    from safetensors import safe_open
    t0, c0 = time.perf_counter(), time.process_time()
    factors = {}
    reported = {}
    if method == "loratool":
        import loratool
        adapter, report = loratool.extract(bpath, tpath, rank=rank)
        for name, m in adapter.modules.items():
            factors[name] = (m.B.float(), m.A.float())
        reported = {r["name"]: (r["error"], r["rounding_bound"]) for r in report["modules"]}
    else:
        with safe_open(bpath, "pt") as fb, safe_open(tpath, "pt") as ft:
            for key in fb.keys():
                if not key.endswith("_proj.weight"):
                    continue
                dW = ft.get_tensor(key).float() - fb.get_tensor(key).float()
                U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
                root = torch.sqrt(S[:rank])
                factors[key.removesuffix(".weight")] = (U[:, :rank] * root,
                                                        root[:, None] * Vh[:rank])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    errors, outside = {}, 0
    with safe_open(bpath, "pt") as fb, safe_open(tpath, "pt") as ft:  # untimed check
        for name, (B, A) in factors.items():
            dW = ft.get_tensor(f"{name}.weight").double() - fb.get_tensor(f"{name}.weight").double()
            err = float((dW - B.double() @ A.double()).norm())
            errors[name] = err / float(dW.norm())
            if name in reported:  # the certificate is for the float64 factors; the stored
                # fp32 factors may differ from it by at most rounding_bound (spec 6)
                outside += abs(err - reported[name][0]) > reported[name][1]
    with open(out, "w") as f:
        json.dump({"wall": wall, "cpu": cpu, "rss_mb": rss, "errors": errors,
                   "outside_bound": outside}, f)


def run_worker(method, bpath, tpath, rank, root) -> dict:
    out = os.path.join(root, f"{method}.json")
    subprocess.run([sys.executable, __file__, "--worker", method, bpath, tpath, str(rank), out],
                   check=True)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2752)
    ap.add_argument("--layers", type=int, default=2, help="the small size; the large is 2x")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--true-rank", type=int, default=16)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, bpath, tpath, rank, out = args.worker
        return worker(method, bpath, tpath, int(rank), out)
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rank {args.rank}, "
          f"merged adapter rank {args.true_rank}")
    for layers in (args.layers, 2 * args.layers):
        with tempfile.TemporaryDirectory() as root:
            bpath, tpath, size = build(root, args.hidden, args.inter, layers, args.vocab,
                                       args.true_rank)
            lt = run_worker("loratool", bpath, tpath, args.rank, root)
            mk = run_worker("mergekit", bpath, tpath, args.rank, root)
        worst = max(lt["errors"][n] / mk["errors"][n] for n in mk["errors"])
        print(f"\n{layers} layers, H={args.hidden}, I={args.inter}: {size / 2**20:.0f} MiB per "
              f"checkpoint, {len(mk['errors'])} projections")
        for name, r in (("loratool", lt), ("mergekit-style dense fp32 SVD", mk)):
            print(f"  {name:<30} wall {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  "
                  f"peak RSS {r['rss_mb']:6.0f} MiB")
        print(f"  ratio baseline/loratool: wall {mk['wall'] / lt['wall']:.1f}x, cpu "
              f"{mk['cpu'] / lt['cpu']:.1f}x")
        le, me = sorted(lt["errors"].values()), sorted(mk["errors"].values())
        print(f"  relative error per module: loratool {le[0]:.3e}..{le[-1]:.3e}, baseline "
              f"{me[0]:.3e}..{me[-1]:.3e}; max loratool/baseline {worst:.6f}")
        print(f"  loratool's certified error vs dense float64 of the stored fp32 factors: "
              f"{lt['outside_bound']} of {len(lt['errors'])} modules outside rounding_bound")
        sample = list(mk["errors"])[:3] + [list(mk["errors"])[-1]]
        for n in sample:
            print(f"    {n:<36} loratool {lt['errors'][n]:.6e}  baseline {mk['errors'][n]:.6e}")
        if not math.isfinite(worst):
            sys.exit(1)


if __name__ == "__main__":
    main()
