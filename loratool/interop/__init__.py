"""Adapter formats as plug-ins: the registry, detection, and the ``Format`` protocol.

Each format is one module of this package implementing ``base.Format`` (``detect``,
``read_info``, ``load_report``/``load``, ``save``, ``validate``, ``CAPABILITIES``); the native
loratool format (``native``) is one of them. ``REGISTRY`` is the one list of formats: the CLI's
``--to`` choices, ``convert``'s targets and detection all come from it. Modules are imported
only when used, so ``inspect``/``validate`` of a loratool file import no other format.

Options are a ``base.ReaderOptions`` (typed, frozen); see its docstring.
"""

from __future__ import annotations

import importlib
import os

from ..errors import InteropError
from .base import Format, Probe, ReaderOptions

# name -> module of this package. Detection asks every format; ties go to the first listed.
REGISTRY: dict[str, str] = {
    "loratool": "native",
    "peft": "peft",
    "kohya": "kohya",
    "loralib": "loralib",
    "gguf": "gguf",
    "lycoris": "lycoris",
}
FORMATS: tuple[str, ...] = tuple(REGISTRY)


def get_format(name: str) -> Format:
    """The plug-in of a format by name."""
    if name not in REGISTRY:
        raise InteropError(f"unknown adapter format {name!r}; choose one of "
                           f"{', '.join(FORMATS)}", code="LT301")
    return importlib.import_module(f".{REGISTRY[name]}", __name__)


def detect_format(path: str | os.PathLike) -> str:
    """Name of the format of ``path``: from its layout, metadata and names, never from
    tensor values. Every format scores the path (``Format.detect``); the highest wins.

    - a directory with ``adapter_config.json`` (or ``adapter_model.safetensors``/``.bin``): PEFT
    - ``.safetensors``: ``loratool.format`` metadata -> loratool; ``*.lora_down.weight`` ->
      kohya; ``*.lora_A.weight`` / ``lora_embedding_A`` -> PEFT; anything else is read as
      loratool, whose reader then says what is missing
    - ``.pt``/``.bin``/``.pth``/``.ckpt``: PEFT when ``adapter_config.json`` is beside it, else
      by names (loaded with the weights-only unpickler): kohya, PEFT, otherwise loralib
    """
    path = os.fspath(path)
    probe = Probe(path)
    if not probe.is_dir:
        from ._common import require_regular_file
        require_regular_file(path, "adapter file", code="LT001")
    best, score = None, 0
    for name in FORMATS:
        s = get_format(name).detect(probe)
        if s > score:
            best, score = name, s
    if best is None:
        what = "a directory that holds no adapter" if probe.is_dir else "not an adapter file"
        hint = ""
        if probe.is_dir:  # PEFT multi-adapter saves: one subfolder per adapter
            from ..checkpoint import subfolders_hint
            hint = subfolders_hint(path)
        raise InteropError(f"{path} is {what} of a known format ({', '.join(FORMATS)}); for "
                           f"PEFT pass the directory with adapter_config.json{hint}",
                           code="LT301")
    return best


def reader_for(path: str, options: ReaderOptions) -> Format:
    return get_format(options.source_format or detect_format(path))
