"""The safetensors container: a hardened header parser, raw tensor reads, and a streaming writer.

We parse headers ourselves instead of trusting a library, because adapter files come from
strangers: every length, offset and shape is checked before a byte of data is touched, and a
header that claims terabytes allocates nothing. No torch import here (``inspect`` and
``validate`` must start fast); torch conversion lives in ``tensors.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Mapping

import numpy as np

from .atomic import AtomicFile
from .errors import ContainerError
from .format import MAX_HEADER_BYTES
from .guards import open_regular
from .numerics import as_float

# Bytes per element for the safetensors dtypes we can address. Sub-byte types (F4, F6) are
# refused: their sizes do not follow from the shape alone.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# numpy views of the raw bytes; BF16 has no numpy dtype and is read as its uint16 bit pattern.
NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "F8_E5M2": np.uint8, "F8_E4M3": np.uint8,
    "F8_E8M0": np.uint8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
    "BF16": np.uint16, "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64,
    "U64": np.uint64, "F64": np.float64, "C64": np.complex64,
}
MAX_NDIM = 16
MAX_JSON_DEPTH = 8  # a valid header nests 3 deep; anything deeper is hostile


def matrix_shape(shape) -> tuple[int, int]:
    """``[d0, d1, ...]`` viewed as a matrix: ``(d0, d1 * d2 * ...)``; a scalar is 1 x 1."""
    if not shape:
        return 1, 1
    return int(shape[0]), int(math.prod(shape[1:]))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a header; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """A parsed, checked safetensors header. ``tensors`` is in file (offset) order."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int
    header_size: int = 0


def _reject_duplicates(pairs):
    seen = dict(pairs)  # in C; a duplicate shows as fewer keys than pairs
    if len(seen) != len(pairs):
        keys = set()
        for key, _ in pairs:
            if key in keys:
                raise ContainerError(f"header has the key {key!r} twice; each tensor name and "
                                     "metadata key must appear once", code="LT004")
            keys.add(key)
    return seen


def parse_header_bytes(raw: bytes, *, path: str = "", data_size: int) -> tuple[dict, dict]:
    """Check the JSON header and return (metadata, tensors). Raises ContainerError."""
    if raw[:1] != b"{":
        raise ContainerError("header does not start with '{': not a safetensors file",
                             code="LT003", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContainerError(f"header is not valid UTF-8 ({e.reason} at byte {e.start})",
                             code="LT003", path=path) from None
    # Nesting is bounded before json recursion could blow the stack.
    if _nests_deeper(raw, MAX_JSON_DEPTH):
        raise ContainerError(f"header JSON nests deeper than {MAX_JSON_DEPTH} levels (or its "
                             "brackets do not match)", code="LT003", path=path)
    try:
        obj = json.loads(text.rstrip(" "), object_pairs_hook=_reject_duplicates)
    except ContainerError as e:
        e.path = path
        raise
    except (ValueError, RecursionError) as e:
        raise ContainerError(f"header is not valid JSON: {e}", code="LT003", path=path) from None
    if not isinstance(obj, dict):
        raise ContainerError("header JSON is not an object", code="LT003", path=path)

    metadata: dict[str, str] = {}
    raw_meta = obj.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise ContainerError("__metadata__ is not a JSON object of strings", code="LT005",
                                 path=path)
        for key, value in raw_meta.items():
            if not isinstance(value, str):
                raise ContainerError(
                    f"__metadata__ value of {key!r} is {type(value).__name__}, not a string; "
                    "safetensors metadata holds strings only (encode numbers and lists as "
                    "JSON text)", code="LT005", path=path)
            metadata[key] = value

    tensors: list[TensorInfo] = []
    for name, entry in obj.items():
        tensors.append(_tensor_entry(name, entry, path))
    tensors.sort(key=_BY_OFFSETS)
    cursor = 0
    for t in tensors:
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else "leaves a gap"
            raise ContainerError(
                f"tensor {t.name!r} starts at data offset {t.begin}, expected {cursor}: it "
                f"{what}; safetensors data must be contiguous without overlaps",
                code="LT008", path=path)
        cursor = t.end
    if cursor != data_size:
        raise ContainerError(
            f"tensors cover {cursor} bytes of data but the file holds {data_size} after the "
            "header: the file is truncated or has trailing bytes", code="LT008", path=path)
    return metadata, {t.name: t for t in tensors}


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# bytes.translate: "{" -> "[", "}" -> "]", and every other byte but brackets deleted.
_BRACKETS_ONLY = (bytes.maketrans(b"{}", b"[]"), bytes(set(range(256)) - set(b"[]{}")))


def _nests_deeper(raw: bytes, limit: int, chunk: int = 1 << 20) -> bool:
    """True if the JSON text nests arrays/objects deeper than ``limit`` levels.

    Strings are cut out and the brackets kept (regex and translate), then the running depth
    is a cumulative sum in numpy, a chunk at a time: linear in the header size and in C, so
    a 100 MB header is checked in about a second (a Python loop over its characters took
    over ten). Brackets that do not match make the header invalid JSON, which json.loads
    then reports.
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(*_BRACKETS_ONLY)
    depth = 0
    for start in range(0, len(brackets), chunk):
        part = np.frombuffer(brackets, np.uint8, min(chunk, len(brackets) - start), start)
        levels = np.cumsum(np.where(part == ord("["), 1, -1)) + depth
        if int(levels.max()) > limit:
            return True
        depth = int(levels[-1])
    return False


_INT = {int}
_BY_OFFSETS = operator.attrgetter("begin", "end")


def _tensor_entry(name: str, entry, path: str) -> TensorInfo:
    """The checked entry. One combined test first (a header has one entry per tensor: this
    is inspect's per-tensor cost); anything it does not pass goes through ``_checked_entry``,
    which applies the same rules one by one and names the one broken."""
    if type(entry) is dict:
        dtype, shape, off = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (type(dtype) is str and dtype in DTYPE_SIZES and type(shape) is list
                and len(shape) <= MAX_NDIM and type(off) is list and len(off) == 2
                and type(off[0]) is int and type(off[1]) is int
                and 0 <= off[0] <= off[1] < 2**63
                and (not shape or (set(map(type, shape)) == _INT and min(shape) >= 0
                                   and max(shape) < 2**63))
                and math.prod(shape) * DTYPE_SIZES[dtype] == off[1] - off[0]):
            return TensorInfo(name, dtype, tuple(shape), off[0], off[1])
    return _checked_entry(name, entry, path)


def _checked_entry(name: str, entry, path: str) -> TensorInfo:
    def bad(why: str, code: str = "LT006"):
        return ContainerError(f"tensor {name!r}: {why}", code=code, path=path)

    if not isinstance(entry, dict):
        raise bad("entry is not a JSON object with dtype, shape and data_offsets")
    missing = {"dtype", "shape", "data_offsets"} - entry.keys()
    if missing:
        raise bad(f"entry lacks {', '.join(sorted(missing))}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"dtype {dtype!r} is not a safetensors dtype loratool can read "
                  f"({', '.join(DTYPE_SIZES)})")
    # type(x) is int (not isinstance): JSON gives exact ints, and bool is no dimension
    if (type(shape) is not list or len(shape) > MAX_NDIM
            or (shape and not (set(map(type, shape)) == _INT and min(shape) >= 0
                               and max(shape) < 2**63))):
        raise bad(f"shape {shape!r} is not a list of at most {MAX_NDIM} non-negative integers")
    if (type(offsets) is not list or len(offsets) != 2
            or type(offsets[0]) is not int or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1] < 2**63):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end",
                  code="LT008")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]  # Python ints: no overflow
    if nbytes != offsets[1] - offsets[0]:
        raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
                  f"{offsets} span {offsets[1] - offsets[0]}", code="LT007")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: str | os.PathLike, *, max_header: int = MAX_HEADER_BYTES) -> Header:
    """Read and check the header of a safetensors file without reading tensor data."""
    path = os.fspath(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ContainerError(f"file is {size} bytes, too short for a safetensors "
                                     "header length", code="LT001", path=path)
            (n,) = struct.unpack("<Q", f.read(8))
            if n > max_header:
                raise ContainerError(f"header length {n} exceeds the {max_header}-byte cap",
                                     code="LT002", path=path)
            if 8 + n > size:
                raise ContainerError(f"header length {n} runs past the end of the "
                                     f"{size}-byte file: truncated", code="LT001", path=path)
            raw = f.read(n)
    except IsADirectoryError:
        raise ContainerError("is a directory, not a safetensors file", code="LT001",
                             path=path) from None
    except OSError as e:
        raise ContainerError(f"cannot read: {e.strerror or e}", code="LT001", path=path) from None
    metadata, tensors = _parse_once(raw, path, size - 8 - n)
    return Header(path, metadata, tensors, 8 + n, size, n)


# One command reads the same header several times (``inspect``: the merged-checkpoint probe,
# format detection, the reader; ``merge``: detection, the numpy loader's check, the reader).
# The parse is the cost (json + a check per tensor), the read is not: the last header parsed
# is kept, keyed by its exact bytes and data size, so a changed file is parsed again.
_MEMO_MAX_BYTES = 32 << 20
_parsed: tuple | None = None  # (raw, data size, metadata, tensors): replaced whole (threads)


def _parse_once(raw: bytes, path: str, data_size: int) -> tuple[dict, dict]:
    global _parsed
    hit = _parsed
    if hit is not None and hit[1] == data_size and hit[0] == raw:
        metadata, tensors = hit[2], hit[3]
    else:
        metadata, tensors = parse_header_bytes(raw, path=path, data_size=data_size)
        _parsed = (raw, data_size, metadata, tensors) if len(raw) <= _MEMO_MAX_BYTES else None
    return dict(metadata), dict(tensors)  # callers may change their dicts; TensorInfo is frozen


def read_bytes(header: Header, info: TensorInfo, f: BinaryIO | None = None) -> bytes:
    """The raw little-endian bytes of one tensor."""
    if f is None:
        with open(header.path, "rb") as fh:
            return read_bytes(header, info, fh)
    f.seek(header.data_start + info.begin)
    data = f.read(info.nbytes)
    if len(data) != info.nbytes:
        raise ContainerError(f"tensor {info.name!r}: file ended early (truncated while "
                             "reading)", code="LT001", path=header.path)
    return data


def read_numpy(header: Header, info: TensorInfo, f: BinaryIO | None = None) -> np.ndarray:
    """The tensor as a numpy array (BF16 as its uint16 bit pattern)."""
    data = read_bytes(header, info, f)
    return np.frombuffer(data, dtype=np.dtype(NUMPY_DTYPES[info.dtype]).newbyteorder("<")
                         ).reshape(info.shape)


def read_scalar(header: Header, info: TensorInfo) -> float:
    """The first (for a scalar: the only) value of a tensor as a Python float; BF16 exact."""
    return float(as_float(read_numpy(header, info), info.dtype).reshape(-1)[0].item())


def iter_chunks(header: Header, info: TensorInfo, f: BinaryIO, chunk: int = 1 << 24
                ) -> Iterator[np.ndarray]:
    """The tensor as flat numpy chunks of at most ``chunk`` bytes: bounded memory scans."""
    item = DTYPE_SIZES[info.dtype]
    chunk -= chunk % item
    dt = np.dtype(NUMPY_DTYPES[info.dtype]).newbyteorder("<")
    f.seek(header.data_start + info.begin)
    left = info.nbytes
    while left:
        data = f.read(min(chunk, left))
        if not data:
            raise ContainerError(f"tensor {info.name!r}: file ended early", code="LT001",
                                 path=header.path)
        left -= len(data)
        yield np.frombuffer(data, dtype=dt)


# --- writing -------------------------------------------------------------------------------

def build_header(entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None) -> tuple[bytes, list[TensorInfo]]:
    """Header bytes (length prefix included) for tensors laid out in the order given."""
    obj: dict = {}
    infos = []
    cursor = 0
    for name, dtype, shape in entries:
        if name in obj or name == "__metadata__":
            raise ContainerError(f"tensor name {name!r} given twice", code="LT004")
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        infos.append(TensorInfo(name, dtype, tuple(shape), cursor, cursor + n))
        cursor += n
    if metadata:
        obj["__metadata__"] = dict(metadata)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    raw = text.encode("ascii")
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors pads
    return struct.pack("<Q", len(raw)) + raw, infos


class SafetensorsWriter:
    """Streams a safetensors file: header first, then each tensor's bytes in the declared order.

    Writes go to a temporary file beside ``dest``, renamed into place by ``commit()``; leaving
    the ``with`` block without committing (an exception) removes the temporary file.
    """

    def __init__(self, dest: str | os.PathLike, entries, metadata=None, *,
                 overwrite: bool = False, fsync: bool = False):
        header, self._infos = build_header(entries, metadata)
        self._next = 0
        self._written = 0
        self._atomic = AtomicFile(dest, overwrite=overwrite, fsync=fsync)
        self._f = self._atomic.__enter__()
        try:
            self._f.write(header)
        except BaseException as e:  # e.g. a full disk: the temporary file must not stay
            self.__exit__(type(e), e, e.__traceback__)
            raise

    def __enter__(self):
        return self

    def write(self, name: str, data) -> None:
        info = self._infos[self._next]
        if name != info.name:
            raise ContainerError(f"tensor {name!r} written out of order; expected {info.name!r}",
                                 code="LT008")
        mv = memoryview(data).cast("B")
        if mv.nbytes != info.nbytes:
            raise ContainerError(f"tensor {name!r}: {mv.nbytes} bytes given, header declares "
                                 f"{info.nbytes}", code="LT007")
        self._f.write(mv)
        self._next += 1

    def commit(self) -> None:
        if self._next != len(self._infos):
            raise ContainerError(f"only {self._next} of {len(self._infos)} tensors written",
                                 code="LT008")
        self._atomic.__exit__(None, None, None)
        self._f = None

    def __exit__(self, exc_type, exc, tb):
        if self._f is not None:
            self._atomic.__exit__(exc_type or RuntimeError, exc, tb)
            self._f = None
        return False


class TensorHasher:
    """The spec's integrity hash (section "Integrity"), fed tensor by tensor in name order.

    For each tensor, sorted by name: UTF-8 name, NUL, dtype, NUL, shape as compact JSON, NUL,
    the byte length as 8-byte little-endian, then the raw little-endian bytes.
    """

    def __init__(self):
        self._h = hashlib.sha256()

    def begin(self, name: str, dtype: str, shape, nbytes: int) -> None:
        self._h.update(name.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0")
        self._h.update(json.dumps(list(shape), separators=(",", ":")).encode("ascii") + b"\0")
        self._h.update(struct.pack("<Q", nbytes))

    def update(self, data) -> None:
        self._h.update(memoryview(data).cast("B"))

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def tensor_hash(items: Iterable[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """Integrity hash of in-memory tensors given as (name, dtype, shape, bytes)."""
    h = TensorHasher()
    for name, dtype, shape, data in sorted(items, key=lambda it: it[0]):
        mv = memoryview(data).cast("B")
        h.begin(name, dtype, shape, mv.nbytes)
        h.update(mv)
    return h.hexdigest()
