"""Benchmark: the same `loratool merge` from two checkouts, alternating, against `cp`.

For comparing two versions of the code end to end on a noisy machine: each round runs `cp
BASE OUT`, then the merge with checkout A and with checkout B (the order alternates from
round to round), each in a fresh process (`python -m loratool merge`, with PYTHONPATH set to
the checkout), and removes each output right after its run. That last point matters on
tmpfs in a VM: a run that allocates right after another freed as many pages is faster than
one that allocates fresh pages (benchmarks/README.md, issue 11's sixth pass), so every run
here follows a removal of the same size. The first round also checks that both checkouts
write the same bytes.

    git worktree add /tmp/wt-old <commit>
    (cd /tmp/wt-old && python setup.py build_ext --inplace)   # its compiled kernel
    python benchmarks/merge_ab.py BASE ADAPTER --a /tmp/wt-old --b . --rounds 12 \\
        --out /dev/shm/ab.safetensors

Prints the median wall, user and system time of each, and the ratios to `cp`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """Wall, user and system seconds of one child process (raises if it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_utime, usage.ru_stime


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("adapters", nargs="+")
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", required=True, help="checkout B")
    ap.add_argument("--out", required=True, help="output path (removed after each run)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--merge-args", default="", help="extra merge arguments, one string")
    args = ap.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists; choose a path that does not")
    checkouts = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    merge = [sys.executable, "-m", "loratool", "merge", args.base, *args.adapters,
             "-o", args.out, "--quiet", *args.merge_args.split()]
    times: dict = {"cp": [], "A": [], "B": []}
    hashes = {}
    for i in range(args.rounds):
        times["cp"].append(_timed(["cp", args.base, args.out]))
        os.unlink(args.out)
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            env = {**os.environ, "PYTHONPATH": checkouts[name]}
            times[name].append(_timed(merge, env))
            if i == 0:
                hashes[name] = _sha1(args.out)
            os.unlink(args.out)
    cp_wall = statistics.median(t[0] for t in times["cp"])
    print(f"{args.rounds} rounds; A = {checkouts['A']}, B = {checkouts['B']}; "
          f"outputs {'identical' if hashes['A'] == hashes['B'] else 'DIFFERENT'} (round 1)")
    print(f"{'':3s} {'wall':>7s} {'user':>7s} {'sys':>7s} {'/ cp':>6s}  all walls")
    for name, runs in times.items():
        wall, user, system = (statistics.median(c) for c in zip(*runs))
        print(f"{name:3s} {wall:7.3f} {user:7.3f} {system:7.3f} {wall / cp_wall:5.2f}x  "
              + " ".join(f"{t[0]:.2f}" for t in runs))


if __name__ == "__main__":
    main()
