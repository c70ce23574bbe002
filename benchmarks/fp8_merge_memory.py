"""Peak memory and wall time of a merge into one large FP8 weight (spec/merge.md section 4.6).

A 4096x8192 F8_E4M3 weight with 128x128 block scales (`weight_scale_inv`, F32) and a rank-16
adapter; each run is a fresh subprocess that merges it (--dtype keep) and prints its peak
RSS (VmHWM) and its RSS before the merge, the merge's wall time, the tracemalloc peak
of the merge (a second run: tracing slows allocation) and the SHA-256 of the output.
``--tree DIR`` (repeatable) runs the merge with ``PYTHONPATH=DIR``: another checkout of
loratool, e.g. main's code exported with ``git archive main | tar -x -C /tmp/old``; the runs
alternate between trees, ``--repeat`` times; the last line is the last tree's median peak
RSS and wall time over the first tree's.
Run: python benchmarks/fp8_merge_memory.py --tree /tmp/old --tree . [--rows 4096 --cols 8192]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, hashlib
trace = sys.argv[3] == "1"
import loratool
from loratool.ops.merge import merge

def status(key):  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's,
    # which execve passes on), VmRSS: now; in MiB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

rss0 = status("VmRSS")
if trace:
    import tracemalloc
    tracemalloc.start()
t = time.perf_counter()
rep = merge(sys.argv[1], [sys.argv[2]], output=sys.argv[1] + ".out", overwrite=True,
            device="cpu")
wall = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1] if trace else None
h = hashlib.sha256(open(sys.argv[1] + ".out", "rb").read()).hexdigest()
print(json.dumps({"wall": wall, "peak_rss_mib": status("VmHWM"), "rss_before_mib": rss0,
                  "traced_peak_mib":
                  None if peak is None else peak / 2**20, "sha256": h[:16],
                  "kept": rep.fp8["kept"], "code": loratool.__file__}))
"""


def make_inputs(d: str, rows: int, cols: int) -> tuple[str, str]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from loratool.adapter import save_adapter
    from loratool.model import Adapter, LoraModule
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    R, C = -(-rows // 128), -(-cols // 128)
    pad = np.zeros((R * 128, C * 128), np.float32)
    pad[:rows, :cols] = np.abs(W)
    s = pad.reshape(R, 128, C, 128).max(axis=(1, 3)) / 448
    full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:rows, :cols]
    q = torch.from_numpy(W / full).to(torch.float8_e4m3fn)
    base = os.path.join(d, "base.safetensors")
    save_file({"m.weight": q, "m.weight_scale_inv": torch.from_numpy(s)}, base)
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(16, cols, generator=g) * 0.01, torch.randn(rows, 16, generator=g) * 0.01
    ad = Adapter(modules={"m": LoraModule("m", "linear", "out_in", A, B, 16.0)}, alpha=16.0)
    path = os.path.join(d, "a.safetensors")
    save_adapter(ad, path)
    return base, path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", action="append", default=[])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    trees = [os.path.abspath(t) for t in (a.tree or ["."])]
    runs: dict[str, list] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as d:
        base, adapter = make_inputs(d, a.rows, a.cols)
        for trace in ("0", "1"):
            for _ in range(a.repeat if trace == "0" else 1):
                for tree in trees:
                    env = dict(os.environ, PYTHONPATH=tree)
                    out = subprocess.run([sys.executable, "-c", CHILD, base, adapter, trace],
                                         env=env, cwd=d, capture_output=True, text=True,
                                         check=True)
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    runs[tree].append((trace == "1", res))
                    print(json.dumps({"tree": tree, "trace": trace == "1", **res}))
    if len(trees) > 1:  # the last tree against the first (the baseline)
        def median(tree, key):
            return statistics.median(r[key] for t, r in runs[tree] if not t)
        first, last = trees[0], trees[-1]
        rss = median(last, "peak_rss_mib") / median(first, "peak_rss_mib")
        wall = median(last, "wall") / median(first, "wall")
        print(f"{last} / {first}: peak RSS x{rss:.3f}, wall x{wall:.2f} (medians)")

if __name__ == "__main__":
    main()
