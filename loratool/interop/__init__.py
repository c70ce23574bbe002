"""Source formats: detection and the reader/writer registry.

Each format module provides ``read_info(path, options) -> AdapterInfo``,
``load(path, options) -> Adapter`` and ``save(adapter, path, options) -> list[str]`` (notes on
anything folded or approximated). ``loratool`` itself is one of the formats.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from ..errors import InteropError
from ..format import KEY_FORMAT


def _loratool_format():
    from .. import adapter as A
    return SimpleNamespace(
        name="loratool",
        read_info=lambda path, options: A.read_loratool_info(path),
        load=lambda path, options: A.load_loratool(
            path, check_values=options.get("check_values", True)),
        save=lambda adapter, path, options: (A.save_adapter(
            adapter, path, overwrite=options.get("overwrite", False)), [])[1],
    )


FORMATS = ("loratool", "peft", "kohya", "loralib")


def format_module(name: str):
    """The reader/writer of a format by name."""
    if name == "loratool":
        return _loratool_format()
    if name not in FORMATS:
        raise InteropError(f"unknown adapter format {name!r}; choose one of "
                           f"{', '.join(FORMATS)}", code="LT301")
    import importlib
    return importlib.import_module(f".{name}", __name__)


def detect_format(path: str) -> str:
    """Name of the format of ``path``, from its layout and header (never from tensor data)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            return "peft"
        raise InteropError(f"{path} is a directory without adapter_config.json; pass an "
                           "adapter file or a PEFT adapter directory", code="LT301")
    lower = path.lower()
    if lower.endswith((".pt", ".bin", ".pth", ".ckpt")):
        if os.path.exists(os.path.join(os.path.dirname(path) or ".", "adapter_config.json")):
            return "peft"
        return "loralib"
    from ..stfile import read_header
    header = read_header(path)
    if KEY_FORMAT in header.metadata:
        return "loratool"
    names = header.tensors.keys()
    if any(".lora_down." in n or n.endswith(".lora_down.weight") for n in names):
        return "kohya"
    if any(".lora_A." in n or ".lora_embedding_A" in n for n in names):
        return "peft"
    return "loratool"  # reading it reports what the loratool format is missing


def reader_for(path: str, options: dict):
    fmt = options.get("source_format") or detect_format(path)
    return format_module(fmt)
