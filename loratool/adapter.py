"""Reading and writing adapters: ``read_adapter_info`` (header only), ``load_adapter``,
``save_adapter``. The format is detected and the work handed to its plug-in
(``loratool.interop``, the native format included); everything comes back as the same
``Adapter`` model.
"""

from __future__ import annotations

import os

from .interop import native, reader_for
from .interop.base import ReaderOptions
from .model import Adapter, AdapterInfo


def read_adapter_info(path: str | os.PathLike, **options) -> AdapterInfo:
    """Describe an adapter of any supported format without reading its tensor data.

    ``options`` are ``ReaderOptions`` fields (``alpha``, ``base``, ...).

    >>> info = read_adapter_info("examples/adapter.safetensors")
    >>> info.source_format, info.modules["model.layers.0.self_attn.q_proj"].rank
    ('loratool', 8)
    """
    path = os.fspath(path)
    opts = ReaderOptions.of(**options)
    return reader_for(path, opts).read_info(path, opts)


def load_adapter(path: str | os.PathLike, **options) -> Adapter:
    """Load an adapter of any supported format into the canonical model (imports torch).

    Options for foreign formats (``ReaderOptions``): ``alpha``, ``enable_lora``,
    ``fan_in_fan_out``, ``base`` (a checkpoint used to resolve names and layouts),
    ``name_map``, ``allow_unknown``; ``check_values=False`` loads NaN/Inf values.
    """
    path = os.fspath(path)
    opts = ReaderOptions.of(**options)
    return reader_for(path, opts).load(path, opts)


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, overwrite: bool = False,
                 fsync: bool = False) -> str:
    """Write ``adapter`` in loratool format 1.0, atomically; returns the tensor hash.

    The bytes depend only on the adapter: tensors in name order, canonical metadata JSON.
    Other formats: ``loratool.convert`` or ``get_format(name).save``.
    """
    return native.write(adapter, os.fspath(path), overwrite=overwrite, fsync=fsync)
