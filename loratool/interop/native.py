"""The loratool adapter format 1.x (spec/adapter-format.md) as a format plug-in.

One safetensors file whose ``__metadata__`` says ``loratool.format``; every MUST rule is
checked on read (``validation.check_header``), the tensor hash and (unless
``check_values`` is off) NaN/Inf on load. Writing is canonical: the bytes depend only on the
adapter (tensors in name order, canonical metadata JSON).
"""

from __future__ import annotations

import math

from .. import format as F
from ..errors import LoraToolError, MetadataError, TensorError
from ..format import KIND_CONV, KIND_EMBEDDING, KIND_LINEAR
from ..model import Adapter, AdapterInfo, LoraModule, Replacement
from ..rules import Finding
from ..stfile import Header, SafetensorsWriter, read_header
from ..validation import check_header
from ..variants import VARIANTS, FullDiff, LycorisDora
from .base import DECLARED, FALLBACK, Capabilities, LoadResult, Probe, ReaderOptions

NAME = "loratool"
CAPABILITIES = Capabilities(kinds=frozenset({KIND_LINEAR, KIND_CONV, KIND_EMBEDDING}),
                            variants=frozenset(VARIANTS) | {LycorisDora.name, FullDiff.name},
                            bias=True, rslora=True, per_module_alpha=True,
                            replacements=True, reads=frozenset({"base"}))


def detect(probe: Probe) -> int:
    if probe.is_dir or probe.is_pickle:
        return 0
    # A safetensors file nobody else claims is read as loratool, whose reader says what is
    # missing (a better message than "unknown format").
    return DECLARED if F.KEY_FORMAT in probe.metadata else FALLBACK


def _raise_first(findings, path) -> None:
    for f in findings:
        if f.is_error:
            cls = {"LT1": MetadataError, "LT2": TensorError}.get(f.code[:3], LoraToolError)
            raise cls(f.message, code=f.code, path=path, module=f.module)


def read_info(path: str, options: ReaderOptions | None = None, *,
              header: Header | None = None) -> AdapterInfo:
    """Header-only description of a loratool-format file; raises on any broken MUST rule."""
    header = header or read_header(path)
    findings, info = check_header(header)
    _raise_first(findings, header.path)
    return info


def read_tensors(path: str, *, check_values: bool = True, header: Header | None = None
                 ) -> tuple[AdapterInfo, dict, str]:
    """Torch-free core of ``load``: the checked header description, per tensor name
    ``(TensorInfo, raw little-endian bytes)``, and the tensor hash of the data. Every MUST
    rule, the tensor hash and (unless ``check_values`` is false) NaN/Inf are checked.
    ``header``: the file's header when the caller has read it."""
    import numpy as np

    from ..numerics import nonfinite_count
    from ..stfile import NUMPY_DTYPES, TensorHasher, read_bytes
    header = header or read_header(path)
    info = read_info(path, header=header)
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


def load(path: str, options: ReaderOptions | None = None) -> Adapter:
    """Load a loratool-format file, checking every MUST rule, the tensor hash and (unless
    ``check_values`` is false, as for ``inspect --stats``) NaN/Inf."""
    from ..tensors import from_bytes
    options = options or ReaderOptions()
    header = read_header(path)
    info, raw, _ = read_tensors(path, check_values=options.check_values, header=header)
    tensors = {name: from_bytes(data, t.dtype, t.shape) for name, (t, data) in raw.items()}
    modules = _load_lycoris(header, info, tensors, options)
    for name, m in info.modules.items():
        if name in modules:
            continue
        get = lambda role: tensors.get(F.tensor_name(name, role))  # noqa: E731
        modules[name] = LoraModule(name, m.kind, m.layout, get(F.ROLE_A), get(F.ROLE_B),
                                   m.alpha, m.scaling, get(F.ROLE_MAGNITUDE), get(F.ROLE_BIAS))
    replacements = {}
    for target, r in info.replacements.items():
        get = lambda role: tensors.get(F.tensor_name(target, role))  # noqa: E731
        if r.rows is None:
            replacements[target] = Replacement(target, get(F.ROLE_REPLACE))
        else:
            _check_index(get(F.ROLE_REPLACE_INDEX), target, path)
            replacements[target] = Replacement(target, get(F.ROLE_REPLACE_ROWS),
                                               get(F.ROLE_REPLACE_INDEX))
    return Adapter(modules=modules, replacements=replacements, alpha=info.alpha, base_model=info.base_model,
                   base_model_hash=info.base_model_hash, provenance=info.provenance,
                   extra_metadata=dict(info.extra_metadata), source_format=NAME,
                   init=info.init)


def _load_lycoris(header: Header, info: AdapterInfo, tensors: dict, options) -> dict:
    """The LyCORIS-kind modules (format 1.2), parsed from their own tensors. A module whose
    record has no shape (conv factors stored flattened, converted without a base) takes its
    shape from ``options.base`` when given, as the LyCORIS reader does."""
    import json
    lyco = [n for n, m in info.modules.items() if getattr(m, "lycoris", None)]
    if not lyco:
        return {}
    from ..lycoris.native import load_module
    from ._common import base_shapes
    table = json.loads(header.metadata[F.KEY_MODULES])
    shapes = (base_shapes(options) or {}) if any(
        "shape" not in table[n] for n in lyco) else {}
    grouped: dict[str, dict] = {n: {} for n in lyco}  # module -> {role: tensor}, one pass
    for n, t in tensors.items():
        module, _, role = n.rpartition(".")
        if module in grouped:
            grouped[module][role] = t
    out = {}
    for name in lyco:
        roles = grouped[name]
        rec = table[name]
        if "shape" not in rec:
            shape = next((shapes[c + ".weight"] for c in (name, name.partition(".")[2])
                          if c + ".weight" in shapes), None)
            rec = rec if shape is None else {**rec, "shape": list(shape)}
        out[name] = load_module(name, rec, roles)
    return out


def _check_index(index, target: str, path: str) -> None:
    """LT215 on load: replaced rows are distinct and non-negative."""
    if index.numel() and (int(index.min()) < 0 or index.unique().numel() != index.numel()):
        raise TensorError(f"replacement of {target!r}: {F.ROLE_REPLACE_INDEX} must hold "
                          "distinct non-negative row indices", code="LT215", path=path,
                          module=target)


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    return LoadResult(load(path, options))


def validate(path: str, options: ReaderOptions, *, data: bool = True) -> list[Finding]:
    """Every broken rule (not only the first), and with ``data`` NaN/Inf, zero B and the hash."""
    from ..validation import check_data
    header = read_header(path)
    findings, _ = check_header(header)
    if data:
        findings.extend(check_data(header, tensor_hash=header.metadata.get(F.KEY_TENSOR_HASH)))
    return findings


# --- writing -----------------------------------------------------------------------------------

def canonical_tensors(adapter: Adapter) -> dict[str, object]:
    """Tensor name -> torch tensor, exactly as ``save`` writes them."""
    out = {}
    for name, m in adapter.modules.items():
        if getattr(m, "record", None) is not None:  # a LyCORIS kind (1.2): its own tensors
            from ..lycoris.native import native_entry
            out.update({F.tensor_name(name, role): t
                        for role, t in native_entry(name, m)[1].items()})
            continue
        for role, t in ((F.ROLE_A, m.A), (F.ROLE_B, m.B), (F.ROLE_MAGNITUDE, m.magnitude),
                        (F.ROLE_BIAS, m.bias)):
            if t is not None:
                out[F.tensor_name(name, role)] = t
    for target, r in adapter.replacements.items():
        if r.index is None:
            out[F.tensor_name(target, F.ROLE_REPLACE)] = r.value
        else:
            out[F.tensor_name(target, F.ROLE_REPLACE_ROWS)] = r.value
            out[F.tensor_name(target, F.ROLE_REPLACE_INDEX)] = r.index
    return dict(sorted(out.items()))


def adapter_metadata(adapter: Adapter, tensor_hash: str) -> dict[str, str]:
    """The ``__metadata__`` that ``save`` writes (canonical spelling)."""
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
    lycoris = False
    for name, m in modules.items():
        if getattr(m, "record", None) is not None:
            from ..lycoris.native import native_entry
            table[name] = native_entry(name, m)[0]
            lycoris = True
            continue
        rec = {"kind": m.kind, "layout": m.layout}
        if float(m.alpha) != default_alpha:
            rec["alpha"] = float(m.alpha)
        table[name] = rec
    meta = dict(adapter.extra_metadata)
    meta = {k: v for k, v in meta.items() if not k.startswith(F.NAMESPACE)}
    meta.update({
        F.KEY_FORMAT: F.FORMAT_NAME,
        F.KEY_VERSION: (F.FORMAT_VERSION_LYCORIS if lycoris else
                        F.FORMAT_VERSION_REPLACEMENTS if adapter.replacements
                        else F.FORMAT_VERSION_STR),
        F.KEY_SCALING: scaling,
        F.KEY_ALPHA: F.format_number(default_alpha),
        F.KEY_TARGETS: F.canonical_json(sorted(modules)),
        F.KEY_MODULES: F.canonical_json(table),
        F.KEY_TENSOR_HASH: tensor_hash,
    })
    if adapter.init:
        meta[F.KEY_INIT] = F.canonical_json(adapter.init)
    for key, value in ((F.KEY_BASE_MODEL, adapter.base_model),
                       (F.KEY_BASE_HASH, adapter.base_model_hash),
                       (F.KEY_PROVENANCE, adapter.provenance)):
        if value is not None:
            meta[key] = value
    return meta


def write(adapter: Adapter, path: str, *, overwrite: bool = False, fsync: bool = False) -> str:
    """Write ``adapter`` in loratool format 1.0 (1.1 when it has replacement entries),
    atomically; returns the tensor hash."""
    from ..stfile import tensor_hash
    from ..tensors import st_dtype, to_bytes
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


def save(adapter: Adapter, path: str, options: ReaderOptions) -> list[str]:
    write(adapter, path, overwrite=options.overwrite)
    return []
