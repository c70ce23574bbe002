"""Benchmark helper: a deeper copy of a LLaMA-shaped fixture, its decoder layers repeated.

The merge's fixed costs (the interpreter, the imports of numpy and the CLI, reading the
adapter: about 0.35 s on 2 cores) weigh on a 1.4 GB bf16 checkpoint, whose `cp` takes about
0.9 s, far more than on the checkpoints people merge (a 7B model is 13-15 GB). This writes a
base whose `model.layers.N.` tensors are repeated TIMES times (layer N of copy q becomes layer
N + q * LAYERS; embeddings, norm and head once) and the PEFT adapter directory to match, so
that `benchmarks/merge_ab.py` can compare merge and `cp` with the same tensor shapes at
several sizes:

    python benchmarks/merge.py --layers 12 --bf16 --build-only /dev/shm/fx   # the fixture
    python benchmarks/widen_fixture.py /dev/shm/fx/model-bf16.safetensors \\
        /dev/shm/fx/peft-adapter /dev/shm/fx4 --times 4
    python benchmarks/merge_ab.py /dev/shm/fx4/model-bf16.safetensors /dev/shm/fx4/peft-adapter \\
        --a . --b . --rounds 6 --out /dev/shm/ab.safetensors

The tensors are read and written one at a time (memory: one tensor).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loratool.stfile import SafetensorsWriter, read_header  # noqa: E402

_LAYER = re.compile(r"layers\.(\d+)\.")


def _renamed(name: str, copy: int, layers: int) -> str:
    return _LAYER.sub(lambda m: f"layers.{int(m.group(1)) + copy * layers}.", name, count=1)


def widen(src: str, dest: str, times: int) -> int:
    """Write ``src`` with its layers repeated ``times`` times to ``dest``; returns the count
    of tensors written."""
    header = read_header(src)
    layers = 1 + max((int(m.group(1)) for n in header.tensors
                      for m in [_LAYER.search(n)] if m), default=-1)
    entries = []  # (output name, source name)
    for name in header.tensors:
        copies = range(times) if _LAYER.search(name) else [0]
        entries += [(_renamed(name, q, layers), name) for q in copies]
    infos = header.tensors
    with open(src, "rb") as f:
        writer = SafetensorsWriter(dest, [(o, infos[n].dtype, infos[n].shape) for o, n in entries],
                                   header.metadata, overwrite=True)
        with writer:
            for out, name in entries:
                info = infos[name]
                f.seek(header.data_start + info.begin)
                writer.write(out, f.read(info.nbytes))
            writer.commit()
    return len(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the fixture's safetensors base")
    ap.add_argument("peft_dir", help="its PEFT adapter directory")
    ap.add_argument("out_dir")
    ap.add_argument("--times", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(os.path.join(args.out_dir, "peft-adapter"), exist_ok=True)
    n = widen(args.base, os.path.join(args.out_dir, os.path.basename(args.base)), args.times)
    m = widen(os.path.join(args.peft_dir, "adapter_model.safetensors"),
              os.path.join(args.out_dir, "peft-adapter", "adapter_model.safetensors"), args.times)
    shutil.copy(os.path.join(args.peft_dir, "adapter_config.json"),
                os.path.join(args.out_dir, "peft-adapter"))
    print(f"{n} base tensors, {m} adapter tensors -> {args.out_dir}")


if __name__ == "__main__":
    main()
