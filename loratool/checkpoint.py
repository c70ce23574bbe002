"""Base checkpoints: a single .safetensors file, a Hugging Face sharded directory
(``model.safetensors.index.json`` + shards), or a ``.pt``/``.bin`` state dict.

``list_tensors`` describes a checkpoint without reading tensor data (for safetensors) so
that adapters can be matched against it cheaply.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

from .errors import CheckpointError, LoraToolError
from .guards import PICKLE_SUFFIXES, TooLarge, check_regular_file, read_capped

INDEX_NAMES = ("model.safetensors.index.json",)
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class BaseTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: str  # the file holding it
    offset: int | None = None  # where its bytes start in ``file`` (safetensors; None: pickle)


def find_index(path: str) -> str | None:
    if os.path.isdir(path):
        for name in INDEX_NAMES:
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return candidate
        return None
    return path if path.endswith(".index.json") else None


# A Hugging Face model directory without an index holds one of these (safetensors first, as
# transformers' from_pretrained prefers it).
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
_ADAPTER_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The file or index that a checkpoint path stands for.

    A directory with an index is itself (sharded); one with a single ``model.safetensors``
    (or ``pytorch_model.bin``) and no index is that file; a file is itself. Any other
    directory is refused (LT401), naming the checkpoints or adapters in its subfolders.
    """
    path = os.fspath(path)
    if not os.path.isdir(path) or find_index(path) is not None:
        return path
    for name in SINGLE_NAMES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"{path} is a directory without {INDEX_NAMES[0]} or "
                          f"{' or '.join(SINGLE_NAMES)}: not a Hugging Face checkpoint"
                          + subfolders_hint(path), code="LT401")


def subfolders_hint(path: str) -> str:
    """``"; it holds ..."`` naming subfolders that are checkpoints or adapters, or ``""``."""
    found = []
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return ""
    for entry in entries:
        sub = os.path.join(path, entry)
        if not os.path.isdir(sub):
            continue
        if any(os.path.exists(os.path.join(sub, n)) for n in _ADAPTER_MARKERS):
            found.append(f"{entry}/ (adapter)")
        elif find_index(sub) or any(os.path.isfile(os.path.join(sub, n)) for n in SINGLE_NAMES):
            found.append(f"{entry}/ (checkpoint)")
    if not found:
        return ""
    shown = ", ".join(found[:10]) + (f" ({len(found) - 10} more)" if len(found) > 10 else "")
    return f"; it holds {shown}: pass one of them"


def read_index(index_path: str) -> dict[str, str]:
    """tensor name -> shard path, with every shard inside the index's directory."""
    try:
        raw = read_capped(index_path, MAX_INDEX_BYTES)  # refuses FIFOs and devices
    except TooLarge:
        raise CheckpointError(f"index {index_path} is larger than {MAX_INDEX_BYTES} bytes",
                              code="LT402") from None
    except OSError as e:
        raise CheckpointError(f"cannot read index {index_path}: {e.strerror or e}",
                              code="LT402") from None
    try:
        index = json.loads(raw.decode("utf-8"))
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise CheckpointError(f"{index_path} is not a safetensors index (a JSON object with "
                              "a weight_map of tensor name -> shard file)", code="LT402") from None
    root = os.path.dirname(os.path.abspath(index_path))
    out = {}
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or os.path.isabs(shard) or os.sep in shard
                or "/" in shard or "\0" in shard or shard in ("", ".", "..")):
            raise CheckpointError(f"index entry {name!r} points to {shard!r}; shards must be "
                                  "plain file names in the index's directory", code="LT402")
        out[name] = os.path.join(root, shard)
    return out


def list_tensors(path: str | os.PathLike) -> dict[str, BaseTensor]:
    """Every tensor of a checkpoint with dtype and shape, in file order."""
    from .stfile import read_header
    path = resolve_checkpoint(path)
    index = find_index(path)
    if index is not None:
        shards: dict[str, list[str]] = {}
        for name, shard in read_index(index).items():
            shards.setdefault(shard, []).append(name)
        out = {}
        for shard in sorted(shards):
            if not os.path.exists(shard):
                raise CheckpointError(f"shard {shard} named by {index} does not exist",
                                      code="LT402")
            header = read_header(shard)
            for name, t in header.tensors.items():
                out[name] = BaseTensor(name, t.dtype, t.shape, shard,
                                       header.data_start + t.begin)
        return out
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory without {INDEX_NAMES[0]}", code="LT401")
    if path.lower().endswith(PICKLE_SUFFIXES):
        from .tensors import st_dtype
        state = load_pickle_state_dict(path)
        return {n: BaseTensor(n, st_dtype(t), tuple(t.shape), path) for n, t in state.items()}
    header = read_header(path)
    return {n: BaseTensor(n, t.dtype, t.shape, path, header.data_start + t.begin)
            for n, t in header.tensors.items()}


def load_pickle_state_dict(path: str) -> dict:
    """A ``.pt``/``.bin`` state dict, loaded with ``weights_only=True`` (never plain pickle).

    Memory-mapped where the file allows it (zip format). Accepts a flat dict of tensors or one
    nested under ``state_dict``/``model_state_dict``/``model`` (training checkpoints). Refuses
    torch older than 2.10, whose weights-only unpickler lacks known security fixes.
    """
    import torch

    check_regular_file(path)  # torch.load on a FIFO or /dev/zero would block or never end
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 10):
        raise CheckpointError(f"torch {torch.__version__} is too old to load {path} safely; "
                              "loading .pt/.bin needs torch 2.10 or later", code="LT403")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (pre-zip) files cannot be mapped; still weights-only.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses code, classes, globals
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"cannot load {path} as a weights-only state dict (loratool never "
                              f"runs pickled code): {why}", code="LT403") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a state dict of name -> tensor", code="LT403")
    return obj


# --- streaming: sources and writer ------------------------------------------------------------
#
# A merge reads each tensor of the base once, in file order, and writes the output in the same
# order: the header first (names, dtypes and shapes are known up front), then the bytes. Tensors
# that nothing changes are copied file-to-file by the kernel (``copy_file_range``) without
# passing through Python; the others are read into a reused buffer with positional reads
# (``os.preadv``), so that a prefetch thread can read while the main thread computes. We never
# go through ``safe_open``: adding in place into its mmap'd tensors keeps copy-on-write pages
# alive until the file closes, which is exactly the memory a streaming merge must not hold.

KIND_SAFETENSORS = "safetensors"
KIND_SHARDED = "sharded"
KIND_PICKLE = "pickle"
SIDECAR_SUFFIX = ".loratool.json"  # metadata of a .pt/.bin checkpoint lives beside it
_COPY_CHUNK = 1 << 26
# An unchanged tensor is copied in parts of this size, so that the writer thread can write
# each merged tensor as soon as it is ready between two parts (streaming._WriteThread).
COPY_STEP = 1 << 25


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"sharded"`` (directory or ``*.index.json``), ``"pickle"`` (.pt/.bin/...) or
    ``"safetensors"`` (a single-file model directory is its file: ``resolve_checkpoint``);
    raises LT401 for a directory that is neither."""
    path = resolve_checkpoint(path)
    if find_index(path) is not None:
        return KIND_SHARDED
    if path.lower().endswith(PICKLE_SUFFIXES):
        return KIND_PICKLE
    return KIND_SAFETENSORS


def read_index_json(index_path: str) -> dict:
    """The raw index JSON (``metadata`` and ``weight_map``), checked by ``read_index``."""
    read_index(index_path)
    with open(index_path, encoding="utf-8") as f:
        return json.load(f)


def shard_order(index_path: str) -> list[str]:
    """Shard file names of an index, in order of first appearance in its weight_map."""
    seen: dict[str, None] = {}
    for shard in read_index(index_path).values():
        seen.setdefault(os.path.basename(shard), None)
    return list(seen)


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    nbytes: int


class SafetensorsSource:
    """Positional, thread-safe reads of one safetensors file (our own checked header)."""

    kind = KIND_SAFETENSORS

    def __init__(self, path: str | os.PathLike):
        from .stfile import read_header
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        self.metadata = dict(self.header.metadata)
        self.tensors = [SourceTensor(t.name, t.dtype, t.shape, t.nbytes)
                        for t in self.header.tensors.values()]
        self.tied = recorded_ties(self.metadata, self.header.tensors)
        self._fd = os.open(self.path, os.O_RDONLY)

    def _offset(self, t: SourceTensor) -> int:
        return self.header.data_start + self.header.tensors[t.name].begin

    def read_into(self, t: SourceTensor, out) -> None:
        """Fill ``out`` (a writable buffer of ``t.nbytes`` bytes) with the tensor's bytes."""
        mv = memoryview(out).cast("B")
        done, offset = 0, self._offset(t)
        while done < t.nbytes:
            n = os.preadv(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"tensor {t.name!r}: file ended early (truncated or "
                                      "changed while reading)", code="LT401", path=self.path)
            done += n

    def copy_steps(self, t: SourceTensor, writer: StreamWriter, step: int | None = None):
        """Copy the tensor's bytes to ``writer`` unchanged, file to file, one part of ``step``
        bytes (default ``COPY_STEP``) per iteration."""
        step = step or COPY_STEP
        offset = self._offset(t)
        for start in range(0, max(t.nbytes, 1), step):
            writer.copy_from_fd(t.name, self._fd, offset, t.nbytes, start,
                                min(t.nbytes, start + step))
            yield

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class StateDictSource:
    """A ``.pt``/``.bin`` state dict loaded weights-only and memory-mapped (file-backed pages)."""

    kind = KIND_PICKLE

    def __init__(self, path: str | os.PathLike):
        from .tensors import st_dtype
        self.path = os.fspath(path)
        self.state = load_pickle_state_dict(self.path)
        self.metadata = read_sidecar(self.path)
        from .stfile import DTYPE_SIZES
        self.tensors = []
        for name, t in self.state.items():
            dtype = st_dtype(t)
            self.tensors.append(SourceTensor(name, dtype, tuple(t.shape),
                                             t.numel() * DTYPE_SIZES[dtype]))

        self.tied = tied_groups(self.state)

    def _bytes(self, t: SourceTensor):
        from .tensors import to_bytes
        return to_bytes(self.state[t.name])

    def read_into(self, t: SourceTensor, out) -> None:
        memoryview(out).cast("B")[: t.nbytes] = self._bytes(t)

    def copy_steps(self, t: SourceTensor, writer: StreamWriter, step: int | None = None):
        writer.write(t.name, self._bytes(t))  # already in memory: one step
        yield

    def close(self) -> None:
        self.state = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# A safetensors file cannot share storage: a merge of a tied .pt base into one records the
# groups here (JSON list of lists of names), so that unmerge and later merges keep them tied.
TIED_KEY = "loratool.tied"


def recorded_ties(metadata: dict, tensors: dict) -> list[list[str]]:
    """The ``loratool.tied`` groups of a safetensors file's metadata whose names exist with
    one dtype and shape; anything malformed is ignored (the tensors are then independent)."""
    raw = metadata.get(TIED_KEY)
    if raw is None:
        return []
    try:
        groups = json.loads(raw)
    except ValueError:
        return []
    out = []
    for g in groups if isinstance(groups, list) else []:
        if (isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) and n in tensors
                                                       for n in g)
                and len({(tensors[n].dtype, tuple(tensors[n].shape)) for n in g}) == 1):
            out.append(g)
    return out


def tied_groups(state: dict) -> list[list[str]]:
    """Names of a state dict that are one tensor: the same view (offset, shape, strides,
    dtype) of one storage, as ``torch.save`` keeps tied weights (GPT-2's ``lm_head.weight``
    and ``transformer.wte.weight``). Groups of two or more, each in state-dict order."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def open_source(path: str | os.PathLike):
    """A streaming source for one file: safetensors or a pickle state dict."""
    path = resolve_checkpoint(path)
    if checkpoint_kind(path) == KIND_PICKLE:
        return StateDictSource(path)
    return SafetensorsSource(path)


@functools.lru_cache(maxsize=None)
def _writer_class():
    from .errors import ContainerError
    from .stfile import SafetensorsWriter

    class _StreamWriter(SafetensorsWriter):
        """Writes each tensor at its offset, in any order (the header fixes them all): the
        merge writes a merged tensor as soon as it is ready and copies the unchanged ones
        when it has nothing else to write, so the engine never waits behind a long copy."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            try:
                self._f.flush()  # the header; from here on, positional writes only
                self._data = self._f.tell()
            except BaseException as e:
                self.__exit__(type(e), e, e.__traceback__)
                raise
            self._fd = self._f.fileno()
            self._byname = {info.name: info for info in self._infos}
            self._left = {info.name: info.nbytes for info in self._infos}  # bytes to write

        def _info(self, name: str, nbytes: int):
            info = self._byname.get(name)
            if info is None:
                raise ContainerError(f"tensor {name!r} is not in the output's header",
                                     code="LT008")
            if nbytes != info.nbytes:
                raise ContainerError(f"tensor {name!r}: {nbytes} bytes given, header "
                                     f"declares {info.nbytes}", code="LT007")
            return info

        def write(self, name: str, data) -> None:
            mv = memoryview(data).cast("B")
            info = self._info(name, mv.nbytes)
            if self._left[name] != info.nbytes and info.nbytes:
                raise ContainerError(f"tensor {name!r} written twice", code="LT008")
            self._f.pwrite(mv, self._data + info.begin)
            self._left[name] = 0

        def copy_from_fd(self, name: str, fd: int, offset: int, nbytes: int,
                         start: int = 0, stop: int | None = None) -> None:
            """Write bytes ``start:stop`` of tensor ``name`` (``nbytes`` raw bytes of ``fd``
            from ``offset``), file to file in the kernel when it can (no user-space copy)."""
            info = self._info(name, nbytes)
            stop = nbytes if stop is None else stop
            done = start
            kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
            try:
                while kernel_copy is not None and done < stop:
                    n = kernel_copy(fd, self._fd, stop - done, offset + done,
                                    self._data + info.begin + done)
                    if n <= 0:
                        break
                    done += n
            except OSError:
                pass  # another filesystem or an old kernel: the plain loop below finishes
            while done < stop:
                data = os.pread(fd, min(_COPY_CHUNK, stop - done), offset + done)
                if not data:
                    raise CheckpointError(f"tensor {name!r}: source ended early", code="LT401")
                self._f.pwrite(data, self._data + info.begin + done)
                done += len(data)
            self._left[name] -= stop - start

        def commit(self) -> None:
            left = [n for n, k in self._left.items() if k]
            if left:
                raise ContainerError(f"{len(left)} of {len(self._infos)} tensors not written "
                                     f"(first: {left[0]!r})", code="LT008")
            self._next = len(self._infos)
            super().commit()

    return _StreamWriter


def StreamWriter(dest, entries, metadata=None, *, overwrite=False, fsync=False):  # noqa: N802
    """A safetensors writer (``stfile.SafetensorsWriter``'s temporary file and commit) that
    writes tensors at their offsets in any order: ``write(name, data)`` and
    ``copy_from_fd`` for unchanged tensors, in parts."""
    return _writer_class()(dest, entries, metadata, overwrite=overwrite, fsync=fsync)


def write_pickle_from_safetensors(src: str, dest: str, *, overwrite: bool = False,
                                  fsync: bool = False, tied=()) -> None:
    """Write the tensors of safetensors file ``src`` as a ``torch.save`` state dict at ``dest``
    (atomically). Tensors are memory-mapped from ``src``, so memory stays file-backed.
    ``tied``: groups of names saved as one tensor (shared storage), from the first name."""
    import mmap

    import torch

    from .atomic import AtomicFile
    from .stfile import read_header
    from .tensors import TORCH_DTYPES
    header = read_header(src)
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    try:
        state = {}
        for name, t in header.tensors.items():
            dtype = TORCH_DTYPES[t.dtype]
            if t.numel == 0:
                state[name] = torch.empty(t.shape, dtype=dtype)
                continue
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes,
                                   offset=header.data_start + t.begin)
            state[name] = raw.view(dtype).reshape(t.shape)
        for group in tied:
            for name in group[1:]:
                state[name] = state[group[0]]
        with AtomicFile(dest, overwrite=overwrite, fsync=fsync) as out:
            torch.save(state, out)
        state.clear()
        raw = None
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a tensor view is still referenced; the GC closes it later
                pass


def sidecar_path(path: str) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def read_sidecar(path: str) -> dict[str, str]:
    """Metadata stored beside a .pt/.bin checkpoint (``<file>.loratool.json``), or ``{}``."""
    side = sidecar_path(path)
    if not os.path.exists(side):
        return {}
    try:
        # a FIFO or device sidecar must not block or never end; TooLarge is a ValueError
        obj = json.loads(read_capped(side, MAX_INDEX_BYTES).decode("utf-8"))
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise ValueError
    except (ValueError, OSError, RecursionError, LoraToolError):
        raise CheckpointError(f"{side} is not a JSON object of string values (loratool "
                              "metadata of a .pt checkpoint)", code="LT402") from None
    return obj
