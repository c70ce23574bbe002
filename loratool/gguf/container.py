"""A hardened GGUF header reader (torch-free).

``gguf.GGUFReader`` trusts the file: a hostile count makes it allocate, a bad offset makes
numpy raise deep inside it. This reader checks every length against the bytes that remain
and against caps before it allocates anything, so a malformed file is a ``LoraToolError``
with a code (spec/gguf.md), never a traceback. Tensor data is handed out as read-only
``numpy.memmap`` views after the offsets were checked.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import InteropError
from . import codes as C
from ._dep import require_gguf

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Caps. Real files stay far below them (a 256k vocabulary is 256k strings of < 1 KiB).
MAX_KV = 65_536
MAX_TENSORS = 1_000_000
MAX_STRING = 64 << 20
MAX_ARRAY = 64 << 20
MAX_DIMS = 4
MAX_NAME = 65_535

# GGUF value types (gguf.GGUFValueType); the struct format of the scalar ones.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
T_STRING, T_ARRAY = 8, 9

SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class KV:
    """One metadata value: ``vtype`` (a GGUFValueType number), ``sub_type`` for arrays."""

    vtype: int
    value: object
    sub_type: int | None = None


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor info. ``ne`` is GGUF order (fastest dim first); ``shape`` is numpy order."""

    name: str
    ne: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # absolute, in the file
    nbytes: int
    path: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """numpy shape of the raw data: rows of ``ne[0]`` elements packed in blocks."""
        return (*reversed(self.ne[1:]), self.nbytes // max(1, math.prod(self.ne[1:])))


@dataclass
class GGUFHeader:
    path: str
    version: int
    kv: dict[str, KV]
    tensors: dict[str, GGUFTensor]  # in file order
    alignment: int
    data_offset: int
    file_size: int
    parts: list[str] = field(default_factory=list)  # split sets: every part, in order

    def get(self, key: str, default=None):
        kv = self.kv.get(key)
        return default if kv is None else kv.value


def _err(code: str, msg: str, path: str):
    return InteropError(msg, code=code, path=path)


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.end = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise _err(C.GGUF_TRUNCATED, f"{what} at byte {self.pos} needs {n} bytes but the "
                       f"file has {self.end - self.pos} left: truncated or corrupt", self.path)
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str, cap: int = MAX_STRING) -> str:
        n = self.u64(f"length of {what}")
        if n > cap:
            raise _err(C.GGUF_TRUNCATED, f"{what} claims {n} bytes (cap {cap})", self.path)
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(C.GGUF_BAD_KV, f"{what} is not UTF-8", self.path) from None

    def value(self, vtype: int, key: str, *, nested: bool = False):
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), key))[0]
        if vtype == T_STRING:
            return self.string(f"value of {key!r}")
        if vtype == T_ARRAY and not nested:
            sub = self.u32(f"array type of {key!r}")
            n = self.u64(f"array length of {key!r}")
            if n > MAX_ARRAY:
                raise _err(C.GGUF_TRUNCATED, f"array {key!r} claims {n} items (cap {MAX_ARRAY})",
                           self.path)
            if sub in _NUMPY:
                size = np.dtype(_NUMPY[sub]).itemsize
                data = np.frombuffer(self.take(n * size, f"array {key!r}"), dtype=_NUMPY[sub])
                return KV(T_ARRAY, data.astype(bool) if sub == 7 else data.copy(), sub)
            if sub == T_STRING:
                # each string takes >= 8 bytes, so n is bounded by the bytes left
                if n * 8 > self.end - self.pos:
                    raise _err(C.GGUF_TRUNCATED, f"array {key!r} claims {n} strings; the file "
                               "is too short", self.path)
                return KV(T_ARRAY, [self.string(f"item of {key!r}") for _ in range(n)], sub)
            what = "nested arrays are not supported" if sub == T_ARRAY else f"type {sub}"
            raise _err(C.GGUF_BAD_KV, f"array {key!r}: {what}", self.path)
        raise _err(C.GGUF_BAD_KV, f"key {key!r} has unknown value type {vtype}", self.path)


def _open_buffer(path: str):
    try:
        st = os.stat(path)
    except OSError as e:
        raise _err(C.NOT_GGUF, f"cannot read: {e.strerror or e}", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise _err(C.NOT_GGUF, "not a regular file", path)
    if st.st_size < 24:
        raise _err(C.NOT_GGUF, f"{st.st_size} bytes is too short for a GGUF header", path)
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), st.st_size


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and check one GGUF file's header (KV metadata and tensor infos); no tensor data.

    Raises ``InteropError`` with codes LT320-LT324 for anything malformed.
    """
    gguf = require_gguf()
    path = os.fspath(path)
    buf, size = _open_buffer(path)
    try:
        return _parse(gguf, buf, size, path)
    finally:
        buf.close()


def _parse(gguf, buf, size: int, path: str) -> GGUFHeader:
    cur = _Cursor(buf, path)
    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise _err(C.NOT_GGUF, f"not a GGUF file (magic {magic!r})", path)
    version = cur.u32("version")
    if version not in VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        why = ("big-endian GGUF files are not supported" if swapped in VERSIONS
               else f"GGUF version {version} is not supported (2 or 3)")
        raise _err(C.NOT_GGUF, why, path)
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise _err(C.GGUF_TRUNCATED, f"header claims {n_tensors} tensors and {n_kv} metadata "
                   f"keys (caps {MAX_TENSORS}, {MAX_KV})", path)
    kv: dict[str, KV] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", MAX_NAME)
        vtype = cur.u32(f"value type of {key!r}")
        v = cur.value(vtype, key)
        if key in kv:
            raise _err(C.GGUF_BAD_KV, f"metadata key {key!r} appears twice", path)
        kv[key] = v if isinstance(v, KV) else KV(vtype, v)
    alignment = kv.get("general.alignment", KV(4, DEFAULT_ALIGNMENT)).value
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > 1 << 20:
        raise _err(C.GGUF_BAD_KV, f"general.alignment {alignment!r} is not a power of two",
                   path)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", MAX_NAME)
        n_dims = cur.u32(f"dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _err(C.GGUF_BAD_TENSOR, f"tensor {name!r} has {n_dims} dims (1-4)", path)
        ne = tuple(cur.u64(f"dim of {name!r}") for _ in range(n_dims))
        infos.append((name, ne, cur.u32(f"type of {name!r}"), cur.u64(f"offset of {name!r}")))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, ttype, off in infos:
        tensors[name] = _check_tensor(gguf, name, ne, ttype, off, data_offset, alignment, size,
                                      path, tensors)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _err(C.GGUF_BAD_TENSOR, f"data of tensors {a!r} and {b!r} overlap", path)
    return GGUFHeader(path, version, kv, tensors, alignment, data_offset, size, [path])


def _check_tensor(gguf, name, ne, ttype, off, data_offset, alignment, size, path, seen):
    if name in seen:
        raise _err(C.GGUF_BAD_TENSOR, f"tensor {name!r} appears twice", path)
    try:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _err(C.GGUF_BAD_TENSOR, f"tensor {name!r} has unknown type {ttype}",
                   path) from None
    if any(d == 0 or d > 1 << 40 for d in ne):
        raise _err(C.GGUF_BAD_TENSOR, f"tensor {name!r} has dims {list(ne)}", path)
    if ne[0] % block:
        raise _err(C.GGUF_BAD_TENSOR, f"tensor {name!r}: row of {ne[0]} is not a multiple of "
                   f"the {qtype.name} block size {block}", path)
    nbytes = math.prod(ne) // block * tsize
    if off % alignment:
        raise _err(C.GGUF_BAD_TENSOR, f"tensor {name!r}: offset {off} is not aligned to "
                   f"{alignment}", path)
    start = data_offset + off
    if start + nbytes > size:
        raise _err(C.GGUF_TRUNCATED, f"tensor {name!r}: data [{start}, {start + nbytes}) lies "
                   f"past the end of the file ({size} bytes)", path)
    return GGUFTensor(name, ne, ttype, qtype.name, start, nbytes, path)


def tensor_data(t: GGUFTensor) -> np.ndarray:
    """Read-only memmap of a tensor's data: float arrays (numpy order) for F32/F16/F64, the
    raw ``uint8`` rows (``t.byte_shape``) for every block type, BF16 included."""
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2",
              "I32": "<i4", "I64": "<i8"}
    if t.type_name in dtypes:
        return np.memmap(t.path, dtype=dtypes[t.type_name], mode="r", offset=t.offset,
                         shape=t.shape)
    return np.memmap(t.path, dtype=np.uint8, mode="r", offset=t.offset, shape=t.byte_shape)


def split_parts(path: str) -> list[str] | None:
    """All parts of a split set ``NAME-0000i-of-0000N.gguf`` when ``path`` names one."""
    m = SPLIT_RE.match(os.path.basename(path))
    if not m:
        return None
    count = int(m["count"])
    if count < 1 or int(m["no"]) < 1 or int(m["no"]) > count:
        raise _err(C.GGUF_SPLIT, "split numbering is inconsistent", path)
    d = os.path.dirname(path)
    parts = [os.path.join(d, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf")
             for i in range(1, count + 1)]
    missing = [p for p in parts if not os.path.exists(p)]
    if missing:
        raise _err(C.GGUF_SPLIT, f"split set is missing {len(missing)} part(s): "
                   + ", ".join(os.path.basename(p) for p in missing[:5]), path)
    return parts


def read_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Header of a GGUF file or of a whole split set (given any of its parts).

    The metadata of a split set is the first part's, without the ``split.*`` keys; tensors
    are every part's, in order.
    """
    path = os.fspath(path)
    parts = split_parts(path)
    if parts is None:
        return read_gguf_header(path)
    heads = [read_gguf_header(p) for p in parts]
    first = heads[0]
    total = first.get("split.tensors.count")
    tensors: dict[str, GGUFTensor] = {}
    for i, h in enumerate(heads):
        if h.get("split.no") != i or h.get("split.count") != len(parts):
            raise _err(C.GGUF_SPLIT, f"split.no/split.count of part {i + 1} do not match its "
                       "file name", h.path)
        for name, t in h.tensors.items():
            if name in tensors:
                raise _err(C.GGUF_SPLIT, f"tensor {name!r} appears in two parts", h.path)
            tensors[name] = t
    if total != len(tensors):
        raise _err(C.GGUF_SPLIT, f"split.tensors.count is {total} but the parts hold "
                   f"{len(tensors)} tensors", path)
    kv = {k: v for k, v in first.kv.items() if not k.startswith("split.")}
    return GGUFHeader(first.path, first.version, kv, tensors, first.alignment,
                      first.data_offset, sum(h.file_size for h in heads), parts)
