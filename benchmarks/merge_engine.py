"""Benchmark: the exact CPU merge engine's kernels on one LLaMA-sized tensor, in process.

The ways to compute one tensor's exact merge (``loratool.ops.merge.exact``), timed in the
same run on the same data (medians), with their outputs compared byte for byte:

  reference     whole 2 MiB float64 blocks (the engine before issue 11; ``--reference``)
  numpy         numpy only: BLAS float64 product per 16-row block, numpy add and rounding
  compiled-add  numpy's BLAS product, then the compiled add-and-round pass (before issue 11's
                second round; still the path of float64 outputs)
  compiled      the compiled kernel computes the product too (AVX2/FMA register tiles;
                binary32 product for BF16/F16 outputs), certified equal to numpy's bytes,
                forced at any rank
  default       what a merge uses: the compiled product up to the ranks where it pays
                (``operands._PRODUCT_MAX_RANK``), else the compiled add after numpy's product

Also reports how many 16-row blocks the compiled kernel left to numpy (close calls), and
the plain-C path of the compiled kernel (``--plain``: what a CPU without AVX2/FMA runs).

    python benchmarks/merge_engine.py                  # 5632 x 2048, rank 16, 1 and 2 workers
    python benchmarks/merge_engine.py --rows 2048 --cols 2048 --rank 64 --plain --reference

A copy of the base tensor (numpy, in memory) is printed first as the floor.

``--against PATH`` compares this build of the compiled kernel with another one (a checkout
holding ``loratool/_fastmerge*.so``, e.g. a ``git worktree`` of an older commit built with
``python setup.py build_ext --inplace``, or the ``.so`` itself): "default" with each, one
worker, in alternating order on the same data; minimum and median of ``--repeats`` runs
(the minimum is the steadier figure on a shared machine), and whether the bytes agree. The
other build must take the same arguments as this one (``lowrank_round``'s calling
convention); across a change of it, run each checkout's own ``merge_engine.py`` instead.

    python benchmarks/merge_engine.py --workers 1 --repeats 25 --against /work/wt-base
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loratool.ops.merge import exact, operands  # noqa: E402
from loratool.ops.merge.plan import Op  # noqa: E402

PAIRS = [("F32", "F32"), ("BF16", "BF16"), ("F16", "F16"), ("F32", "BF16")]


def _base(rows: int, cols: int, dtype: str, rng) -> np.ndarray:
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if dtype == "F32":
        return w
    if dtype == "F16":
        return w.astype(np.float16)
    return (w.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated: any values do)


def _time(engine, w, dtype, op, out, repeats):
    walls, cpus, data = [], [], None
    for _ in range(repeats):
        raw = np.frombuffer(w.tobytes(), dtype=np.uint8).copy()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        data, _ = engine.run(raw, dtype, w.shape, [op], out, "w")
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return statistics.median(walls), statistics.median(cpus), bytes(data)


def _other_extension(path: str):
    """The compiled kernel of another build, loaded beside ours (its own module object)."""
    import glob
    import importlib.util
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "loratool", "_fastmerge*.so"))
                       + glob.glob(os.path.join(path, "_fastmerge*.so")))
        if not found:
            sys.exit(f"no _fastmerge*.so in {path} or {path}/loratool (build it there first)")
        path = found[0]
    spec = importlib.util.spec_from_file_location("_fastmerge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def _against(path: str, rows: int, cols: int, op, repeats: int, rng) -> None:
    other, path = _other_extension(path)
    print(f"\nthis build against {path} ('default', one worker, alternating, {repeats} runs):")
    print(f"{'dtypes':12s} {'this min':>9s} {'median':>7s} {'other min':>10s} {'median':>7s} "
          f"{'other/this min':>15s} {'median':>7s}  bytes")
    for dtype, out in PAIRS:
        w = _base(rows, cols, dtype, rng)
        raw0 = np.frombuffer(w.tobytes(), dtype=np.uint8)
        engines = {"this": exact.NumpyExactEngine(1, compiled=True),
                   "other": exact.NumpyExactEngine(1, compiled=True)}
        engines["other"].ext = other
        times: dict = {k: [] for k in engines}
        data = {}
        try:
            for i in range(repeats):
                for k in (("this", "other") if i % 2 else ("other", "this")):
                    raw = raw0.copy()
                    t0 = time.perf_counter()
                    res, _ = engines[k].run(raw, dtype, w.shape, [op], out, "w")
                    times[k].append(time.perf_counter() - t0)
                    data[k] = bytes(res)
        finally:
            for e in engines.values():
                e.close()
        mins = {k: min(v) for k, v in times.items()}
        meds = {k: statistics.median(v) for k, v in times.items()}
        same = "identical" if data["this"] == data["other"] else "DIFFERENT"
        print(f"{dtype + '->' + out:12s} {mins['this'] * 1e3:9.1f} {meds['this'] * 1e3:7.1f} "
              f"{mins['other'] * 1e3:10.1f} {meds['other'] * 1e3:7.1f} "
              f"{mins['other'] / mins['this']:14.2f}x {meds['other'] / meds['this']:6.2f}x  "
              f"{same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--plain", action="store_true", help="also the compiled kernel's plain C path")
    ap.add_argument("--reference", action="store_true", help="also the reference kernel")
    ap.add_argument("--pairs", nargs="+", metavar="BASE:OUT",
                    help="dtype pairs to run (default: F32:F32 BF16:BF16 F16:F16 F32:BF16), "
                         "e.g. F32:F16 BF16:F16")
    ap.add_argument("--first-bound", action="store_true",
                    help="bound the product by sum_k |sL_ik| max_k |R_kj| only (not the "
                         "2-norms when tighter): how the kernel ran before issue 11's sixth "
                         "pass, for comparison")
    ap.add_argument("--against", metavar="PATH",
                    help="another build of the compiled kernel (a checkout with "
                         "loratool/_fastmerge*.so, or the .so): compared with this one")
    args = ap.parse_args()
    if args.pairs:
        PAIRS[:] = [tuple(p.upper().split(":")) for p in args.pairs]
        if any(len(p) != 2 or not set(p) <= {"F32", "BF16", "F16"} for p in PAIRS):
            ap.error("--pairs: BASE:OUT with F32, BF16 or F16 on each side")
    if args.first_bound:
        operands._tighter_bound = lambda op, rb, ca, buf: (rb, ca)
    if exact.EXTENSION is None:
        sys.exit("loratool._fastmerge is not built (pip install -e . with a C compiler)")
    rng = np.random.default_rng(0)
    L = rng.standard_normal((args.rows, args.rank)) * 0.01
    R = rng.standard_normal((args.rank, args.cols)) * (1 / args.cols ** 0.5)
    op = Op("lowrank", 2.0 * 0.7, 0, "m", L, R)
    left = {"n": 0}
    run_rows = exact._compiled_product_rows

    def counting(*a):
        res = run_rows(*a)
        left["n"] += len(res)
        return res
    exact._compiled_product_rows = counting
    blocks = -(-args.rows // exact.BLOCK_ROWS)
    print(f"tensor [{args.rows}, {args.cols}], rank {args.rank}, median of {args.repeats}; "
          f"load {os.getloadavg()[0]:.2f}")
    w32 = _base(args.rows, args.cols, "F32", rng)
    copies = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        w32.copy()
        copies.append(time.perf_counter() - t0)
    print(f"copy of the F32 tensor (floor): {statistics.median(copies) * 1e3:.1f} ms")
    print(f"{'dtypes':12s} {'workers':>7s} {'kernel':14s} {'wall ms':>8s} {'cpu ms':>8s} "
          f"{'ns/elem':>8s} {'vs numpy':>9s}  bytes")
    for dtype, out in PAIRS:
        w = _base(args.rows, args.cols, dtype, rng)
        for workers in args.workers:
            kernels = {"numpy": dict(compiled=False),
                       "compiled-add": dict(compiled=True, compiled_product=False),
                       "compiled": dict(compiled=True, compiled_product=True),
                       "default": dict(compiled=True)}
            if args.plain:
                kernels["compiled-plain"] = dict(compiled=True, compiled_product=True)
            if args.reference:
                kernels["reference"] = dict(fast=False)
            base_wall, base_bytes = None, None
            for label, kw in kernels.items():
                engine = exact.NumpyExactEngine(workers, **kw)
                simd = exact.EXTENSION.simd()
                if label == "compiled-plain":
                    exact.EXTENSION.simd(False)
                left["n"] = 0
                try:
                    wall, cpu, data = _time(engine, w, dtype, op, out, args.repeats)
                finally:
                    exact.EXTENSION.simd(simd)
                    engine.close()
                if label == "numpy":
                    base_wall = wall
                base_bytes = base_bytes or data
                same = "identical" if data == base_bytes else "DIFFERENT"
                extra = (f", {left['n'] / args.repeats:.0f} of {blocks} blocks to numpy"
                         if label in ("compiled", "compiled-plain", "default") else "")
                print(f"{dtype + '->' + out:12s} {workers:7d} {label:14s} {wall * 1e3:8.1f} "
                      f"{cpu * 1e3:8.1f} {wall / w.size * 1e9:8.2f} "
                      f"{(base_wall or wall) / wall:8.2f}x  "
                      f"{same}{extra}")
    if args.against:
        _against(args.against, args.rows, args.cols, op, args.repeats, rng)


if __name__ == "__main__":
    main()
