"""Changed tensors that are not LoRA targets: norms, biases, embeddings (by default) and any
other tensor that is not the weight of a linear or conv layer (spec/extract.md section 2).

Each is compared byte for byte in row blocks. One that changed becomes a replacement entry
(adapter format 1.1) holding the tuned values exactly, in the tuned dtype, so that merging
the adapter into the base reproduces the tuned tensor bit for bit: the whole tensor, or, for
an embedding of which at most half the rows changed (added or retrained tokens), just those
rows with their indices. Unchanged tensors produce nothing.
"""

from __future__ import annotations

import math
import re

import torch

from ...errors import OperationError
from ...model import Replacement

REPLACED, REPLACED_ROWS, SKIPPED = "replaced", "replaced_rows", "skipped"
# the last name segment of an embedding (LLaMA embed_tokens, GPT-2 wte/wpe, T5 shared)
EMBEDDING_RE = re.compile(r"(embed|^wte$|^wpe$|^shared$)")
_FLOAT = ("F64", "F32", "F16", "BF16")


def category(name: str, info) -> str:
    """``bias``, ``vector`` (norm weights, per-channel scales), ``embedding``, ``non-float``
    or ``other``."""
    if name.endswith(".bias"):
        return "bias"
    if info.dtype not in _FLOAT:
        return "non-float"
    if len(info.shape) <= 1:
        return "vector"
    if EMBEDDING_RE.search(name.removesuffix(".weight").rpartition(".")[2]):
        return "embedding"
    return "other"


def compare(b, t, name: str, *, keep: bool):
    """(report row, Replacement or None); (None, None) when the tensor is bit-identical.

    ``keep``: store the tuned values (else the tensor is only listed, as skipped). The
    comparison copies nothing; the values of a changed tensor are read in a second pass
    (only the blocks that hold changed rows, for a row replacement), so that an unchanged
    embedding costs row blocks, not a copy of itself."""
    from .reader import Pair
    info = b.tensors[name]
    cat = category(name, info)
    numeric = cat != "non-float"
    pair = Pair(name, b, t, info.dtype, tuple(info.shape))
    changed_rows = []
    d2 = w2 = 0.0
    for start, stop in pair.blocks():
        x, y, same = pair.read(start, stop)
        if numeric:
            xb = x.to(torch.float64)
            w2 += float(torch.sum(xb * xb))
        if same:
            continue
        changed_rows.append((_bits(x) != _bits(y)).any(dim=1).nonzero().flatten() + start)
        if numeric:
            d = y.to(torch.float64) - xb
            d2 += float(torch.sum(d * d))
    if not changed_rows:
        return None, None
    index = torch.cat(changed_rows).to(torch.int64)
    row = {"name": name, "shape": list(info.shape), "dtype": info.dtype, "category": cat,
           "norm_change": math.sqrt(d2) if numeric else None,
           "relative_change": (math.sqrt(d2 / w2) if w2 > 0 else math.inf) if numeric
           else math.nan,
           "rows_changed": int(index.numel()) if len(info.shape) >= 2 else None}
    if not (keep and numeric):
        return dict(row, action=SKIPPED), None
    rows = cat == "embedding" and 2 * index.numel() <= info.shape[0]
    parts = []
    for start, stop in pair.blocks():
        if rows:
            sel = index[(index >= start) & (index < stop)]
            if sel.numel():
                parts.append(t.rows(name, start, stop)[sel - start])  # a copy
        else:
            parts.append(t.rows(name, start, stop).clone())  # the reader reuses its buffer
    value = torch.cat(parts)
    if not bool(torch.isfinite(value).all()):
        raise OperationError(f"tensor {name!r} of the tuned checkpoint holds NaN or Inf; a "
                             "replacement entry cannot carry it (leave it out with "
                             "others='skip', CLI --skip-others)", code="LT543", module=name)
    if rows:
        return dict(row, action=REPLACED_ROWS), Replacement(
            name, value.reshape(-1, *info.shape[1:]), index)
    return dict(row, action=REPLACED), Replacement(name, value.reshape(info.shape))


def _bits(x):
    """Raw bits, one row per matrix row (byte equality: -0.0 != 0.0)."""
    from .reader import _bits as bits
    return bits(x).reshape(x.shape[0], -1)


def refuse(rows) -> OperationError:
    """LT545: changed tensors that no entry can hold (non-float) and that were not skipped."""
    lines = [f"{r['name']} {r['shape']} {r['dtype']}" for r in rows[:25]]
    more = f"\n  ... and {len(rows) - 25} more" if len(rows) > 25 else ""
    return OperationError(
        f"{len(rows)} changed tensor(s) are not floating point, so neither a LoRA module nor a "
        "replacement entry can hold them, and they would be lost:\n  " + "\n  ".join(lines)
        + more + "\npass others='skip' (CLI --skip-others) to leave them out (they are "
        "listed in the report)", code="LT545")
