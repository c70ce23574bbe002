"""The three outputs of a merge: one safetensors file (``streaming.stream_file``), a
``.pt`` file with its metadata sidecar, and a sharded directory with the same layout."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from ... import format as F
from ...atomic import TEMP_PREFIX, AtomicDir, AtomicFile
from ...checkpoint import (SafetensorsSource, find_index, read_index_json, shard_order,
                           sidecar_path, write_pickle_from_safetensors)
from .fp8_base import strip_quantization_config
from .streaming import stream_file


def write_sidecar(path: str, metadata: dict[str, str], *, overwrite: bool = True,
                  fsync: bool = False) -> None:
    """The metadata of a .pt/.bin checkpoint, beside it (``checkpoint.read_sidecar`` reads
    it)."""
    with AtomicFile(sidecar_path(path), overwrite=overwrite, fsync=fsync) as f:
        f.write((json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_pickle(source, dest, plan, out_dtype, metadata, engine, counts, *, overwrite,
                  fsync, tick) -> None:
    """.pt output: stream into a scratch safetensors file beside ``dest``, then ``torch.save``
    its memory-mapped tensors (file-backed pages, not heap); metadata goes to the sidecar."""
    parent = os.path.dirname(os.path.abspath(dest))
    fd, scratch = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".safetensors", dir=parent)
    os.close(fd)
    try:
        stream_file(source, scratch, plan, out_dtype, {}, engine, counts, overwrite=True,
                     fsync=False, tick=tick)
        write_pickle_from_safetensors(scratch, dest, overwrite=overwrite, fsync=fsync,
                                      tied=getattr(source, "tied", ()))
        counts.written = os.path.getsize(dest)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    if metadata:
        write_sidecar(dest, metadata, overwrite=True, fsync=fsync)
    elif os.path.exists(sidecar_path(dest)):
        os.unlink(sidecar_path(dest))


def write_sharded(base, dest, plan, out_dtype, metadata, engine, counts, *, overwrite, fsync,
                   tick) -> None:
    """A sharded directory: same shards, index rewritten, other files copied; atomic."""
    index_path = find_index(base)
    root = os.path.dirname(index_path)
    index = read_index_json(index_path)
    shards = shard_order(index_path)
    with AtomicDir(dest, overwrite=overwrite) as tmp:
        total_size = 0
        for shard in shards:
            with SafetensorsSource(os.path.join(root, shard)) as src:
                meta = {k: v for k, v in src.metadata.items() if k != F.KEY_MERGED}
                if F.KEY_MERGED in metadata:
                    meta[F.KEY_MERGED] = metadata[F.KEY_MERGED]
                before = counts.written
                stream_file(src, os.path.join(tmp, shard), plan, out_dtype, meta, engine,
                             counts, overwrite=False, fsync=fsync, tick=tick)
                total_size += counts.written - before
        new_index = dict(index)
        drop = getattr(engine, "drop", ())  # FP8 scales of a dequantized output (fp8_base)
        if drop and isinstance(index.get("weight_map"), dict):
            new_index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                                       if k not in drop}
        md = dict(index.get("metadata") or {}) if isinstance(index.get("metadata"), dict) else {}
        if "total_size" in md:
            md["total_size"] = total_size
        md.pop(F.KEY_MERGED, None)
        if F.KEY_MERGED in metadata:
            md[F.KEY_MERGED] = metadata[F.KEY_MERGED]
        new_index["metadata"] = md
        with AtomicFile(os.path.join(tmp, os.path.basename(index_path)), fsync=fsync) as f:
            f.write((json.dumps(new_index, indent=2) + "\n").encode("utf-8"))
        skip = set(shards) | {os.path.basename(index_path)}
        for entry in sorted(os.listdir(root)):
            if entry in skip or entry.startswith(TEMP_PREFIX):
                continue
            src_path = os.path.join(root, entry)
            if drop and entry == "config.json" and strip_quantization_config(
                    src_path, os.path.join(tmp, entry)):
                continue
            if os.path.isdir(src_path):
                shutil.copytree(src_path, os.path.join(tmp, entry), symlinks=True)
            else:
                shutil.copy2(src_path, os.path.join(tmp, entry))
