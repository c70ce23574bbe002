"""Row blocks of the tensors of a base and a tuned checkpoint, read in step.

Each tensor is viewed as a 2-D matrix ``[d0, d1 * d2 ...]`` (a conv weight as
``[out, in * prod(kernel)]``) and read ``rows`` at a time: safetensors tensors by positional
reads of just those bytes, ``.pt`` tensors as slices of the weights-only, memory-mapped state
dict. Nothing holds a whole checkpoint, and a big tensor is never held whole either: the
engine asks for blocks of at most ``block_elements`` elements.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ...checkpoint import (KIND_PICKLE, BaseTensor, checkpoint_kind, find_index, list_tensors,
                           open_source)
from ...errors import CheckpointError
from ...stfile import matrix_shape

# Elements per row block (per operand). 2^21 float64 values are 16 MiB: large enough that the
# GEMMs run at full speed, small enough that a block of each checkpoint, its difference and
# the products stay a few tens of MiB whatever the tensor.
BLOCK_ELEMENTS = 1 << 21


class Checkpoint:
    """One checkpoint (file, sharded directory or .pt): tensor list and row readers."""

    def __init__(self, path: str | os.PathLike):
        from ...checkpoint import resolve_checkpoint
        self.path = resolve_checkpoint(path)
        self.kind = checkpoint_kind(self.path)
        self.tensors: dict[str, BaseTensor] = list_tensors(self.path)
        self._sources: dict[str, object] = {}
        self._fds: dict[str, int] = {}
        self._buf = bytearray()

    def config_dir(self) -> str:
        """The directory where a Hugging Face ``config.json`` of this checkpoint would be."""
        if os.path.isdir(self.path):
            return self.path
        index = find_index(self.path)
        return os.path.dirname(os.path.abspath(index or self.path))

    def _source(self, file: str):
        if file not in self._sources:
            self._sources[file] = open_source(file)
        return self._sources[file]

    def rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` of tensor ``name`` as a 2-D torch tensor of its own dtype."""
        import torch

        from ...tensors import TORCH_DTYPES
        t = self.tensors[name]
        d0, cols = matrix_shape(t.shape)
        source = self._source(t.file)
        if getattr(source, "kind", None) == KIND_PICKLE:
            return source.state[name].reshape(d0, cols)[start:stop]
        info = source.header.tensors[name]
        item = info.nbytes // max(1, d0 * cols)
        nbytes = (stop - start) * cols * item
        if not nbytes:
            return torch.empty((stop - start, cols), dtype=TORCH_DTYPES[t.dtype])
        # One reused buffer per checkpoint: a fresh 10-MiB bytearray per block fragments the
        # C heap until RSS grows with the model. The returned tensor is valid until the next
        # call (callers convert it first).
        if len(self._buf) < nbytes:
            self._buf = bytearray(nbytes)  # a new one: views of the old may still be alive
        fd = self._fds.get(t.file)
        if fd is None:
            fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        offset = source.header.data_start + info.begin + start * cols * item
        mv, done = memoryview(self._buf)[:nbytes], 0
        while done < nbytes:
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"tensor {name!r}: file ended early (truncated or "
                                      "changed while reading)", code="LT401", path=t.file)
            done += n
        return torch.frombuffer(self._buf, dtype=torch.uint8, count=nbytes).view(
            TORCH_DTYPES[t.dtype]).reshape(stop - start, cols)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for source in self._sources.values():
            source.close()
        self._sources.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@dataclass
class Pair:
    """The same tensor in base and tuned, read in row blocks of at most ``BLOCK_ELEMENTS``
    elements (one row when a row is longer)."""

    name: str
    base: Checkpoint
    tuned: Checkpoint
    dtype: str
    shape: tuple[int, ...]
    scratch: object = None  # engine.Scratch shared by the tensors of one extract call

    @property
    def m(self) -> int:
        return matrix_shape(self.shape)[0]

    @property
    def n(self) -> int:
        return matrix_shape(self.shape)[1]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)

    def blocks(self):
        """``(start, stop)`` row ranges covering the matrix."""
        step = max(1, BLOCK_ELEMENTS // max(1, self.n))
        for start in range(0, self.m, step):
            yield start, min(self.m, start + step)

    def differs(self) -> bool:
        """Whether any byte of the two sides differs (a read of both, no arithmetic)."""
        return any(not self.read(start, stop)[2] for start, stop in self.blocks())

    def read(self, start: int, stop: int):
        """(base rows, tuned rows) in their own dtype, and whether their bytes are equal."""
        import torch
        b = self.base.rows(self.name, start, stop)
        t = self.tuned.rows(self.name, start, stop)
        same = torch.equal(_bits(b), _bits(t))
        return b, t, same


def _bits(x):
    """The raw bits of ``x`` as integers: byte equality, so -0.0 != 0.0 and NaN == same NaN."""
    import torch
    x = x.contiguous()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(ints.get(x.element_size(), torch.uint8))


def _nbytes(dtype: str, shape) -> int:
    from ...stfile import DTYPE_SIZES
    return math.prod(shape) * DTYPE_SIZES[dtype]
