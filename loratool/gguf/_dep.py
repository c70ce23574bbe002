"""Lazy import of the optional `gguf` package (llama.cpp's gguf-py)."""

from __future__ import annotations

from ..errors import InteropError
from .codes import GGUF_MISSING


def require_gguf():
    """The `gguf` module, or an error naming the extra that provides it."""
    try:
        import gguf
    except ImportError:
        raise InteropError("GGUF support needs the optional `gguf` package: "
                           "pip install 'loratool[gguf]'", code=GGUF_MISSING) from None
    return gguf
