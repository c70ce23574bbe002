"""Benchmark: `loratool compose` vs the dense SVD path (issue 5).

Two LLaMA-7B-shaped adapters (rank 64 each, different seeds and alphas; see
benchmarks/resize.py) are combined as 0.7 * A + 0.5 * B in one process:

  loratool exact   loratool.compose([(A, .7), (B, .5)]): ranks concatenate (128), no SVD
  loratool rank16  loratool.compose(..., rank=16): QR of the concatenated factors + core SVD
  lowrank          torch.svd_lowrank(dense sum, q=32, niter=2): measured on --lowrank-layers
                   layers and EXTRAPOLATED linearly (every layer has the same shapes)
  dense            form 0.7 dA + 0.5 dB, torch.linalg.svd(full_matrices=False), keep 16:
                   measured on q_proj and gate_proj of layer 0 and EXTRAPOLATED (down_proj,
                   the transpose shape of gate_proj, counted at gate_proj's time; pass
                   --samples q,gate,down to time it too)

Errors: the exact compose vs the dense fp64 sum (relative Frobenius), and the kept singular
values of the rank-16 results vs torch.linalg.svdvals of the dense fp64 sum on the sampled
modules (over the whole adapter: vs the fp64 kernel on the exact result). Then the whole CLI
run (`loratool compose a:0.7 b:0.5 --rank 16 -o out`) in a subprocess. Times are CPU / wall
seconds as in benchmarks/resize.py, ratios against the baselines of this same run.

    python benchmarks/compose.py                  # a few minutes
    python benchmarks/compose.py --layers 2 --no-cli --no-dense
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resize import (SAMPLES, SHAPES, Timing, build_adapter, extrapolate, header,  # noqa: E402
                    peak_rss_mb, rel_err, timed, timed_cli)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

WEIGHTS = (0.7, 0.5)


def dense_sum(a, b, name, dtype=torch.float32):
    out = 0
    for adp, w in zip((a, b), WEIGHTS):
        m = adp.modules[name]
        B, A = m.factors(dtype)
        out = out + (B @ A) * (w * m.scale)
    return out


def lowrank_pass(a, b, names, k):
    values = {}
    for n in names:
        _, S, _ = torch.svd_lowrank(dense_sum(a, b, n), q=2 * k, niter=2)
        values[n] = S[:k]
    return values


def dense_path(a, b, name, k):
    D = dense_sum(a, b, name)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    (U[:, :k] * S[:k]) @ Vh[:k]
    return S[:k]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--target", type=int, default=16)
    p.add_argument("--lowrank-layers", type=int, default=4)
    p.add_argument("--samples", default="q,gate",
                   help="modules of layer 0 timed with the dense path: q, gate, down")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--no-lowrank", action="store_true")
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    import loratool
    from loratool.linalg import singular_values
    from loratool.model import Adapter
    k = args.target
    fig = header("compose (0.7 A + 0.5 B)", args)
    a = build_adapter(args.layers, args.rank, seed=1)
    b = build_adapter(args.layers, args.rank, seed=2, alpha=args.rank)
    items = list(zip((a, b), WEIGHTS))
    first = list(a.modules)[:len(SHAPES)]
    loratool.compose([(Adapter(modules={n: x.modules[n] for n in first}, alpha=x.alpha), w)
                      for x, w in items], rank=k)  # warm-up
    T: dict[str, Timing] = {}

    exact, T["exact"] = timed(loratool.compose, items)
    print(f"loratool compose exact: {T['exact']} (CPU / wall)", flush=True)
    trunc, T["rank"] = timed(loratool.compose, items, rank=k)
    print(f"loratool compose --rank {k}: {T['rank']}", flush=True)
    ref64 = {n: singular_values(*m.factors(), m.scale)[:k]
             for n, m in exact.adapter.modules.items()}
    out_vals = {n: singular_values(*m.factors(), m.scale)
                for n, m in trunc.adapter.modules.items()}
    err = {"rank": max(rel_err(out_vals[n], ref64[n]) for n in ref64)}

    if not args.no_lowrank:
        names = [n for n in a.modules if int(n.split(".")[2]) < args.lowrank_layers]
        low, t = timed(lowrank_pass, a, b, names, k)
        T["svd_lowrank"] = t * (args.layers / args.lowrank_layers)
        fig["lowrank_layers_measured"] = args.lowrank_layers
        err["svd_lowrank"] = max(rel_err(low[n], ref64[n]) for n in names)
        print(f"svd_lowrank on {args.lowrank_layers} layers: {t}", flush=True)

    sample_err: dict[str, list] = {}
    if not args.no_dense:
        dense_t = {}
        wanted = [s for s in SAMPLES if s.split(".")[1].split("_")[0] in args.samples.split(",")]
        for short in wanted:
            name = f"model.layers.0.{short}"
            ref_sum = dense_sum(a, b, name, torch.float64)
            ref = torch.linalg.svdvals(ref_sum)[:k]
            S, dense_t[short] = timed(dense_path, a, b, name, k)
            print(f"dense svd {name} {SHAPES[short]}: {dense_t[short]}", flush=True)
            m = exact.adapter.modules[name]
            B, A = m.factors(torch.float64)
            for key, val in (
                    ("exact (rel. Frobenius)",
                     float((B @ A * m.scale - ref_sum).norm() / ref_sum.norm())),
                    ("rank", rel_err(out_vals[name], ref)),
                    ("svd_lowrank", rel_err(lowrank_pass(a, b, [name], k)[name], ref)),
                    ("dense", rel_err(S, ref))):
                sample_err.setdefault(key, []).append(val)
        if "mlp.down_proj" not in dense_t and "mlp.gate_proj" in dense_t:
            dense_t["mlp.down_proj"] = dense_t["mlp.gate_proj"]  # same size, transposed
        T["dense (extrapolated)"] = extrapolate(dense_t, args.layers)
        fig["dense_samples"] = {s: vars(t) for s, t in dense_t.items()}
    fig["peak_rss_mb"] = peak_rss_mb()

    if not args.no_cli:
        from loratool.adapter import save_adapter
        with tempfile.TemporaryDirectory() as tmp:
            pa, pb = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "b.safetensors")
            save_adapter(a, pa)
            save_adapter(b, pb)
            fig["file_mib"] = os.path.getsize(pa) / 2**20
            out = os.path.join(tmp, "out.safetensors")
            proc, T["cli"], fig["cli_peak_rss_mb"] = timed_cli(
                ["compose", f"{pa}:0.7", f"{pb}:0.5", "--rank", str(k), "-o", out, "-q",
                 "--json"])
            json.loads(proc.stdout)

    fig["times"] = {key: vars(t) for key, t in T.items()}
    fig["errors_whole_adapter_vs_fp64_kernel"] = err
    fig["errors_samples_vs_dense_fp64"] = {key: max(v) for key, v in sample_err.items()}
    fig["load_end"] = os.getloadavg()
    print_table(fig, T, err, fig["errors_samples_vs_dense_fp64"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)


def print_table(fig, T, err, se):
    base = T["rank"]
    e = lambda x: "-" if x is None else f"{x:.1e}"  # noqa: E731
    k = fig["target"]
    print()
    print(f"| method (0.7 A + 0.5 B, {fig['modules']} modules, rank {fig['rank']} + "
          f"{fig['rank']}) | CPU / wall time | CPU / wall ratio to loratool --rank {k} | "
          "max rel. error: 3 sampled modules vs dense fp64; all modules vs fp64 kernel |")
    print("|---|---:|---:|---:|")
    print(f"| loratool compose, exact (rank {2 * fig['rank']}) | {T['exact']} | "
          f"{T['exact'].ratio(base)} | {e(se.get('exact (rel. Frobenius)'))} (Frobenius) |")
    rows = [(f"loratool compose --rank {k}", "rank"),
            (f"torch.svd_lowrank(q={2 * k}, niter=2) on dense sums (extrapolated from "
             f"{fig.get('lowrank_layers_measured')} layers)", "svd_lowrank"),
            ("dense sum + full SVD (extrapolated from layer 0 samples)",
             "dense (extrapolated)")]
    for label, key in rows:
        if key in T:
            sampled = se.get(key if key != "dense (extrapolated)" else "dense")
            print(f"| {label} | {T[key]} | {T[key].ratio(base)} | {e(sampled)}; "
                  f"{e(err.get(key))} |")
    if "cli" in T:
        print(f"| whole CLI run: load 2 x {fig['file_mib']:.0f} MiB, compose --rank {k}, write "
              f"| {T['cli']} | {T['cli'].ratio(base)} | - |")
    print(f"peak RSS: benchmark process {fig['peak_rss_mb']:.0f} MiB"
          + (f", CLI {fig['cli_peak_rss_mb']:.0f} MiB" if "cli_peak_rss_mb" in fig else "")
          + f"; load average at the end {fig['load_end'][0]:.1f}")


if __name__ == "__main__":
    main()
