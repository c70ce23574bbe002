"""Base checkpoints: a single .safetensors file, a Hugging Face sharded directory
(``model.safetensors.index.json`` + shards), or a ``.pt``/``.bin`` state dict.

``list_tensors`` describes a checkpoint without reading tensor data (for safetensors) so
that adapters can be matched against it cheaply.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import CheckpointError

INDEX_NAMES = ("model.safetensors.index.json",)
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class BaseTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: str  # the file holding it


def find_index(path: str) -> str | None:
    if os.path.isdir(path):
        for name in INDEX_NAMES:
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return candidate
        return None
    return path if path.endswith(".index.json") else None


def read_index(index_path: str) -> dict[str, str]:
    """tensor name -> shard path, with every shard inside the index's directory."""
    if os.path.getsize(index_path) > MAX_INDEX_BYTES:
        raise CheckpointError(f"index {index_path} is larger than {MAX_INDEX_BYTES} bytes",
                              code="LT402")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise CheckpointError(f"{index_path} is not a safetensors index (a JSON object with "
                              "a weight_map of tensor name -> shard file)", code="LT402") from None
    root = os.path.dirname(os.path.abspath(index_path))
    out = {}
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or os.path.isabs(shard) or os.sep in shard
                or "/" in shard or shard in ("", ".", "..")):
            raise CheckpointError(f"index entry {name!r} points to {shard!r}; shards must be "
                                  "plain file names in the index's directory", code="LT402")
        out[name] = os.path.join(root, shard)
    return out


def list_tensors(path: str | os.PathLike) -> dict[str, BaseTensor]:
    """Every tensor of a checkpoint with dtype and shape, in file order."""
    from .stfile import read_header
    path = os.fspath(path)
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
                out[name] = BaseTensor(name, t.dtype, t.shape, shard)
        return out
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory without {INDEX_NAMES[0]}", code="LT401")
    if path.lower().endswith(PICKLE_SUFFIXES):
        from .tensors import st_dtype
        state = load_pickle_state_dict(path)
        return {n: BaseTensor(n, st_dtype(t), tuple(t.shape), path) for n, t in state.items()}
    header = read_header(path)
    return {n: BaseTensor(n, t.dtype, t.shape, path) for n, t in header.tensors.items()}


def load_pickle_state_dict(path: str) -> dict:
    """A ``.pt``/``.bin`` state dict, loaded with ``weights_only=True`` (never plain pickle).

    Refuses torch older than 2.10, whose weights-only unpickler lacks known security fixes.
    """
    import torch
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 10):
        raise CheckpointError(f"torch {torch.__version__} is too old to load {path} safely; "
                              "loading .pt/.bin needs torch 2.10 or later", code="LT403")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the unpickler refuses anything but tensors and plain containers
        raise CheckpointError(f"cannot load {path} as a weights-only state dict: "
                              f"{str(e).splitlines()[0][:300]}", code="LT403") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a state dict of name -> tensor", code="LT403")
    return obj
