"""Replacement entries in a merge: a base tensor (or some of its rows) overwritten by stored
values, as PEFT's ``merge_and_unload()`` does for ``modules_to_save``, saved embedding layers,
trained biases and ``trainable_token_indices``.

The values are written into the base tensor's buffer before the engine adds any low-rank
update, each rounded once (to nearest even) from its stored dtype to the base's dtype: the
value PEFT's model holds after loading the adapter into a base of that dtype.
"""

from __future__ import annotations

import math

import numpy as np

from ...numerics import FLOAT_NP, round_into
from .npadapter import as_f64

KINDS = ("replace", "rows")


def apply_replacements(buf, dtype: str, shape, ops) -> list:
    """Write the replacement ops of ``ops`` into ``buf`` (the tensor's raw bytes, numpy or
    pinned torch uint8); return the other ops, for the engine."""
    reps = [op for op in ops if op.kind in KINDS]
    if not reps:
        return list(ops)
    raw = buf if isinstance(buf, np.ndarray) else buf.numpy()
    n = math.prod(shape)
    arr = raw[: n * np.dtype(FLOAT_NP[dtype]).itemsize].view(FLOAT_NP[dtype]).reshape(shape)
    for op in reps:
        values = as_f64(op.vec)
        if op.kind == "replace":
            round_into(arr, values.reshape(arr.shape), dtype)
        else:
            index = np.asarray(op.index.cpu().numpy() if hasattr(op.index, "cpu")
                               else op.index, dtype=np.int64)
            rows = np.empty((index.size, *arr.shape[1:]), dtype=arr.dtype)
            round_into(rows, values.reshape(rows.shape), dtype)
            arr[index] = rows
    return [op for op in ops if op.kind not in KINDS]
