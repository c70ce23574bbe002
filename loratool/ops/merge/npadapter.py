"""loratool-format adapters (without DoRA) as numpy arrays: ``merge`` reads them without
importing torch; the merge engine only needs, per module, the two factors as float arrays,
the scale and the header's ``ModuleInfo`` (see ``NpModule``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ... import format as F
from ...numerics import bf16_to_f32


def as_f64(t) -> np.ndarray | None:
    """A contiguous float64 numpy array of ``t`` (numpy array or torch tensor); exact."""
    if t is None:
        return None
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float64)
    import torch  # a torch tensor: torch is loaded already
    return t.detach().to("cpu", torch.float64).contiguous().numpy()


@dataclass
class NpModule:
    """The parts of ``model.LoraModule`` that ``merge`` uses, with numpy tensors."""

    info: object  # ModuleInfo, from the header
    A: np.ndarray
    B: np.ndarray
    bias: np.ndarray | None = None
    magnitude: None = None

    @property
    def scale(self) -> float:
        return self.info.scale

    def factors(self):
        r = self.info.rank
        return self.B.reshape(self.B.shape[0], r), self.A.reshape(r, -1)


@dataclass
class NpAdapter:
    modules: dict
    identity: str
    source_format: str = "loratool"


def header_allows_numpy(path: str) -> bool:
    """True when ``path`` is a loratool-format adapter without DoRA modules or replacements
    (header only)."""
    from ...interop.native import read_info as read_loratool_info
    from ...interop import detect_format
    try:
        if detect_format(path) != "loratool":
            return False
        info = read_loratool_info(path)
    except Exception:  # noqa: BLE001 - the torch path reports the problem with its own error
        return False
    # Replacement entries (format 1.1) and LyCORIS kinds (1.2) take the torch path.
    return not info.replacements and not any(m.magnitude or getattr(m, "lycoris", None)
                                             for m in info.modules.values())


def load_numpy(path: str) -> NpAdapter:
    """A loratool-format adapter as numpy arrays, with every check of ``load_loratool``.

    Its identity equals ``provenance.adapter_identity`` of the torch-loaded adapter: the canonical
    tensors of a loratool file are exactly its tensors, so their hash is the file's data hash.
    """
    from ...interop.native import read_tensors as read_loratool_tensors
    from ...stfile import NUMPY_DTYPES
    info, raw, digest = read_loratool_tensors(path)
    arrays = {}
    for name, (t, data) in raw.items():
        a = np.frombuffer(data, dtype=np.dtype(NUMPY_DTYPES[t.dtype]).newbyteorder("<"))
        if t.dtype == "BF16":
            a = bf16_to_f32(a)  # exact
        arrays[name] = a.reshape(t.shape)
    modules = {}
    for name, m in sorted(info.modules.items()):
        get = lambda role: arrays.get(F.tensor_name(name, role))  # noqa: E731
        modules[name] = NpModule(m, get(F.ROLE_A), get(F.ROLE_B), get(F.ROLE_BIAS))
    table = {n: {"kind": m.info.kind, "layout": m.info.layout, "scale": float(m.scale)}
             for n, m in modules.items()}
    doc = F.canonical_json({"modules": table, "tensor_hash": digest})
    return NpAdapter(modules, "sha256:" + hashlib.sha256(doc.encode("ascii")).hexdigest())
