"""Atomic GGUF outputs: GGUFWriter writes a temporary beside the destination, which is
renamed into place only once complete (the same naming as ``loratool.atomic``)."""

from __future__ import annotations

import contextlib
import os
import tempfile

from ..atomic import TEMP_PREFIX, TEMP_SUFFIX, check_destination
from ..errors import OperationError


@contextlib.contextmanager
def atomic_path(dest: str, *, overwrite: bool, inputs=()):
    """``with atomic_path(dest) as tmp:`` write ``tmp``; ``dest`` appears complete or not."""
    check_destination(dest, overwrite=overwrite, inputs=inputs)
    parent = os.path.dirname(os.path.abspath(dest))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=parent)
        os.close(fd)
    except OSError as e:
        raise OperationError(f"cannot create a file in {parent}: {e.strerror or e}",
                             code="LT504") from None
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as e:
        raise OperationError(f"cannot write {dest}: {e.strerror or e}; nothing was written",
                             code="LT505") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
