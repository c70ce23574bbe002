"""loratool: LoRA adapters done exactly. A versioned file format, a library and a CLI.

Public functions (each has a CLI command of the same name)::

    from loratool import inspect, validate, load_adapter, save_adapter

Attributes are imported lazily so that ``import loratool`` (and the CLI's ``--help``,
``inspect`` and ``validate``) never pays for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": "loratool.ops.inspect",
    "validate": "loratool.ops.validate",
    "convert": "loratool.ops.convert",
    "merge": "loratool.ops.merge",
    "unmerge": "loratool.ops.merge",
    "resize": "loratool.ops.resize",
    "compose": "loratool.ops.compose",
    "compare": "loratool.ops.compose",
    "extract": "loratool.ops.extract",
    "load_adapter": "loratool.adapter",
    "save_adapter": "loratool.adapter",
    "read_adapter_info": "loratool.adapter",
    "Adapter": "loratool.model",
    "AdapterInfo": "loratool.model",
    "LoraModule": "loratool.model",
    "ModuleInfo": "loratool.model",
    "LoraToolError": "loratool.errors",
    "Finding": "loratool.rules",
    "RULES": "loratool.rules",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loratool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
