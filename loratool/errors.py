"""Exceptions. Every error carries the stable rule code of the spec (spec/adapter-format.md).

The CLI turns any ``LoraToolError`` into ``Error: [CODE] message`` and exit code 1, so a
message must say what is wrong and how to fix it.
"""

from __future__ import annotations


class LoraToolError(Exception):
    """Base of every loratool error; ``code`` is a spec rule code such as ``LT203``."""

    code = "LT000"

    def __init__(self, message: str, *, code: str | None = None, path: str | None = None,
                 module: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.path = path
        self.module = module

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"[{self.code}] {where}{self.message}"


class ContainerError(LoraToolError):
    """LT0xx: the file is not a well-formed safetensors container."""

    code = "LT001"


class MetadataError(LoraToolError):
    """LT1xx: loratool metadata is missing, malformed or of an unsupported version."""

    code = "LT101"


class TensorError(LoraToolError):
    """LT2xx: adapter tensors are missing, misnamed, mis-shaped or hold bad values."""

    code = "LT201"


class InteropError(LoraToolError):
    """LT3xx: a foreign adapter format (PEFT, kohya, loralib) cannot be read or written."""

    code = "LT301"


class CheckpointError(LoraToolError):
    """LT4xx: a base checkpoint cannot be read, matched against an adapter, or written."""

    code = "LT401"


class OperationError(LoraToolError):
    """LT5xx: an operation's arguments do not fit its inputs (bad rank, scale, output path)."""

    code = "LT501"
