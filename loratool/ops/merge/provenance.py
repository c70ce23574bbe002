"""Merge provenance: the identity of an adapter, the ``loratool.merged`` records that
``merge`` writes and ``unmerge`` checks (spec/merge.md), and reading them back from any base
checkpoint (header and sidecar reads only: no torch)."""

from __future__ import annotations

import hashlib
import json
import math
import os

from ... import __version__
from ... import format as F
from ...checkpoint import (KIND_PICKLE, KIND_SHARDED, checkpoint_kind, find_index,
                           list_tensors, read_index_json, read_sidecar, shard_order,
                           sidecar_path)
from ...errors import CheckpointError


# --- records in checkpoint metadata -----------------------------------------------------------

def checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a base checkpoint, read without tensor data or torch: the
    safetensors ``__metadata__``; for a sharded directory the string values of the index's
    ``metadata`` (else the first shard's); for .pt/.bin the sidecar file."""
    from ...checkpoint import resolve_checkpoint
    from ...stfile import read_header
    path = resolve_checkpoint(path)
    kind = checkpoint_kind(path)
    if kind == KIND_PICKLE:
        return read_sidecar(path)
    if kind == KIND_SHARDED:
        index = find_index(path)
        raw = read_index_json(index).get("metadata") or {}
        meta = {k: v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) \
            else {}
        if meta:
            return meta
        shards = shard_order(index)
        if not shards:
            return {}
        return dict(read_header(os.path.join(os.path.dirname(index), shards[0])).metadata)
    return dict(read_header(path).metadata)


def merge_records(metadata: dict[str, str], *, path: str = "") -> list[dict]:
    """The list under ``loratool.merged`` (spec/merge.md), ``[]`` when absent."""
    from ...format import KEY_MERGED
    text = metadata.get(KEY_MERGED)
    if text is None:
        return []
    try:
        records = json.loads(text)
        ok = isinstance(records, list) and all(
            isinstance(r, dict) and isinstance(r.get("adapters"), list) for r in records)
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise CheckpointError(f"metadata {KEY_MERGED} is not a JSON list of merge records "
                              "(spec/merge.md); it was edited or damaged", code="LT410",
                              path=path or None)
    return records


def merged_checkpoint_report(path: str | os.PathLike) -> dict | None:
    """``inspect``'s report for a base checkpoint written by ``loratool merge`` (one with a
    ``loratool.merged`` record and no adapter format key), or None for anything else. Header
    and sidecar reads only: no torch."""
    return checkpoint_report(path, merged_only=True)


# Tensor-name pieces of adapters (LoRA, DoRA, LyCORIS, kohya alphas): a checkpoint holding
# any of them is not reported as a plain checkpoint, its reader's error stands.
_ADAPTER_NAME_PARTS = ("lora_", "lora.", "hada_", "lokr_", "dora_scale", ".alpha", "oft_",
                       "lora_magnitude_vector")


def checkpoint_report(path: str | os.PathLike, *, merged_only: bool = False) -> dict | None:
    """``inspect``'s report for a base checkpoint (a safetensors file, a sharded or
    single-file model directory; a ``.pt``/``.bin`` only with its merge sidecar): tensors,
    parameters, bytes, dtypes and the ``loratool.merged`` records, from headers only (no
    torch). None when ``path`` is not such a checkpoint, holds adapter metadata or tensor
    names, or (``merged_only``) carries no merge record."""
    from collections import Counter

    from ...checkpoint import resolve_checkpoint
    from ...errors import LoraToolError
    from ...format import KEY_FORMAT, KEY_MERGED
    path = os.fspath(path)
    try:
        resolved = resolve_checkpoint(path)
        kind = checkpoint_kind(resolved)
        if kind == KIND_PICKLE and not os.path.exists(sidecar_path(resolved)):
            return None
        meta = checkpoint_metadata(resolved)
        if KEY_FORMAT in meta or (merged_only and KEY_MERGED not in meta):
            return None
        records = merge_records(meta, path=path)
        tensors = None if kind == KIND_PICKLE else list_tensors(resolved)
    except LoraToolError:
        return None  # not a checkpoint we recognize: inspect reports it as an adapter would
    if KEY_MERGED not in meta and (tensors is None or not tensors or any(
            part in name for name in tensors for part in _ADAPTER_NAME_PARTS)):
        return None
    from ...stfile import DTYPE_SIZES
    report = {"path": path, "source_format": "merged-checkpoint" if records else "checkpoint",
              "checkpoint": kind, "tensors": None, "parameters": None, "bytes": None,
              "dtypes": {}, "merged": records,
              "other_metadata": {k: v for k, v in sorted(meta.items()) if k != KEY_MERGED}}
    if tensors is not None:
        report["tensors"] = len(tensors)
        report["parameters"] = sum(math.prod(t.shape) for t in tensors.values())
        report["bytes"] = sum(
            math.prod(t.shape) * DTYPE_SIZES[t.dtype] for t in tensors.values())
        report["dtypes"] = dict(sorted(Counter(t.dtype for t in tensors.values()).items()))
    return report


# --- adapter identity and new records ---------------------------------------------------------

def adapter_identity(adapter) -> str:
    """The identity recorded in ``loratool.merged`` (spec/merge.md, "Adapter identity").

    sha256 of the canonical JSON ``{"modules": {name: {"kind", "layout", "scale"}},
    "tensor_hash": T}`` where T is the spec's integrity hash of the canonical tensors (the
    ``loratool.tensor_hash`` that ``save_adapter`` writes). The same adapter read from PEFT,
    kohya or loratool files has one identity: it depends on what is added, not on the file.
    """
    from ...interop.native import canonical_tensors
    from ...stfile import tensor_hash
    from ...tensors import st_dtype, to_bytes
    tensors = canonical_tensors(adapter)
    digest = tensor_hash((n, st_dtype(t), tuple(t.shape), to_bytes(t))
                         for n, t in tensors.items())
    return identity_of(adapter.modules, digest)


def identity_of(modules: dict, digest: str) -> str:
    """``adapter_identity`` from the modules (anything with ``kind``, ``layout`` and
    ``scale``) and the integrity hash ``digest`` of their canonical tensors."""
    table = {n: {"kind": m.kind, "layout": m.layout, "scale": float(m.scale)}
             for n, m in modules.items()}
    doc = F.canonical_json({"modules": table, "tensor_hash": digest})
    return "sha256:" + hashlib.sha256(doc.encode("ascii")).hexdigest()


def adapter_record(ld) -> dict:
    mods = ld.adapter.modules.values()
    return {"identity": ld.identity, "scale": ld.scale,
            "source": os.path.basename(ld.source) if ld.source != "<in memory>" else ld.source,
            "source_format": ld.source_format, "modules": ld.merged,
            "dora": any(m.magnitude is not None or (  # PEFT's or LyCORIS's DoRA
                getattr(m, "record", None) is not None and not m.variant.additive)
                for m in mods),
            "lora_bias": any(m.bias is not None for m in mods),
            **({"replacements": ld.replaced} if ld.replaced else {})}


def new_record(op: str, loaded, device: str, precision: str, dtype: str) -> dict:
    return {"op": op, "adapters": [adapter_record(ld) for ld in loaded], "device": device,
            "precision": precision, "dtype": dtype, "loratool_version": __version__,
            "format_version": F.FORMAT_VERSION_STR}


def match_unmerge(records: list[dict], loaded, *, force: bool, path: str):
    """Remove the given adapters from the merge records; refuse a mismatch unless ``force``."""
    records = [dict(r, adapters=list(r.get("adapters", []))) for r in records]
    problems, unmatched = [], []
    for ld in loaded:
        hit = False
        for rec in reversed(records):
            if rec.get("op", "merge") != "merge":
                continue
            for k, a in enumerate(rec["adapters"]):
                if a.get("identity") == ld.identity and _same_scale(a.get("scale"), ld.scale):
                    del rec["adapters"][k]
                    hit = True
                    break
            if hit:
                break
        if hit:
            continue
        unmatched.append(ld)
        scales = [a.get("scale") for r in records if r.get("op", "merge") == "merge"
                  for a in r["adapters"] if a.get("identity") == ld.identity]
        if scales:
            problems.append(f"{ld.source} was merged with scale {scales[-1]}, not {ld.scale}; "
                            f"unmerge it as {ld.source}:{scales[-1]}")
        elif not records:
            problems.append(f"{path} has no {F.KEY_MERGED} record: it was not merged by "
                            f"loratool, or the record was stripped; cannot check {ld.source}")
        else:
            merged = [f"{a.get('source')} ({a.get('identity', '')[:19]}...)"
                      for r in records if r.get("op", "merge") == "merge"
                      for a in r["adapters"]]
            problems.append(f"{ld.source} (identity {ld.identity[:19]}...) is not among the "
                            f"adapters merged into it: {', '.join(merged) or 'none left'}")
    if problems and not force:
        raise CheckpointError("unmerge refused: " + "; ".join(problems) + ". Subtracting an "
                              "adapter that was not merged corrupts the weights; pass --force "
                              "(force=True) if you know better.", code="LT413", path=path)
    records = [r for r in records if r["adapters"] or r.get("op", "merge") != "merge"]
    return records, unmatched


def _same_scale(a, b: float) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
