"""Header-only `inspect` / `validate` on a >= 1 GB adapter against a tiny one, and `inspect` of
many modules against 7, in fresh processes.

    python benchmarks/inspect_header.py [--repeats 5] [--part size|modules|all]

``size``: builds (in a temporary directory) a LLaMA-7B-shaped rank-128 float32 adapter (224
modules, about 1.28 GB) and a one-module adapter, then times each command in fresh processes
and prints medians and the big/tiny ratio. `import torch` is never paid by these commands.

``modules``: adapters of 7, 2,000 and 20,000 tiny modules (rank 1); times `inspect` (the
table, capped at 50 rows), `inspect --all` (every row) and `inspect --json`, and prints each
against the 7-module baseline of the same command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loratool.adapter import save_adapter  # noqa: E402
from loratool.model import Adapter, LoraModule  # noqa: E402

SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
          "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
          "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
          "mlp.down_proj": (4096, 11008)}


def build(path: str, layers: int, rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for i in range(layers):
        for name, (out, inp) in SHAPES.items():
            m = f"model.layers.{i}.{name}"
            mods[m] = LoraModule(m, "linear", "out_in", torch.randn(rank, inp, generator=g),
                                 torch.randn(out, rank, generator=g), 2.0 * rank)
    save_adapter(Adapter(modules=mods, alpha=2.0 * rank), path, overwrite=True)


def build_many(path: str, n: int) -> None:
    """``n`` rank-1 modules named like a deep model's (repeated layers of 7 projections)."""
    mods = {}
    names = list(SHAPES)
    for i in range(n):
        m = f"model.layers.{i // len(names)}.{names[i % len(names)]}"
        mods[m] = LoraModule(m, "linear", "out_in", torch.ones(1, 4), torch.ones(4, 1), 1.0)
    save_adapter(Adapter(modules=mods, alpha=1.0), path, overwrite=True)


def modules_part(tmp: str, repeats: int) -> None:
    counts = (7, 2000, 20000)
    paths = {}
    for n in counts:
        paths[n] = os.path.join(tmp, f"m{n}.safetensors")
        build_many(paths[n], n)
    print(f"inspect of many modules; medians of {repeats} fresh processes, ratio against 7 "
          "modules")
    py = [sys.executable, "-m", "loratool", "inspect"]
    for label, extra in (("inspect", []), ("inspect --all", ["--all"]),
                         ("inspect --json", ["--json"])):
        times = {n: timed(py + extra + [paths[n]], repeats) for n in counts}
        cells = "   ".join(f"{n:>6} modules {times[n] * 1000:7.0f} ms ({times[n] / times[7]:5.2f}x)"
                           for n in counts)
        print(f"  {label:<15} {cells}")


def timed(cmd: list[str], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--part", choices=("size", "modules", "all"), default="all")
    args = ap.parse_args()
    if args.part in ("modules", "all"):
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
            modules_part(tmp, args.repeats)
    if args.part == "modules":
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        big, tiny = os.path.join(tmp, "big.safetensors"), os.path.join(tmp, "tiny.safetensors")
        build(big, 32, 128)
        build(tiny, 1, 1)
        print(f"big adapter {os.path.getsize(big) / 1e9:.2f} GB, tiny "
              f"{os.path.getsize(tiny)} bytes; medians of {args.repeats} fresh processes")
        py = [sys.executable, "-m", "loratool"]
        base = timed([sys.executable, "-c", "pass"], args.repeats)
        print(f"  python -c pass: {base * 1000:.0f} ms")
        for label, extra in (("inspect --json", ["inspect", "--json"]),
                             ("inspect", ["inspect"]),
                             ("validate --header-only", ["validate", "--header-only"]),
                             ("validate (scans data)", ["validate"])):
            t_big = timed(py + extra + [big], args.repeats)
            t_tiny = timed(py + extra + [tiny], args.repeats)
            print(f"  {label:<24} tiny {t_tiny * 1000:7.0f} ms   big {t_big * 1000:7.0f} ms   "
                  f"big/tiny {t_big / t_tiny:5.2f}x")


if __name__ == "__main__":
    main()
