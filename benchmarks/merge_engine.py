"""Benchmark: the exact CPU merge engine on one LLaMA-sized tensor, in process.

Times ``NumpyExactEngine.run`` on a [5632, 2048] tensor with a rank-16 update (the MLP
projections of the merge benchmark's fixture), fp32 and bf16 bases kept in their dtype:
the reference kernel (the engine before issue 11) against the numpy fast kernel at several
row block sizes and the compiled kernel (``loratool._fastmerge``, when built) at 16 rows,
with 1 and 2 workers, and a plain copy of the tensor as the floor. Medians of ``--repeats``
runs; ratios are against the reference kernel of the same run.

    python benchmarks/merge_engine.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from loratool.ops.merge.exact import BLOCK_ROWS, EXTENSION, NumpyExactEngine
from loratool.ops.merge.plan import Op

ROWS, COLS, RANK = 5632, 2048, 16


def _time(engine, raw0: np.ndarray, dtype: str, op, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        raw = raw0.copy()
        t0 = time.perf_counter()
        engine.run(raw, dtype, (ROWS, COLS), [op], dtype, "w")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    bases = {"F32": w32, "BF16": (w32.view(np.uint32) >> 16).astype(np.uint16)}
    op = Op("lowrank", 2.0, 0, "m", rng.standard_normal((ROWS, RANK)) * 0.01,
            rng.standard_normal((RANK, COLS)) * 0.01)
    copies = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        w32.copy()
        copies.append(time.perf_counter() - t0)
    print(f"copy of the fp32 tensor (floor): {statistics.median(copies) * 1e3:.0f} ms")
    compiled = [f"compiled, {BLOCK_ROWS} rows"] if EXTENSION is not None else []
    heads = [f"numpy, {b} rows" for b in args.blocks] + compiled
    print("| base | workers | reference | " + " | ".join(heads) + " |")
    print("|---|---:|---:|" + "---:|" * len(heads))
    for dtype, w in bases.items():
        raw0 = np.frombuffer(w.tobytes(), dtype=np.uint8)
        for workers in (1, 2):
            engines = [NumpyExactEngine(workers, fast=False)] + [
                NumpyExactEngine(workers, block_rows=b, compiled=False) for b in args.blocks
            ] + [NumpyExactEngine(workers, compiled=True) for _ in compiled]
            try:
                times = [_time(e, raw0, dtype, op, args.repeats) for e in engines]
            finally:
                for e in engines:
                    e.close()
            cells = [f"{t * 1e3:.0f} ms ({times[0] / t:.2f}x)" for t in times[1:]]
            print(f"| {dtype} | {workers} | {times[0] * 1e3:.0f} ms | " + " | ".join(cells)
                  + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
