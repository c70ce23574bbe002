"""Safetensors adapters (loratool, PEFT, kohya; without DoRA or replacement entries) as numpy
arrays: ``merge`` reads them without importing torch; the merge engine only needs, per
module, the two factors as float arrays, the scale and a ``ModuleInfo`` (see ``NpModule``).
The adapter identity is computed from the stored bytes and equals
``provenance.adapter_identity`` of the same adapter loaded with torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import format as F
from ...numerics import bf16_to_f32
from .provenance import identity_of


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

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def layout(self) -> str:
        return self.info.layout

    def factors(self):
        r = self.info.rank
        return self.B.reshape(self.B.shape[0], r), self.A.reshape(r, -1)


@dataclass
class NpAdapter:
    modules: dict
    identity: str
    source_format: str = "loratool"
    init: dict | None = None  # ``Adapter.init``: the recorded base-changing initialisation


# Formats whose readers take ``ReaderOptions(numpy=True)`` (``interop._common.read_tensors``).
_FOREIGN = ("peft", "kohya")


def header_allows_numpy(path: str, options=None) -> bool:
    """True when ``path`` is a safetensors adapter (loratool, PEFT or kohya) without DoRA
    modules or replacements (headers only). ``options``: the ``ReaderOptions`` the foreign
    reader gets (base, name map...)."""
    from ...guards import is_pickle
    from ...interop import detect_format, get_format
    from ...interop.base import ReaderOptions
    try:
        fmt = detect_format(path)
        if fmt == "loratool":
            info = get_format(fmt).read_info(path)
        elif fmt in _FOREIGN:
            if fmt == "peft":
                from ...interop.peft import locate
                path = locate(path)[1]
            if is_pickle(path):
                return False
            info = get_format(fmt).read_info(path, options or ReaderOptions())
        else:
            return False
    except Exception:  # noqa: BLE001 - the torch path reports the problem with its own error
        return False
    # DoRA, replacement entries (format 1.1), LyCORIS kinds (1.2) and PEFT LoRA on
    # parameters (MoE experts) take the torch path, which reads them.
    from ...experts import is_experts
    return not info.replacements and not any(
        m.magnitude or getattr(m, "lycoris", None) or is_experts(m)
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
    return NpAdapter(modules, identity_of(modules, digest), init=info.init)


_STORED = {np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16",
           np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


def load_foreign_numpy(path: str, fmt: str, options):
    """A PEFT or kohya safetensors adapter as an ``NpAdapter``: the format's own reader with
    ``numpy=True`` (every check it makes, NaN/Inf by ``numerics``), then float arrays for the
    engine. Returns ``(NpAdapter, LoadResult)`` (the result's notes and dropped tensors)."""
    from ...interop import get_format
    from ...model import ModuleInfo
    from ...stfile import tensor_hash
    result = get_format(fmt).load_report(path, options.replace(numpy=True))
    ad = result.adapter
    modules, stored = {}, []
    for name, m in ad.modules.items():
        parts = {F.ROLE_A: m.A, F.ROLE_B: m.B, F.ROLE_BIAS: m.bias}
        for role, a in parts.items():
            if a is not None:
                a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
                stored.append((F.tensor_name(name, role), _STORED[a.dtype], tuple(a.shape),
                               a.reshape(-1).view(np.uint8)))
        info = ModuleInfo(name, m.kind, m.layout, tuple(m.A.shape), tuple(m.B.shape),
                          float(m.alpha), m.scaling, _STORED[m.A.dtype], False,
                          m.bias is not None)
        modules[name] = NpModule(info, _values(m.A), _values(m.B), _values(m.bias))
    return NpAdapter(modules, identity_of(modules, tensor_hash(stored)), fmt, ad.init), result


def _values(a: np.ndarray | None) -> np.ndarray | None:
    """Stored array -> its float values (BF16 bits widened to float32: exact)."""
    if a is None:
        return None
    return bf16_to_f32(a) if a.dtype == np.uint16 else a
