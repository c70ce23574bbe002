"""Source formats: detection and the reader/writer registry.

Each format module provides ``read_info(path, options) -> AdapterInfo`` (header-level; no torch
for safetensors sources), ``load(path, options) -> Adapter``, ``load_report(path, options) ->
LoadResult`` (the adapter with notes and dropped tensors, for ``convert``), ``save(adapter,
path, options) -> list[str]`` (notes on anything folded) and ``check_data(path, options) ->
list[Finding]`` (NaN/Inf and all-zero B, for ``validate``). ``loratool`` itself is one of the
formats.

``options`` (all optional): ``alpha``, ``enable_lora`` (list of bools or "1,0,1"),
``fan_in_fan_out`` (bool), ``base`` (a checkpoint used to recover names, layouts and kinds),
``name_map`` (``{OLD: NEW}``), ``allow_unknown``, ``check_values`` (default True: refuse NaN/Inf
when loading), ``overwrite``, ``source_format`` (skip detection).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from ..errors import InteropError
from ..format import KEY_FORMAT

FORMATS = ("loratool", "peft", "kohya", "loralib")
PEFT_CONFIG = "adapter_config.json"
_PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")


def _loratool_format():
    from .. import adapter as A
    from ._common import LoadResult

    def load(path, options):
        return A.load_loratool(path, check_values=options.get("check_values", True))

    return SimpleNamespace(
        name="loratool",
        read_info=lambda path, options: A.read_loratool_info(path),
        load=load,
        load_report=lambda path, options: LoadResult(load(path, options)),
        save=lambda adapter, path, options: (A.save_adapter(
            adapter, path, overwrite=options.get("overwrite", False)), [])[1],
    )


def format_module(name: str):
    """The reader/writer of a format by name."""
    if name == "loratool":
        return _loratool_format()
    if name not in FORMATS:
        raise InteropError(f"unknown adapter format {name!r}; choose one of "
                           f"{', '.join(FORMATS)}", code="LT301")
    import importlib
    return importlib.import_module(f".{name}", __name__)


def _peft_config_beside(path: str) -> bool:
    return os.path.exists(os.path.join(os.path.dirname(path) or ".", PEFT_CONFIG))


def _kind_from_names(names) -> str | None:
    """kohya, PEFT or None from tensor names alone."""
    names = list(names)
    if any(n.endswith((".lora_down.weight", ".lora_up.weight")) or ".hada_" in n
           or ".lokr_" in n for n in names):
        return "kohya"
    if any(n.endswith((".lora_A.weight", ".lora_B.weight")) or ".lora_embedding_A" in n
           for n in names):
        return "peft"
    return None


def detect_format(path: str) -> str:
    """Name of the format of ``path``: from its layout and names, never from tensor values.

    - a directory with ``adapter_config.json`` (or ``adapter_model.safetensors``/``.bin``): PEFT
    - ``.safetensors``: ``loratool.format`` metadata -> loratool; ``*.lora_down.weight`` ->
      kohya; ``*.lora_A.weight`` / ``lora_embedding_A`` -> PEFT; anything else is read as
      loratool, whose reader then says what is missing
    - ``.pt``/``.bin``/``.pth``/``.ckpt``: PEFT when ``adapter_config.json`` is beside it, else
      by names (loaded with the weights-only unpickler): kohya, PEFT, otherwise loralib
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, PEFT_CONFIG)) or any(
                os.path.exists(os.path.join(path, n)) for n in
                ("adapter_model.safetensors", "adapter_model.bin")):
            return "peft"
        raise InteropError(f"{path} is a directory without {PEFT_CONFIG}; pass an adapter file "
                           "or a PEFT adapter directory", code="LT301")
    from ._common import require_regular_file
    require_regular_file(path, "adapter file", code="LT001")
    if path.lower().endswith(_PICKLE_SUFFIXES):
        if _peft_config_beside(path):
            return "peft"
        from ._common import load_pickle
        return _kind_from_names(load_pickle(path)) or "loralib"
    from ..stfile import read_header
    header = read_header(path)
    if KEY_FORMAT in header.metadata:
        return "loratool"
    return _kind_from_names(header.tensors) or "loratool"


def reader_for(path: str, options: dict):
    fmt = options.get("source_format") or detect_format(path)
    return format_module(fmt)
