"""Reading and writing adapters: ``read_adapter_info`` (header only), ``load_adapter``,
``save_adapter``. Foreign formats (PEFT, kohya, loralib) are detected and handed to
``loratool.interop``; everything comes back as the same ``Adapter`` model.
"""

from __future__ import annotations

import math
import os

from . import format as F
from .errors import LoraToolError, MetadataError, TensorError
from .model import Adapter, AdapterInfo, LoraModule
from .stfile import Header, SafetensorsWriter, read_header
from .validation import check_header


def _raise_first(findings, path) -> None:
    for f in findings:
        if f.is_error:
            cls = {"LT1": MetadataError, "LT2": TensorError}.get(f.code[:3], LoraToolError)
            raise cls(f.message, code=f.code, path=path, module=f.module)


def read_loratool_info(path: str, header: Header | None = None) -> AdapterInfo:
    """Header-only description of a loratool-format file; raises on any broken MUST rule."""
    header = header or read_header(path)
    findings, info = check_header(header)
    _raise_first(findings, header.path)
    return info


def read_adapter_info(path: str | os.PathLike, **options) -> AdapterInfo:
    """Describe an adapter of any supported format without reading its tensor data.

    >>> info = read_adapter_info("examples/adapter.safetensors")
    >>> info.modules["model.layers.0.self_attn.q_proj"].rank
    """
    from .interop import reader_for
    path = os.fspath(path)
    return reader_for(path, options).read_info(path, options)


def load_adapter(path: str | os.PathLike, **options) -> Adapter:
    """Load an adapter of any supported format into the canonical model (imports torch).

    Options for foreign formats (see ``loratool.interop``): ``alpha``, ``enable_lora``,
    ``fan_in_fan_out``, ``base`` (a checkpoint used to resolve names and layouts),
    ``allow_unknown``.
    """
    from .interop import reader_for
    path = os.fspath(path)
    return reader_for(path, options).load(path, options)


def read_loratool_tensors(path: str, *, check_values: bool = True
                          ) -> tuple[AdapterInfo, dict, str]:
    """Torch-free core of ``load_loratool``: the checked header description, per tensor
    name ``(TensorInfo, raw little-endian bytes)``, and the tensor hash of the data. Every
    MUST rule, the tensor hash and (unless ``check_values`` is false) NaN/Inf are checked."""
    import numpy as np

    from .numerics import nonfinite_count
    from .stfile import NUMPY_DTYPES, TensorHasher, read_bytes
    header = read_header(path)
    info = read_loratool_info(path, header)
    hasher = TensorHasher()
    raw = {}
    with open(path, "rb") as f:
        for name in sorted(header.tensors):
            t = header.tensors[name]
            data = read_bytes(header, t, f)
            hasher.begin(name, t.dtype, t.shape, t.nbytes)
            hasher.update(data)
            if check_values and t.dtype in NUMPY_DTYPES and nonfinite_count(
                    np.frombuffer(data, dtype=np.dtype(NUMPY_DTYPES[t.dtype]).newbyteorder("<")),
                    t.dtype):
                raise TensorError(f"tensor {name!r} holds NaN or Inf values", code="LT209",
                                  path=path, module=F.split_tensor_name(name)[0])
            raw[name] = (t, data)
    if info.tensor_hash is not None and info.tensor_hash != hasher.hexdigest():
        raise MetadataError(f"{F.KEY_TENSOR_HASH} does not match the tensor data: the file was "
                            "altered or corrupted", code="LT110", path=path)
    return info, raw, hasher.hexdigest()


def load_loratool(path: str, *, check_values: bool = True) -> Adapter:
    """Load a loratool-format file, checking every MUST rule, the tensor hash and (unless
    ``check_values`` is false, as for ``inspect --stats``) NaN/Inf."""
    from .tensors import from_bytes
    info, raw, _ = read_loratool_tensors(path, check_values=check_values)
    tensors = {name: from_bytes(data, t.dtype, t.shape) for name, (t, data) in raw.items()}
    modules = {}
    for name, m in info.modules.items():
        get = lambda role: tensors.get(F.tensor_name(name, role))  # noqa: E731
        modules[name] = LoraModule(name, m.kind, m.layout, get(F.ROLE_A), get(F.ROLE_B),
                                   m.alpha, m.scaling, get(F.ROLE_MAGNITUDE), get(F.ROLE_BIAS))
    return Adapter(modules=modules, alpha=info.alpha, base_model=info.base_model,
                   base_model_hash=info.base_model_hash, provenance=info.provenance,
                   extra_metadata=dict(info.extra_metadata), source_format="loratool")


def canonical_tensors(adapter: Adapter) -> dict[str, object]:
    """Tensor name -> torch tensor, exactly as ``save_adapter`` writes them."""
    out = {}
    for name, m in adapter.modules.items():
        for role, t in ((F.ROLE_A, m.A), (F.ROLE_B, m.B), (F.ROLE_MAGNITUDE, m.magnitude),
                        (F.ROLE_BIAS, m.bias)):
            if t is not None:
                out[F.tensor_name(name, role)] = t
    return dict(sorted(out.items()))


def adapter_metadata(adapter: Adapter, tensor_hash: str) -> dict[str, str]:
    """The ``__metadata__`` that ``save_adapter`` writes (canonical spelling)."""
    scaling = adapter.scaling
    modules = adapter.modules
    if scaling == "mixed":
        # One file has one scaling rule: fold rsLoRA modules into an equivalent standard alpha.
        scaling = F.SCALING_STANDARD
        modules = {n: (m if m.scaling == scaling else
                       m.with_tensors(alpha=m.scale * m.rank, scaling=scaling))
                   for n, m in modules.items()}
    default_alpha = float(adapter.alpha)
    table = {}
    for name, m in modules.items():
        rec = {"kind": m.kind, "layout": m.layout}
        if float(m.alpha) != default_alpha:
            rec["alpha"] = float(m.alpha)
        table[name] = rec
    meta = dict(adapter.extra_metadata)
    meta = {k: v for k, v in meta.items() if not k.startswith(F.NAMESPACE)}
    meta.update({
        F.KEY_FORMAT: F.FORMAT_NAME,
        F.KEY_VERSION: F.FORMAT_VERSION_STR,
        F.KEY_SCALING: scaling,
        F.KEY_ALPHA: F.format_number(default_alpha),
        F.KEY_TARGETS: F.canonical_json(sorted(modules)),
        F.KEY_MODULES: F.canonical_json(table),
        F.KEY_TENSOR_HASH: tensor_hash,
    })
    for key, value in ((F.KEY_BASE_MODEL, adapter.base_model),
                       (F.KEY_BASE_HASH, adapter.base_model_hash),
                       (F.KEY_PROVENANCE, adapter.provenance)):
        if value is not None:
            meta[key] = value
    return meta


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, overwrite: bool = False,
                 fsync: bool = False) -> str:
    """Write ``adapter`` in loratool format 1.0, atomically; returns the tensor hash.

    The bytes depend only on the adapter: tensors in name order, canonical metadata JSON.
    """
    from .stfile import tensor_hash
    from .tensors import st_dtype, to_bytes
    if not math.isfinite(float(adapter.alpha)) or float(adapter.alpha) == 0:
        raise MetadataError(f"adapter alpha {adapter.alpha!r} must be finite and non-zero",
                            code="LT105")
    tensors = canonical_tensors(adapter)
    raw = {name: to_bytes(t) for name, t in tensors.items()}
    digest = tensor_hash((n, st_dtype(t), tuple(t.shape), raw[n]) for n, t in tensors.items())
    meta = adapter_metadata(adapter, digest)
    entries = [(n, st_dtype(t), tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, entries, meta, overwrite=overwrite, fsync=fsync) as w:
        for name in tensors:
            w.write(name, raw[name])
        w.commit()
    return digest
