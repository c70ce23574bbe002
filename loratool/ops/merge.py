"""``merge`` and ``unmerge``: add (subtract) adapter deltas into a base checkpoint, streaming.

The normative semantics, the ``loratool.merged`` provenance record and the numerical
guarantees are in spec/merge.md; this module implements them.

* Streaming: the output is written in the base's own tensor order, header first; a reader
  thread, the merge and a writer thread each work on their own tensor. Tensors nothing
  changes are copied file-to-file by the kernel. Peak memory is about three of the largest
  merged tensors, independent of the checkpoint's size.
* Exact (CPU, the default): ``W + sum_i s_i * delta_i`` is evaluated in float64 and rounded
  once to the stored dtype, in numpy (``_merge_numpy.NumpyExactEngine``). float64 ->
  bf16/fp16 goes through float32 rounded to odd, because a float64 -> bf16/fp16 conversion
  through float32 rounded to nearest rounds twice (torch's own ``.to`` does).
* No torch unless needed: loratool-format adapters (no DoRA) are read as numpy arrays, so
  ``merge`` on a safetensors base on the CPU never imports torch; foreign formats, DoRA,
  ``.pt`` files and CUDA load torch. The engine is the same, so are the output bytes.
* Fast (CUDA): the same sum in float32 on the device; reading, transfer and writing overlap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from .. import __version__
from .. import format as F
from ..atomic import TEMP_PREFIX, AtomicDir, AtomicFile, check_destination
from ..checkpoint import (KIND_PICKLE, KIND_SHARDED, SafetensorsSource, StreamWriter,
                          checkpoint_kind, find_index, list_tensors, merge_records,
                          open_source, read_index_json, shard_order, sidecar_path,
                          write_pickle_from_safetensors, write_sidecar)
from ..errors import CheckpointError, OperationError
from ..guards import PICKLE_SUFFIXES, parse_path_number

DTYPE_CHOICES = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
OUTPUT_FORMATS = ("safetensors", "pt")
MERGEABLE_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_LISTED = 40


# --- arguments ---------------------------------------------------------------------------------

def parse_adapter_spec(text: str) -> tuple[str, float]:
    """``"adapter.safetensors:0.5"`` -> ``("adapter.safetensors", 0.5)``.

    Paths may contain ``:``; only a trailing ``:<decimal number>`` is a scale, and only when
    ``text`` is not itself an existing path. ``"a:b.safetensors"`` is a path, scale 1.0.
    """
    return parse_path_number(text, what="scale", code="LT520")


def _normalize_adapters(adapters) -> list[tuple[object, float]]:
    if isinstance(adapters, (str, os.PathLike)) or hasattr(adapters, "modules"):
        adapters = [adapters]
    out = []
    for item in adapters:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise OperationError(f"adapter entry {item!r} is not (adapter, scale)",
                                     code="LT520")
            src, scale = item
        else:
            src, scale = item, 1.0
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise OperationError(f"scale {scale!r} of adapter {src!r} is not a number",
                                 code="LT520") from None
        if not math.isfinite(scale):
            raise OperationError(f"scale {scale!r} of adapter {src!r} is not finite",
                                 code="LT520")
        out.append((os.fspath(src) if isinstance(src, (str, os.PathLike)) else src, scale))
    if not out:
        raise OperationError("no adapter given: pass at least one ADAPTER[:SCALE]",
                             code="LT520")
    return out


def _resolve_device(device: str) -> str:
    """``auto``: CUDA when torch sees a device, else the CPU; decided without importing
    torch when the machine has no NVIDIA driver at all (``_merge_numpy.cuda_may_exist``)."""
    from ._merge_numpy import cuda_may_exist
    if device not in DEVICE_CHOICES:
        raise OperationError(f"device {device!r} is not one of {', '.join(DEVICE_CHOICES)}",
                             code="LT521")
    if device == "cpu" or (device == "auto" and not cuda_may_exist()):
        return "cpu"
    import torch
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise OperationError("--device cuda was asked for but torch sees no CUDA device; use "
                             "--device cpu (exact, float64) or auto", code="LT521")
    if device == "auto":
        return "cuda" if cuda else "cpu"
    return device


# --- adapter identity ----------------------------------------------------------------------------

def adapter_identity(adapter) -> str:
    """The identity recorded in ``loratool.merged`` (spec/merge.md, "Adapter identity").

    sha256 of the canonical JSON ``{"modules": {name: {"kind", "layout", "scale"}},
    "tensor_hash": T}`` where T is the spec's integrity hash of the canonical tensors (the
    ``loratool.tensor_hash`` that ``save_adapter`` writes). The same adapter read from PEFT,
    kohya or loratool files has one identity: it depends on what is added, not on the file.
    """
    from ..interop.native import canonical_tensors
    from ..stfile import tensor_hash
    from ..tensors import st_dtype, to_bytes
    tensors = canonical_tensors(adapter)
    digest = tensor_hash((n, st_dtype(t), tuple(t.shape), to_bytes(t))
                         for n, t in tensors.items())
    modules = {n: {"kind": m.kind, "layout": m.layout, "scale": float(m.scale)}
               for n, m in adapter.modules.items()}
    doc = F.canonical_json({"modules": modules, "tensor_hash": digest})
    return "sha256:" + hashlib.sha256(doc.encode("ascii")).hexdigest()


# --- the plan: which base tensor gets which low-rank update --------------------------------------

@dataclass
class _Op:
    """One update of one base tensor, in the 2-D view ``W.reshape(W.shape[0], -1)``."""

    kind: str  # "lowrank" (W2 += s L @ R), "dora" (PEFT's DoRA merge), "vector" (bias += s v)
    scale: float
    adapter: int
    module: str
    L: object = None  # [rows, r]
    R: object = None  # [r, cols]
    magnitude: object = None  # [out] (DoRA)
    axis: int = 1  # DoRA: the norm runs along this axis of the 2-D view (1: rows are outputs)
    vec: object = None  # [n] (lora_bias)

    def cast(self, dtype, device=None) -> _Op:
        """The same op with contiguous tensors of ``dtype`` (exact for float64)."""
        def c(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()
        return replace(self, L=c(self.L), R=c(self.R), magnitude=c(self.magnitude),
                       vec=c(self.vec))


def _squeeze_tail(shape) -> tuple[int, ...]:
    shape = list(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _orientation(info, base_shape) -> str | None:
    """"rows" when the base's 2-D view is [out, in*k], "cols" when it is [in, out]; None when
    the base tensor's shape does not fit the module."""
    base_shape = tuple(base_shape)
    cols = info.transposed
    if base_shape == tuple(info.base_shape):
        return "cols" if cols else "rows"
    # A linear adapter on a 1x1 conv weight (or the reverse), as in Stable Diffusion's proj_in.
    if not cols and len(base_shape) >= 2 and _squeeze_tail(base_shape) == _squeeze_tail(
            info.base_shape):
        return "rows"
    return None


def _shape_hint(info, base_shape) -> str:
    want = list(info.base_shape)
    got = list(base_shape)
    text = (f"expects base shape {want} ({info.kind}, layout {info.layout}) but the base "
            f"tensor is {got}")
    if len(want) == 2 and got == want[::-1]:
        text += ("; the base stores the transpose: the adapter's layout is wrong for this base "
                 "(PEFT's fan_in_fan_out flag, GPT-2 Conv1D weights are [in, out])")
    return text


@dataclass
class _Loaded:
    source: str
    source_format: str
    adapter: object
    scale: float
    identity: str
    merged: int = 0
    skipped: int = 0


def _load(item, base: str, name_map, adapter_options: dict | None = None, *,
          numpy: bool = False):
    from ..adapter import load_adapter
    from ..interop import detect_format
    if numpy:  # a loratool file without DoRA (checked by the caller): no torch
        from ._merge_numpy import load_numpy
        return load_numpy(item), item, "loratool"
    if hasattr(item, "modules"):
        return item, "<in memory>", getattr(item, "source_format", "loratool")
    fmt = detect_format(item)
    # Foreign formats read names and layouts against the base (kohya names, PEFT's global
    # fan_in_fan_out flag); loratool files state both.
    # A module whose base tensor has another shape is listed with the others by _plan (LT411,
    # honouring --allow-missing), the same for every format.
    options = {} if fmt == "loratool" else {"base": base, "name_map": name_map or {},
                                            "defer_base_mismatch": True,
                                            **(adapter_options or {})}
    return load_adapter(item, **options), item, fmt


def _plan(loaded: list[_Loaded], base_tensors: dict, name_map, *, sign: float,
          allow_missing: bool, base_label: str):
    """base tensor name -> [ops]; plus the list of skipped (adapter, module, reason)."""
    from ..naming import resolve_modules
    plan: dict[str, list[_Op]] = {}
    problems: list[tuple[str, str, str]] = []
    keys = list(base_tensors)
    for ai, ld in enumerate(loaded):
        mapping, unmatched = resolve_modules(ld.adapter.modules, keys, name_map)
        for module in unmatched:
            problems.append((ai, module, f"has no target: no base tensor "
                                                f"`{module}.weight` (nor one ending in it)"))
        seen: dict[str, str] = {}
        for module, target in mapping.items():
            if target in seen:
                raise CheckpointError(
                    f"{ld.source}: modules `{seen[target]}` and `{module}` both resolve to "
                    f"base tensor `{target}.weight`; pass --map MODULE=BASE_PATH to say which "
                    "is which", code="LT416")
            seen[target] = module
            m = ld.adapter.modules[module]
            info = m.info
            wkey = target + ".weight"
            dtype, shape = base_tensors[wkey]
            orient = _orientation(info, shape)
            why = None
            if orient is None:
                why = _shape_hint(info, shape)
            elif dtype not in MERGEABLE_DTYPES:
                why = (f"base tensor `{wkey}` is {dtype}; merging needs F16, BF16, F32 or F64 "
                       "weights (dequantize the base first)")
            bkey = target + ".bias"
            if why is None and m.bias is not None:
                if bkey not in base_tensors:
                    why = (f"has lora_bias but the base has no `{bkey}` to add it to")
                elif tuple(base_tensors[bkey][1]) != (info.out_features,):
                    why = (f"lora_bias has shape [{info.out_features}] but base `{bkey}` is "
                           f"{list(base_tensors[bkey][1])}")
                elif base_tensors[bkey][0] not in MERGEABLE_DTYPES:
                    why = f"base tensor `{bkey}` is {base_tensors[bkey][0]}, not a float type"
            if why is not None:
                problems.append((ai, module, why))
                continue
            # Views of the adapter's own tensors; converted to float64 only while their base
            # tensor is merged, so memory does not grow with the adapter either.
            B2, A2 = m.factors()
            if orient == "rows":
                L, R, axis = B2, A2, 1
            else:
                L, R, axis = A2.T, B2.T, 0
            s = sign * ld.scale * m.scale
            if m.magnitude is not None:
                op = _Op("dora", s, ai, module, L, R, m.magnitude, axis)
            else:
                op = _Op("lowrank", s, ai, module, L, R)
            plan.setdefault(wkey, []).append(op)
            if m.bias is not None:
                plan.setdefault(bkey, []).append(_Op("vector", s, ai, module, vec=m.bias))
            ld.merged += 1
    if problems and not allow_missing:
        lines = [f"  {loaded[ai].source}: module `{mod}` {why}"
                 for ai, mod, why in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        raise CheckpointError(
            f"{len(problems)} adapter module(s) cannot be merged into {base_label}:\n"
            + "\n".join(lines) + "\nFix the names with --map OLD=NEW (a trailing '.' maps a "
            "prefix, e.g. --map base_model.model.=), or pass --allow-missing to skip these "
            "modules (they are listed in the report).", code="LT411")
    skipped = [{"adapter": loaded[ai].source, "module": mod, "reason": why}
               for ai, mod, why in problems]
    for ai, _, _ in problems:
        loaded[ai].skipped += 1
    return plan, skipped


# --- numerics ------------------------------------------------------------------------------------

def _check_finite(res, orig, name: str, ops) -> None:
    """Raise LT412 when ``res`` holds NaN/Inf where ``orig`` (the base) held finite values."""
    import torch
    if res.numel() == 0:
        return
    if math.isfinite(float(res.sum())):  # NaN and Inf reach the sum; overflow is re-checked
        return
    bad = int((~torch.isfinite(res) & torch.isfinite(orig.to(res.device))).sum())
    if bad:
        mods = sorted({op.module for op in ops})
        raise CheckpointError(
            f"merging into `{name}` produced {bad} NaN/Inf value(s) (modules "
            f"{', '.join(mods[:5])}): the adapter has huge or non-finite values or the scale "
            "is too large for the stored dtype; nothing was written", code="LT412")


def _apply_whole(w, ops) -> None:
    """Apply ``ops`` in order to ``w`` (a private float tensor, modified in place)."""
    import torch
    w2 = w.reshape(w.shape[0], -1) if w.ndim >= 2 else w
    w0 = w2.clone() if any(op.kind == "dora" for op in ops) else None

    for op in ops:  # ops already cast to w's dtype and device
        if op.kind == "vector":
            w2.add_(op.vec, alpha=op.scale)
        elif op.kind == "lowrank":
            w2.addmm_(op.L, op.R, alpha=op.scale)
        else:  # DoRA, as PEFT merges it: m / ||W0 + dW|| (per output) * (W + dW)
            delta = torch.mm(op.L, op.R).mul_(op.scale)
            norm = torch.linalg.vector_norm(w0 + delta, dim=op.axis, keepdim=True)
            w2.add_(delta).mul_(op.magnitude.reshape(norm.shape) / norm)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _FastEngine:
    """float32 on a device (CUDA); the same code runs on the CPU in tests (``_precision``)."""

    precision = "fp32"
    _HOST_BUFFERS = 2  # pinned results: one being written while the next is copied back

    def __init__(self, device: str):
        import torch
        self.device = device
        self._dev = torch.device(device)
        self.pinned = self._dev.type == "cuda"
        self._hosts: queue.Queue = queue.Queue()
        self._made = 0

    def close(self) -> None:
        pass

    def _acquire_host(self, nbytes: int):
        import torch
        if self._made < self._HOST_BUFFERS and self._hosts.empty():
            self._made += 1
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            buf = self._hosts.get()  # released by the writer thread once written
        if buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def run(self, raw, dtype: str, shape, ops, out_dtype: str, name: str):
        """Raw bytes in (numpy or pinned torch uint8), (bytes, release) out, like the exact
        engine's ``run``."""
        import torch

        from ..tensors import TORCH_DTYPES, to_bytes
        if not isinstance(raw, torch.Tensor):
            raw = torch.from_numpy(raw)
        n = math.prod(shape) * _size(dtype)
        src = raw[:n].view(TORCH_DTYPES[dtype]).view(tuple(shape))
        res, release = self._run(src, ops, TORCH_DTYPES[out_dtype], name)
        return to_bytes(res), release

    def _run(self, src, ops, out_dtype, name: str):
        import torch
        if src.numel() == 0:
            return src.to(out_dtype), None
        compute = torch.float64 if torch.float64 in (src.dtype, out_dtype) else torch.float32
        w = src.to(self._dev, non_blocking=True)
        # A private copy: the source buffer must stay intact for the NaN check.
        w = w.to(compute, copy=w.data_ptr() == src.data_ptr())
        _apply_whole(w, [op.cast(compute, self._dev) for op in ops])
        res = w.to(out_dtype)
        release = None
        if self._dev.type != "cpu":
            buf = self._acquire_host(res.numel() * res.element_size())
            host = buf[: res.numel() * res.element_size()].view(out_dtype).view(res.shape)
            host.copy_(res, non_blocking=True)
            torch.cuda.synchronize(self._dev)  # also orders the upload from ``src`` before reuse
            res = host

            def release(buf=buf):
                self._hosts.put(buf)
        try:
            _check_finite(res, src, name, ops)
        except BaseException:
            if release is not None:
                release()
            raise
        return res, release


# --- streaming -----------------------------------------------------------------------------------

class _Prefetcher:
    """Reads the tensors to merge, in order, into a pool of reused buffers on a thread."""

    def __init__(self, source, tensors, *, pinned: bool, buffers: int = 2):
        import numpy as np
        self._tensors = list(tensors)
        size = max((t.nbytes for t in self._tensors), default=0)
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        for _ in range(min(buffers, len(self._tensors))):
            if pinned:  # page-locked host memory for the CUDA engine's uploads
                import torch
                self._free.put(torch.empty(size, dtype=torch.uint8, pin_memory=True))
            else:
                self._free.put(np.empty(size, dtype=np.uint8))
        self._stop = threading.Event()
        self._source = source
        self._thread = None
        if self._tensors:
            self._thread = threading.Thread(target=self._run, name="loratool-read", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import numpy as np
        try:
            for t in self._tensors:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return
                self._source.read_into(t, (buf if isinstance(buf, np.ndarray)
                                           else buf.numpy())[: t.nbytes])
                self._ready.put((t.name, buf))
        except BaseException as e:  # handed to the main thread, raised there
            self._ready.put((None, e))

    def take(self, name: str):
        got, buf = self._ready.get()
        if got is None:
            raise buf
        assert got == name, (got, name)
        return buf

    def give_back(self, buf) -> None:
        self._free.put(buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._free.put(None)
        if self._thread is not None:
            self._thread.join()
        return False


class _WriteThread:
    """Writes (or kernel-copies) tensors in output order on its own thread, so that writing
    tensor i overlaps merging tensor i+1 and reading tensor i+2; after each write it calls the
    item's release callbacks (returning its buffers to the reader or the engine)."""

    def __init__(self, writer):
        self._writer = writer
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loratool-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            kind, a, b, releases = item
            try:
                if self._error is None:
                    if kind == "copy":
                        a.copy_raw(b, self._writer)
                    else:
                        self._writer.write(a, b)
            except BaseException as e:  # raised in the main thread by check()/finish()
                self._error = e
            finally:
                for release in releases:  # always: buffers go back even after an error
                    if release is None:
                        continue
                    try:
                        release()
                    except BaseException as e:  # a failing progress callback, say
                        if self._error is None:
                            self._error = e

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def copy(self, source, t, *releases) -> None:
        self.check()
        self._q.put(("copy", source, t, releases))

    def write(self, name: str, data, *releases) -> None:
        self.check()
        self._q.put(("write", name, data, releases))

    def finish(self) -> None:
        self._q.put(None)
        self._thread.join()
        self.check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        return False


@dataclass
class _Counts:
    merged: int = 0
    converted: int = 0
    copied: int = 0
    read: int = 0
    written: int = 0


def _stream_file(source, dest: str, plan: dict, out_dtype: str | None, metadata: dict,
                 engine, counts: _Counts, *, overwrite: bool, fsync: bool, tick) -> None:
    """Write ``source`` merged by ``plan`` to ``dest`` (safetensors), tensor by tensor: a
    reader thread, the merge on this thread, a writer thread, each on its own tensor."""
    from ..stfile import DTYPE_SIZES

    def target_dtype(t):
        if out_dtype is not None and t.dtype in MERGEABLE_DTYPES:
            return out_dtype
        return t.dtype

    entries = [(t.name, target_dtype(t), t.shape) for t in source.tensors]
    work = [t for t in source.tensors if t.name in plan or target_dtype(t) != t.dtype]
    with StreamWriter(dest, entries, metadata, overwrite=overwrite, fsync=fsync) as writer, \
            _Prefetcher(source, work, pinned=engine.pinned, buffers=3) as reader, \
            _WriteThread(writer) as out:
        for t in source.tensors:
            dt = target_dtype(t)
            done = functools.partial(tick, t.nbytes)  # progress counts written bytes
            if t.name not in plan and dt == t.dtype:
                out.copy(source, t, done)
                counts.copied += 1
            else:
                buf = reader.take(t.name)
                try:
                    res, release = engine.run(buf, t.dtype, tuple(t.shape),
                                              plan.get(t.name, ()), dt, t.name)
                except BaseException:
                    reader.give_back(buf)
                    raise
                out.write(t.name, res, release,
                          lambda buf=buf: reader.give_back(buf), done)
                if t.name in plan:
                    counts.merged += 1
                else:
                    counts.converted += 1
            counts.read += t.nbytes
            counts.written += math.prod(t.shape) * DTYPE_SIZES[dt]
        out.finish()
        writer.commit()


@contextmanager
def _compute_threads(engine):
    """Closes the engine (its worker pool) however the streaming ends."""
    try:
        yield
    finally:
        engine.close()


# --- the report ----------------------------------------------------------------------------------

@dataclass
class MergeReport:
    """What ``merge``/``unmerge`` did; ``to_dict()`` is the CLI's ``--json``."""

    operation: str
    base: str
    output: str
    output_format: str
    device: str
    precision: str
    dtype: str
    adapters: list[dict]
    modules_merged: int
    tensors_merged: int
    tensors_converted: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float  # the whole call: loading adapters (and torch), planning, streaming
    stream_seconds: float  # reading, merging and writing the tensors
    skipped: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- merge / unmerge -----------------------------------------------------------------------------

def merge(base, adapters, *, output=None, device: str = "auto", dtype: str = "keep",
          name_map=None, allow_missing: bool = False, overwrite: bool = False,
          fsync: bool = False, progress=None, output_format: str | None = None,
          adapter_options: dict | None = None, _precision: str | None = None,
          _numpy: bool | None = None) -> MergeReport:
    """Merge adapters into a base checkpoint and write a new checkpoint (never the input).

    ``adapters`` is a list of ``(path_or_Adapter, scale)`` pairs (a bare path or Adapter means
    scale 1.0). ``base`` is a ``.safetensors`` file, a sharded Hugging Face directory or a
    ``.pt``/``.bin`` state dict. ``adapter_options`` supplies what foreign adapter files do
    not store (``alpha``, ``enable_lora``, ``fan_in_fan_out``, ``allow_unknown``).
    ``progress(advance_bytes, total_bytes)`` is called as each tensor has been written (from
    the writer thread).

    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "merged.safetensors")
    >>> merge("examples/base.safetensors", [("examples/adapter.safetensors", 0.8)],
    ...       output=out).modules_merged
    8
    """
    return _run("merge", base, adapters, output=output, device=device, dtype=dtype,
                name_map=name_map, allow_missing=allow_missing, overwrite=overwrite,
                fsync=fsync, progress=progress, output_format=output_format, force=False,
                adapter_options=adapter_options, precision=_precision,
                use_numpy=_numpy)


def unmerge(merged, adapters, *, output=None, device: str = "auto", dtype: str = "keep",
            name_map=None, allow_missing: bool = False, overwrite: bool = False,
            fsync: bool = False, progress=None, output_format: str | None = None,
            force: bool = False, adapter_options: dict | None = None,
            _precision: str | None = None, _numpy: bool | None = None) -> MergeReport:
    """Subtract adapters merged earlier (the inverse of ``merge``); checks each adapter and
    scale against the checkpoint's ``loratool.merged`` record unless ``force``.

    >>> import os, tempfile
    >>> merged = os.path.join(tempfile.mkdtemp(), "merged.safetensors")
    >>> _ = merge("examples/base.safetensors", [("examples/adapter.safetensors", 0.8)],
    ...           output=merged)
    >>> os.path.basename(unmerge(merged, [("examples/adapter.safetensors", 0.8)]).output)
    'merged-unmerged.safetensors'
    """
    return _run("unmerge", merged, adapters, output=output, device=device, dtype=dtype,
                name_map=name_map, allow_missing=allow_missing, overwrite=overwrite,
                fsync=fsync, progress=progress, output_format=output_format, force=force,
                adapter_options=adapter_options, precision=_precision,
                use_numpy=_numpy)


def _output_format(kind: str, output: str | None, output_format: str | None) -> str:
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise OperationError(f"output format {output_format!r} is not one of "
                             f"{', '.join(OUTPUT_FORMATS)}", code="LT522")
    if kind == KIND_SHARDED:
        if output_format is not None or (output and output.lower().endswith(
                (".safetensors", *PICKLE_SUFFIXES))):
            raise OperationError("a sharded checkpoint is written as a sharded directory "
                                 "with the same layout; give -o a directory name and no "
                                 "--output-format", code="LT522")
        return "sharded"
    by_suffix = None
    if output:
        low = output.lower()
        by_suffix = ("pt" if low.endswith(PICKLE_SUFFIXES)
                     else "safetensors" if low.endswith(".safetensors") else None)
    if output_format and by_suffix and output_format != by_suffix:
        raise OperationError(f"--output-format {output_format} contradicts the suffix of "
                             f"{output}", code="LT522")
    return output_format or by_suffix or ("pt" if kind == KIND_PICKLE else "safetensors")


def _default_output(base: str, kind: str, fmt: str, suffix: str) -> str:
    if kind == KIND_SHARDED:
        root = base if os.path.isdir(base) else os.path.dirname(os.path.abspath(base))
        return os.path.normpath(root) + suffix
    stem, ext = os.path.splitext(base)
    if fmt == "safetensors":
        ext = ".safetensors"
    elif kind != KIND_PICKLE:
        ext = ".pt"
    return stem + suffix + ext


def _adapter_record(ld: _Loaded) -> dict:
    mods = ld.adapter.modules.values()
    return {"identity": ld.identity, "scale": ld.scale,
            "source": os.path.basename(ld.source) if ld.source != "<in memory>" else ld.source,
            "source_format": ld.source_format, "modules": ld.merged,
            "dora": any(m.magnitude is not None for m in mods),
            "lora_bias": any(m.bias is not None for m in mods)}


def _new_record(op: str, loaded, device: str, precision: str, dtype: str) -> dict:
    return {"op": op, "adapters": [_adapter_record(ld) for ld in loaded], "device": device,
            "precision": precision, "dtype": dtype, "loratool_version": __version__,
            "format_version": F.FORMAT_VERSION_STR}


def _match_unmerge(records: list[dict], loaded, *, force: bool, path: str):
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


def _run(op, base, adapters, *, output, device, dtype, name_map, allow_missing, overwrite,
         fsync, progress, output_format, force, precision,
         adapter_options=None, use_numpy=None) -> MergeReport:
    from ..naming import parse_map
    t0 = time.perf_counter()
    base = os.fspath(base)
    if not os.path.exists(base):
        raise CheckpointError(f"base checkpoint {base} does not exist", code="LT401")
    if dtype not in DTYPE_CHOICES:
        raise OperationError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}",
                             code="LT522")
    items = _normalize_adapters(adapters)
    if isinstance(name_map, (list, tuple)):
        name_map = parse_map(name_map)
    kind = checkpoint_kind(base)
    fmt = _output_format(kind, os.fspath(output) if output is not None else None,
                         output_format)
    dest = os.fspath(output) if output is not None else _default_output(
        base, kind, fmt, "-merged" if op == "merge" else "-unmerged")
    base_root = (base if os.path.isdir(base) else os.path.dirname(os.path.abspath(base))) \
        if kind == KIND_SHARDED else base
    inputs = [base, base_root] + [src for src, _ in items if isinstance(src, str)]
    check_destination(dest, overwrite=overwrite, inputs=inputs)
    if fmt == "pt":
        check_destination(sidecar_path(dest), overwrite=True, inputs=inputs)
    device = _resolve_device(device)
    if precision is None:
        precision = "fp64" if device == "cpu" else "fp32"
    from ._merge_numpy import NumpyExactEngine, header_allows_numpy
    engine = NumpyExactEngine() if precision == "fp64" else _FastEngine(device)
    # Loading the adapters as numpy arrays (no torch) when the engine is the exact one and
    # every adapter is a loratool file without DoRA; the engine, and so every output byte,
    # is the same either way.
    if use_numpy is None:
        use_numpy = precision == "fp64" and all(
            isinstance(src, str) and header_allows_numpy(src) for src, _ in items)
    elif use_numpy and not (precision == "fp64" and all(
            isinstance(src, str) and header_allows_numpy(src) for src, _ in items)):
        raise OperationError("_numpy=True needs the exact CPU path and loratool-format "
                             "adapter files without DoRA", code="LT522")

    # The base: names, dtypes and shapes (headers only for safetensors).
    source = None
    try:
        if kind == KIND_SHARDED:
            base_tensors = {n: (t.dtype, t.shape) for n, t in list_tensors(base).items()}
            from ..checkpoint import checkpoint_metadata
            metadata = checkpoint_metadata(base)
        else:
            source = open_source(base)
            base_tensors = {t.name: (t.dtype, t.shape) for t in source.tensors}
            metadata = dict(source.metadata)
        records = merge_records(metadata, path=base)

        loaded = []
        for src, scale in items:
            adapter, label, sfmt = _load(src, base, name_map, adapter_options,
                                         numpy=use_numpy)
            identity = adapter.identity if use_numpy else adapter_identity(adapter)
            loaded.append(_Loaded(label, sfmt, adapter, scale, identity))
        if op == "unmerge":
            dora = [f"{ld.source}: {m}" for ld in loaded
                    for m, mod in ld.adapter.modules.items() if mod.magnitude is not None]
            if dora:
                more = f" ({len(dora) - 5} more)" if len(dora) > 5 else ""
                raise CheckpointError(
                    f"cannot unmerge DoRA modules ({len(dora)}: " + ", ".join(dora[:5]) + more
                    + "): a DoRA merge "
                    "rescales each output row by magnitude / ||W0 + dW||, a norm of the "
                    "original weight W0 that the merged file no longer holds, so the merge "
                    "cannot be inverted from the files. Keep the base checkpoint instead.",
                    code="LT414")
        residual_notes = []
        if op == "merge":
            from ._residual import check_residual, init_of
            residual_notes = check_residual(
                [(ld.source, init_of(ld.source, ld.adapter)) for ld in loaded],
                bool((adapter_options or {}).get("base_is_residual")))
        from ._tied import tied_names
        tied_map, tied_notes = tied_names(base, base_tensors, loaded, name_map)
        residual_notes += tied_notes
        plan, skipped = _plan(loaded, base_tensors, {**tied_map, **(name_map or {})},
                              sign=1.0 if op == "merge" else -1.0,
                              allow_missing=allow_missing, base_label=base)
        notes = list(residual_notes)
        if op == "merge":
            records = records + [_new_record("merge", loaded, device, precision, dtype)]
        else:
            records, unmatched = _match_unmerge(records, loaded, force=force, path=base)
            if unmatched:
                records.append(_new_record("unmerge", unmatched, device, precision, dtype))
                notes.append("forced: " + ", ".join(ld.source for ld in unmatched)
                             + " did not match the merge record; recorded as an unmerge")
        metadata = {k: v for k, v in metadata.items() if k != F.KEY_MERGED}
        if records:
            metadata[F.KEY_MERGED] = F.canonical_json(records)

        total = sum(math.prod(s) * _size(d) for d, s in base_tensors.values())

        def tick(n: int) -> None:
            if progress is not None:
                progress(n, total)

        counts = _Counts()
        out_dtype = DTYPE_CHOICES[dtype]
        kw = dict(overwrite=overwrite, fsync=fsync, tick=tick)
        t_stream = time.perf_counter()
        with _compute_threads(engine):
            if kind == KIND_SHARDED:
                _write_sharded(base, dest, plan, out_dtype, metadata, engine, counts, **kw)
            elif fmt == "safetensors":
                _stream_file(source, dest, plan, out_dtype, metadata, engine, counts, **kw)
            else:
                _write_pickle(source, dest, plan, out_dtype, metadata, engine, counts, **kw)
        t_stream = time.perf_counter() - t_stream
    finally:
        if source is not None:
            source.close()
    return MergeReport(
        operation=op, base=base, output=dest, output_format=fmt, device=device,
        precision=precision, dtype=dtype,
        adapters=[dict(_adapter_record(ld), source=ld.source, skipped=ld.skipped)
                  for ld in loaded],
        modules_merged=sum(ld.merged for ld in loaded), tensors_merged=counts.merged,
        tensors_converted=counts.converted, tensors_copied=counts.copied,
        bytes_read=counts.read, bytes_written=counts.written,
        seconds=round(time.perf_counter() - t0, 3), stream_seconds=round(t_stream, 3),
        skipped=skipped, records=records,
        notes=notes)


def _size(dtype: str) -> int:
    from ..stfile import DTYPE_SIZES
    return DTYPE_SIZES[dtype]


def _write_pickle(source, dest, plan, out_dtype, metadata, engine, counts, *, overwrite,
                  fsync, tick) -> None:
    """.pt output: stream into a scratch safetensors file beside ``dest``, then ``torch.save``
    its memory-mapped tensors (file-backed pages, not heap); metadata goes to the sidecar."""
    import tempfile
    parent = os.path.dirname(os.path.abspath(dest))
    fd, scratch = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".safetensors", dir=parent)
    os.close(fd)
    try:
        _stream_file(source, scratch, plan, out_dtype, {}, engine, counts, overwrite=True,
                     fsync=False, tick=tick)
        write_pickle_from_safetensors(scratch, dest, overwrite=overwrite, fsync=fsync)
        counts.written = os.path.getsize(dest)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    if metadata:
        write_sidecar(dest, metadata, overwrite=True, fsync=fsync)
    elif os.path.exists(sidecar_path(dest)):
        os.unlink(sidecar_path(dest))


def _write_sharded(base, dest, plan, out_dtype, metadata, engine, counts, *, overwrite, fsync,
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
                _stream_file(src, os.path.join(tmp, shard), plan, out_dtype, meta, engine,
                             counts, overwrite=False, fsync=fsync, tick=tick)
                total_size += counts.written - before
        new_index = dict(index)
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
            if os.path.isdir(src_path):
                shutil.copytree(src_path, os.path.join(tmp, entry), symlinks=True)
            else:
                shutil.copy2(src_path, os.path.join(tmp, entry))
