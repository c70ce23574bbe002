"""Atomic outputs: write beside the destination, rename into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import OperationError

TEMP_PREFIX = ".loratool-tmp-"


def check_destination(dest: str, *, overwrite: bool, inputs=()) -> None:
    """Refuse to write over an input, or over an existing file without ``overwrite``."""
    real = os.path.realpath(dest)
    for inp in inputs:
        if inp is not None and os.path.realpath(os.fspath(inp)) == real:
            raise OperationError(f"output {dest} is also an input; choose another -o path",
                                 code="LT502")
    if os.path.lexists(dest) and not overwrite:
        raise OperationError(f"output {dest} already exists; pass --overwrite (overwrite=True) "
                             "to replace it", code="LT503")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise OperationError(f"output directory {parent} does not exist", code="LT504")
    if not os.access(parent, os.W_OK):
        raise OperationError(f"output directory {parent} is not writable", code="LT504")


class AtomicFile:
    """``with AtomicFile(dest) as f: f.write(...)``: dest appears complete or not at all."""

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False, fsync: bool = False):
        self.dest = os.fspath(dest)
        self.overwrite = overwrite
        self.fsync = fsync
        self._tmp = None
        self._f = None

    def __enter__(self):
        check_destination(self.dest, overwrite=self.overwrite)
        parent = os.path.dirname(os.path.abspath(self.dest))
        fd, self._tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=parent)
        self._f = os.fdopen(fd, "wb")
        return self._f

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._f.flush()
                if self.fsync:
                    os.fsync(self._f.fileno())
                self._f.close()
                os.chmod(self._tmp, 0o644)
                os.replace(self._tmp, self.dest)
                self._tmp = None
                if self.fsync:
                    _fsync_dir(os.path.dirname(os.path.abspath(self.dest)))
        except OSError as e:
            raise OperationError(f"cannot write {self.dest}: {e.strerror or e}",
                                 code="LT505") from None
        finally:
            if self._f is not None and not self._f.closed:
                self._f.close()
            if self._tmp is not None and os.path.exists(self._tmp):
                os.unlink(self._tmp)
        return False


class AtomicDir:
    """Like AtomicFile for a directory output (PEFT adapters, sharded checkpoints)."""

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False):
        self.dest = os.fspath(dest)
        self.overwrite = overwrite
        self.tmp = None

    def __enter__(self) -> str:
        check_destination(self.dest, overwrite=self.overwrite)
        parent = os.path.dirname(os.path.abspath(self.dest))
        self.tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        os.chmod(self.tmp, 0o755)
        if os.path.lexists(self.dest):
            # Move the old one aside first so that a failure never leaves neither in place.
            old = self.dest + TEMP_PREFIX + "old"
            os.replace(self.dest, old) if os.path.isdir(self.dest) else os.unlink(self.dest)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
