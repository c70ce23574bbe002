"""Benchmark: `loratool extract` vs mergekit's approach (issue 13), on a LLaMA-shaped fp32 pair.

The pair: a seeded LLaMA-shaped fp32 base (embeddings, per layer q,k,v,o [H,H], gate,up [I,H],
down [H,I], two norms; untied lm_head) and TUNED = loratool.merge(base, a rank-16 adapter on
all seven projections of every layer). Then, each in a fresh worker process of this script,
for each model size (--layers, e.g. 2 and 12):

  loratool   loratool.extract(base, tuned, rank=R): streamed row blocks, randomized sketch,
             exact per-module error (spec/extract.md section 4)
  mergekit   mergekit-extract-lora's algorithm, re-implemented here as the baseline: for every
             projection, dW = tuned - base in fp32 (whole tensors, read with safetensors'
             safe_open as mergekit's lazy loader does), torch.linalg.svd(dW,
             full_matrices=False), keep R triplets (sqrt(S) on both sides)

Reported: wall and CPU seconds of the work (imports included, checks excluded), ratios
baseline / loratool, peak RSS and peak anonymous RSS of the worker sampled from
/proc/self/status during the work (not ru_maxrss: a child process starts with its parent's
high-water mark, which here is the model this script built; that was the "growth" an earlier
version of this benchmark showed), and per-module relative errors ||dW - BA||_F / ||dW||_F
computed in float64 against the dense difference, outside the timed work, for both methods
(loratool's reported error is checked against the same dense value).

    python benchmarks/extract.py                       # H=1024, I=2752, vocab 8000, 2 and 4 layers
    nice python benchmarks/extract.py --hidden 2048 --inter 5632 --vocab 32000 --layers 2 12 \
        --workdir /dev/shm                             # 12 layers: 2.79 GiB per checkpoint
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


class Sampler:
    """Peak VmRSS and RssAnon of this process, sampled every 10 ms while ``on``."""

    def __init__(self):
        self.on, self.rss, self.anon, self._stop = True, 0, 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    value = int(rest.split()[0]) * 1024
                    if key == "VmRSS":
                        self.rss = max(self.rss, value)
                    else:
                        self.anon = max(self.anon, value)

    def _run(self) -> None:
        while not self._stop:
            if self.on:
                self.sample()
            time.sleep(0.01)

    def stop(self) -> None:
        self.sample()
        self._stop = True
        self._thread.join()


def _dense_error(fb, ft, name, B, A) -> float:
    dW = ft.get_tensor(f"{name}.weight").double() - fb.get_tensor(f"{name}.weight").double()
    err = float((dW - B.double() @ A.double()).norm())
    return err


def worker(method: str, bpath: str, tpath: str, rank: int, out: str) -> None:
    sampler = Sampler()
    t0, c0 = time.perf_counter(), time.process_time()
    import torch
    from safetensors import safe_open
    errors, outside, untimed_wall, untimed_cpu = {}, 0, 0.0, 0.0
    if method == "loratool":
        import loratool
        result = loratool.extract(bpath, tpath, rank=rank)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sampler.stop()
        adapter, report = result
        assert not adapter.replacements and len(report["others"]) == 0, "unchanged tensors"
        with safe_open(bpath, "pt") as fb, safe_open(tpath, "pt") as ft:
            for r in report["modules"]:
                m = adapter.modules[r["name"]]
                err = _dense_error(fb, ft, r["name"], m.B.float(), m.A.float())
                errors[r["name"]] = err / r["norm"]
                # the certificate is for the float64 factors; the stored fp32 factors may
                # differ from it by at most rounding_bound (spec/extract.md section 6)
                outside += abs(err - r["error"]) > r["rounding_bound"]
        outputs = {"modules": len(adapter.modules), "replacements": len(adapter.replacements)}
    else:
        with safe_open(bpath, "pt") as fb, safe_open(tpath, "pt") as ft:
            for key in fb.keys():
                if not key.endswith("_proj.weight"):
                    continue
                t1 = time.perf_counter()
                dW = ft.get_tensor(key).float() - fb.get_tensor(key).float()
                U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
                root = torch.sqrt(S[:rank])
                B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
                del dW, U, S, Vh
                # the check below is not part of the method: paused clocks and sampler
                sampler.on = False
                u0, v0 = time.perf_counter(), time.process_time()
                name = key.removesuffix(".weight")
                dn = float((ft.get_tensor(key).double() - fb.get_tensor(key).double()).norm())
                errors[name] = _dense_error(fb, ft, name, B, A) / dn
                untimed_wall += time.perf_counter() - u0
                untimed_cpu += time.process_time() - v0
                sampler.on = True
                # progress on stdout, so that a run stopped early still shows its modules
                print(f"    baseline {name:<36} {u0 - t1:6.2f} s  rel. error "
                      f"{errors[name]:.3e}", flush=True)
        wall = time.perf_counter() - t0 - untimed_wall
        cpu = time.process_time() - c0 - untimed_cpu
        sampler.stop()
        outputs = {"modules": len(errors)}
    with open(out, "w") as f:
        json.dump({"wall": wall, "cpu": cpu, "rss_mb": sampler.rss / 2**20,
                   "anon_mb": sampler.anon / 2**20, "errors": errors,
                   "outside_bound": outside, "outputs": outputs}, f)


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
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="model sizes")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--true-rank", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where the pair is written (e.g. /dev/shm)")
    ap.add_argument("--methods", nargs="+", default=["loratool", "mergekit"])
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, bpath, tpath, rank, out = args.worker
        return worker(method, bpath, tpath, int(rank), out)
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rank {args.rank}, "
          f"merged adapter rank {args.true_rank}; load {os.getloadavg()}", flush=True)
    for layers in args.layers:
        with tempfile.TemporaryDirectory(dir=args.workdir) as root:
            t0 = time.perf_counter()
            bpath, tpath, size = build(root, args.hidden, args.inter, layers, args.vocab,
                                       args.true_rank)
            print(f"\n{layers} layers, H={args.hidden}, I={args.inter}, vocab {args.vocab}: "
                  f"{size / 2**20:.0f} MiB per checkpoint (built in "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
            res = {}
            for method in args.methods:
                res[method] = r = run_worker(method, bpath, tpath, args.rank, root)
                label = "loratool" if method == "loratool" else "mergekit-style dense fp32 SVD"
                print(f"  {label:<30} wall {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  peak RSS "
                      f"{r['rss_mb']:6.0f} MiB  peak anon {r['anon_mb']:6.0f} MiB  "
                      f"{r['outputs']}  load {os.getloadavg()[0]:.1f}", flush=True)
        if len(res) < 2:
            continue
        lt, mk = res["loratool"], res["mergekit"]
        worst = max(lt["errors"][n] / mk["errors"][n] for n in mk["errors"])
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
