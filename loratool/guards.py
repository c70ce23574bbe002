"""File guards: the one home of the checks every reader makes before trusting a path.

Regular-file checks (a FIFO blocks ``open()`` and ``/dev/zero`` never ends), size-capped reads
of small JSON files, the pickle suffixes, and the ``PATH:NUMBER`` argument syntax shared by
``merge`` (scales) and ``compose`` (weights). No torch, no numpy: ``inspect`` and ``validate``
import this.
"""

from __future__ import annotations

import errno
import numbers
import os
import re
import stat
from typing import BinaryIO

from .errors import ContainerError, LoraToolError, OperationError

# Suffixes of torch pickles (read with the weights-only unpickler, never plain pickle).
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")


def is_pickle(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(PICKLE_SUFFIXES)


# --- regular files -----------------------------------------------------------------------------

def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for binary reading, refusing FIFOs, devices, sockets and directories.

    ``open()`` on a FIFO blocks until a writer appears and ``/dev/zero`` never ends, so
    hostile paths (a symlink named ``adapter.safetensors`` pointing at one) are refused
    before any read. The open itself does not block (O_NONBLOCK), then blocking is restored.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if not stat.S_ISREG(mode):
            raise ContainerError("is not a regular file (a FIFO, device or socket); loratool "
                                 "reads regular files only", code="LT001", path=path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise ContainerError (LT001) unless ``path`` is a readable regular file."""
    try:
        open_regular(path).close()
    except IsADirectoryError:
        raise ContainerError("is a directory, not a file", code="LT001",
                             path=os.fspath(path)) from None
    except OSError as e:
        raise ContainerError(f"cannot read: {e.strerror or e}", code="LT001",
                             path=os.fspath(path)) from None


def require_regular_file(path: str, what: str, *, code: str,
                         error: type[LoraToolError] = LoraToolError) -> None:
    """Like ``check_regular_file`` but by ``stat`` (opens nothing) and with the caller's code:
    ``what`` names the file in the message. Symlinks to regular files are fine."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror or e}", code=code, path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} is not a regular file", code=code, path=path)


# --- what an input reads ----------------------------------------------------------------------

# Files a reader takes from beside the path it is given (spec/merge.md, "Outputs").
_SIDECAR_SUFFIX = ".loratool.json"  # metadata of a .pt/.bin checkpoint (checkpoint.py)
_PEFT_CONFIG = "adapter_config.json"  # config of a PEFT adapter given as its weights file
_MAX_LISTED_FILES = 100_000
_INDEX = "model.safetensors.index.json"
# What readers open in a directory without an index: PEFT's config and weights
# (interop.peft), a model directory's single weights file (checkpoint.SINGLE_NAMES).
_DIR_FILES = (_PEFT_CONFIG, "adapter_model.safetensors", "adapter_model.bin",
              "model.safetensors", "pytorch_model.bin")


def files_read(path: str | os.PathLike) -> list[str]:
    """Every file that reading ``path`` (an adapter or a checkpoint, any format) may open.

    A sharded checkpoint (a directory with an index, or the ``*.index.json``) stands for
    every file below its directory (a merge copies the other files too); another directory
    for the PEFT config and weights or the single model file it holds; a file for
    itself, its ``.loratool.json`` sidecar and, for a PEFT weights file, the
    ``adapter_config.json`` beside it. Outputs are checked against this list
    (``atomic.check_destination``): an over-approximation refuses a harmless path, an
    under-approximation destroys an input.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, _INDEX)):
        # A PEFT directory or a single-file model directory: the reader opens these only
        # (a merged file written into an adapter's directory is not an input next time).
        return [path] + [os.path.join(path, n) for n in _DIR_FILES
                         if os.path.lexists(os.path.join(path, n))]
    if os.path.isdir(path) or path.endswith(".index.json"):
        root = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
        out = [path]
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            out += [os.path.join(dirpath, f) for f in filenames]
            if len(out) > _MAX_LISTED_FILES:
                break
        return out
    extras = [path + _SIDECAR_SUFFIX]
    if is_pickle(path) or os.path.basename(path).startswith("adapter_model"):
        extras.append(os.path.join(os.path.dirname(path) or ".", _PEFT_CONFIG))
    return [path] + [e for e in extras if os.path.lexists(e)]


# --- small JSON files --------------------------------------------------------------------------

class TooLarge(ValueError):
    """A file is larger than its cap; ``limit`` is the cap in bytes."""

    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


def read_capped(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refusing (``TooLarge``) more than ``limit``.

    Reads at most ``limit + 1`` bytes whatever the file claims, so a file that grows between
    ``stat`` and ``read`` cannot make us read more. OSError and ContainerError pass through.
    """
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise TooLarge(limit)
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(limit)
    return raw


def reject_duplicate_keys(pairs):
    """``object_pairs_hook`` for ``json.loads``: a key twice is a ValueError (Python keeps the
    last one silently, other tools the first: the two would disagree on what a file says)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


# --- PATH:NUMBER -------------------------------------------------------------------------------

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_WITH_NUMBER_RE = re.compile(rf"^(?P<path>.+):(?P<number>{_NUMBER})$")
_NONFINITE_RE = re.compile(r"^.+:[+-]?(?:inf|infinity|nan)$", re.IGNORECASE)


def parse_path_number(text: str, *, what: str, code: str) -> tuple[str, float]:
    """``"a.safetensors:0.5"`` -> ``("a.safetensors", 0.5)``; no number means 1.0.

    The one ``PATH:NUMBER`` syntax of the CLI (``merge`` scales, ``compose`` weights). Paths
    may hold colons: only a trailing ``:<decimal number>`` is a number, and an existing path
    is always a path (``odd:0.5`` on disk is that file, number 1). A file whose name itself
    ends in ``:<number>`` is named with an explicit number: ``a:1:1``. A trailing ``:nan`` or
    ``:inf`` is refused (``OperationError`` with ``code``; ``what`` names the number).

    >>> parse_path_number("dir:x/a.safetensors:-0.5", what="weight", code="LT534")
    ('dir:x/a.safetensors', -0.5)
    >>> parse_path_number("C:/x/a.safetensors", what="scale", code="LT520")
    ('C:/x/a.safetensors', 1.0)
    """
    if os.path.exists(text):
        return text, 1.0
    if _NONFINITE_RE.match(text):
        raise OperationError(f"{text!r}: the {what} after the last ':' must be a finite number",
                             code=code)
    m = _WITH_NUMBER_RE.match(text)
    if m is None:
        return text, 1.0
    return m.group("path"), float(m.group("number"))


def weighted_inputs(inputs, *, what: str, code: str) -> list:
    """The list of ``(adapter_or_path, number)`` pairs or bare inputs that ``merge``,
    ``unmerge`` and ``compose`` take, also given as ONE input: a path, an ``Adapter`` or a
    single ``(adapter_or_path, number)`` pair stand for a list of one. Anything else that
    is not a list is refused (``OperationError`` with ``code``), not a raw TypeError.

    >>> weighted_inputs(("a.safetensors", 0.5), what="scale", code="LT520")
    [('a.safetensors', 0.5)]
    """
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "modules"):
        return [inputs]
    if (isinstance(inputs, tuple) and len(inputs) == 2
            and isinstance(inputs[1], numbers.Real) and not isinstance(inputs[1], bool)
            and not isinstance(inputs[0], (numbers.Real, tuple))):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        out = list(inputs)
    else:
        try:
            out = list(inputs)
        except TypeError:
            out = None
    if out is None or isinstance(inputs, (bytes, dict)):
        raise OperationError(f"expected adapters as a path, an Adapter, an (adapter, {what}) "
                             f"pair or a list of them; got {type(inputs).__name__}", code=code)
    for item in out:
        src = item[0] if isinstance(item, tuple) and item else item
        if not (isinstance(src, (str, os.PathLike)) or hasattr(src, "modules")):
            raise OperationError(f"adapter entry {item!r} is not a path, an Adapter or an "
                                 f"(adapter, {what}) pair", code=code)
    return out
