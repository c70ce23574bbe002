"""Atomic outputs: write beside the destination, rename into place only when complete."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
import tempfile

from .errors import OperationError

TEMP_PREFIX = ".loratool-tmp-"
# errnos that mean "the output cannot be written" (disk full, quota, file size limit, r/o fs)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
TEMP_SUFFIX = ".part"  # temporaries are ".loratool-tmp-<random>.part" (SECURITY.md)


def check_destination(dest: str, *, overwrite: bool, inputs=()) -> None:
    """Refuse to write over an input, or over an existing file without ``overwrite``.

    ``inputs`` are the paths a command reads (adapters, bases, tuned checkpoints; anything
    that is not a path, an in-memory ``Adapter``, is ignored). Each stands for every file
    reading it opens (``guards.files_read``: shards, index, configs, sidecars). ``dest`` is
    refused (LT502), ``overwrite`` or not, when it is one of them by path, through a
    symlink or as a hard link (same device and inode), or when one of them lies inside it
    (a directory output replaces everything below it).
    """
    refuse_inputs(dest, inputs)
    if os.path.lexists(dest) and not overwrite:
        raise OperationError(f"output {dest} already exists; pass --overwrite (overwrite=True) "
                             "to replace it", code="LT503")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise OperationError(f"output directory {parent} does not exist", code="LT504")
    if not os.access(parent, os.W_OK):
        raise OperationError(f"output directory {parent} is not writable", code="LT504")


def refuse_inputs(dest: str | os.PathLike, inputs) -> None:
    """LT502 when writing ``dest`` would replace a file that ``inputs`` read (see
    ``check_destination``)."""
    from .guards import files_read
    dest = os.fspath(dest)
    real = os.path.realpath(dest)
    try:
        st = os.stat(dest)
        ident = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    for inp in inputs:
        if not isinstance(inp, (str, os.PathLike)):
            continue
        inp = os.fspath(inp)
        for f in files_read(inp):
            rf = os.path.realpath(f)
            same = rf == real
            if not same and ident is not None:
                try:
                    fst = os.stat(f)
                    same = (fst.st_dev, fst.st_ino) == ident
                except OSError:
                    pass
            if same:
                what = inp if f == inp else f"{f}, which reading {inp} opens"
                raise OperationError(f"output {dest} is an input ({what}); writing it would "
                                     "destroy the input, --overwrite or not: choose another "
                                     "-o path", code="LT502")
            if rf.startswith(real.rstrip(os.sep) + os.sep):
                raise OperationError(f"input {f} is inside the output {dest}, which would "
                                     "replace it; choose another -o path", code="LT502")


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
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=parent)
        except OSError as e:
            raise OperationError(f"cannot create a file in {parent}: {e.strerror or e}",
                                 code="LT504") from None
        self._f = _TrackedFile(_fdopen(fd))
        return self._f

    def __exit__(self, exc_type, exc, tb):
        try:
            failed = self._f.write_error if exc_type is not None else None
            if failed is None and exc_type is not None and issubclass(exc_type, OSError) and (
                    exc.errno in _FULL_ERRNOS or _names_inside(exc, self._tmp)):
                failed = exc
            if failed is not None:
                # Any failed write of the output is LT505; an OSError from elsewhere in the
                # block (reading an input) passes through and the CLI reports a read error.
                # The disk filled up (or the file limit hit) mid-write: say which output.
                # torch.save reports such a failure as a RuntimeError; the tracked file
                # remembers the real OSError.
                raise OperationError(f"cannot write {self.dest}: {failed.strerror or failed}; "
                                     "nothing was written", code="LT505") from None
            if exc_type is None:
                self._f.flush()
                if self.fsync:
                    os.fsync(self._f.fileno())
                self._f.close()
                os.chmod(self._tmp, 0o644)
                move_into_place(self._tmp, self.dest)
                self._tmp = None
                if self.fsync:
                    _fsync_dir(os.path.dirname(os.path.abspath(self.dest)))
        except OSError as e:
            raise OperationError(f"cannot write {self.dest}: {e.strerror or e}",
                                 code="LT505") from None
        finally:
            if self._f is not None and not self._f.closed:
                try:
                    self._f.close()
                except OSError:  # close() flushes again: on a full disk it fails again
                    pass
            if self._tmp is not None and os.path.exists(self._tmp):
                os.unlink(self._tmp)
        return False


def _names_inside(e: OSError, tmp: str | None) -> bool:
    """Whether the OSError names the temporary output (or a file inside it)."""
    if tmp is None:
        return False
    tmp = os.path.abspath(tmp)
    return any(isinstance(f, str) and (os.path.abspath(f) == tmp or os.path.abspath(f)
                                       .startswith(tmp + os.sep))
               for f in (e.filename, e.filename2))


def _fdopen(fd: int):
    return os.fdopen(fd, "wb")


class _TrackedFile:
    """The temporary file of AtomicFile; remembers the OSError of a failed write or flush
    (torch.save turns it into a RuntimeError, and we still want to say "disk full")."""

    def __init__(self, f):
        self._f = f
        self.write_error: OSError | None = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.write_error = e
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            self.write_error = e
            raise

    def pwrite(self, data, offset: int) -> None:
        """Write all of ``data`` at ``offset`` of the file (its position does not move; call
        ``flush`` first if buffered writes precede)."""
        try:
            inner = getattr(self._f, "pwrite", None)  # a wrapped file's own (fault tests)
            if inner is not None:
                return inner(data, offset)
            mv, done, fd = memoryview(data).cast("B"), 0, self._f.fileno()
            while done < mv.nbytes:
                done += os.pwrite(fd, mv[done:], offset + done)
        except OSError as e:
            self.write_error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


class AtomicDir:
    """Like AtomicFile for a directory output (PEFT adapters, sharded checkpoints)."""

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False):
        self.dest = os.fspath(dest)
        self.overwrite = overwrite
        self.tmp = None

    def __enter__(self) -> str:
        check_destination(self.dest, overwrite=self.overwrite)
        parent = os.path.dirname(os.path.abspath(self.dest))
        # Same naming as AtomicFile's temporaries: a killed run leaves ".loratool-tmp-*.part".
        try:
            self.tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=parent)
        except OSError as e:
            raise OperationError(f"cannot create a directory in {parent}: {e.strerror or e}",
                                 code="LT504") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if issubclass(exc_type, OSError) and (exc.errno in _FULL_ERRNOS
                                                  or _names_inside(exc, self.tmp)):
                raise OperationError(f"cannot write {self.dest}: {exc.strerror or exc}; "
                                     "nothing was written", code="LT505") from None
            return False
        parent = os.path.dirname(os.path.abspath(self.dest))
        try:
            os.chmod(self.tmp, 0o755)
            if os.path.lexists(self.dest):
                if os.path.isdir(self.dest) and not os.path.islink(self.dest):
                    # Move the old one aside (a fresh name: a stale one from a killed run must
                    # not block us), then the new one in; a kill in between leaves no
                    # destination, never a mixed one.
                    old = tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=".old" + TEMP_SUFFIX,
                                           dir=parent)
                    os.replace(self.dest, old)
                    os.replace(self.tmp, self.dest)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.unlink(self.dest)
                    os.replace(self.tmp, self.dest)
            else:
                os.replace(self.tmp, self.dest)
            self.tmp = None
        except OSError as e:
            raise OperationError(f"cannot write {self.dest}: {e.strerror or e}",
                                 code="LT505") from None
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def move_into_place(tmp: str, dest: str) -> None:
    """``os.replace(tmp, dest)`` without the flush of a rename over an existing file.

    ext4 (``auto_da_alloc``) writes the new file's data out before a rename over an existing
    file returns (5.5 s for a 2.8 GB merge): a cost ``--fsync`` asks for and a plain
    ``--overwrite`` must not pay. An atomic exchange of the two names
    (``renameat2(RENAME_EXCHANGE)``, Linux 3.15+, ext4/xfs/btrfs/tmpfs) does not flush; the
    old file, now under the temporary's name, is then unlinked. At every instant the
    destination is the old file or the new one, never missing: a kill after the exchange
    leaves at most the old file under its ``.loratool-tmp-*.part`` name. Where the exchange
    is not available (other systems, file systems that refuse it) this is ``os.replace``.
    """
    if os.path.isfile(dest) and not os.path.islink(dest) and _exchange(tmp, dest):
        try:
            os.unlink(tmp)  # the old file now
        except OSError:  # the new file is in place; a leftover temporary is only litter
            pass
        return
    os.replace(tmp, dest)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.2+
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where that is not supported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
