"""Streaming one safetensors file through the merge: a reader thread, the engine on the
calling thread and a writer thread, each on its own tensor. Tensors nothing changes are
copied file-to-file by the kernel. Peak memory is about three of the largest merged tensors,
independent of the checkpoint's size."""

from __future__ import annotations

import collections
import functools
import math
import os
import queue
import sys
import threading
from dataclasses import dataclass

from ...checkpoint import StreamWriter
from ...stfile import DTYPE_SIZES
from .plan import MERGEABLE_DTYPES
from .replace import apply_replacements


class _Prefetcher:
    """Reads the tensors to merge, in order, into a pool of reused buffers on a thread."""

    def __init__(self, source, tensors, *, pinned: bool, buffers: int = 2):
        import numpy as np
        self._tensors = list(tensors)
        size = max((t.nbytes for t in self._tensors), default=0)
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        for _ in range(min(buffers, len(self._tensors))):
            if pinned:  # page-locked host memory for the CUDA engine's uploads
                import torch
                self._free.put(torch.empty(size, dtype=torch.uint8, pin_memory=True))
            else:
                self._free.put(np.empty(size, dtype=np.uint8))
        self._stop = threading.Event()
        self._source = source
        self._thread = None
        if self._tensors:
            self._thread = threading.Thread(target=self._run, name="loratool-read", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import numpy as np
        _yield_to_the_others()
        try:
            for t in self._tensors:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return
                self._source.read_into(t, (buf if isinstance(buf, np.ndarray)
                                           else buf.numpy())[: t.nbytes])
                self._ready.put((t.name, buf))
        except BaseException as e:  # handed to the main thread, raised there
            self._ready.put((None, e))

    def take(self, name: str):
        got, buf = self._ready.get()
        if got is None:
            raise buf
        assert got == name, (got, name)
        return buf

    def give_back(self, buf) -> None:
        self._free.put(buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._free.put(None)
        if self._thread is not None:
            self._thread.join()
        return False


# How much lower the reader thread's priority is than the engine's and the writer's (nice
# levels). A merge keeps every core busy: the engine, the writer and the reader (about a
# quarter of the others' CPU) share them, and an even share slowed the engine, the critical
# thread. The reader only has to stay one buffer ahead, which it does in the gaps. Shell
# loop, 2.8 GB fixture on tmpfs, interleaved rounds (benchmarks/README.md, fifth pass):
# bf16 base 1.49 -> 1.38 s (medians of 12), fp32 base 2.18 -> 1.96 s (medians of 8).
READER_NICE = 5


def _yield_to_the_others() -> None:
    """Lower the calling thread's priority by ``READER_NICE`` (Linux: per thread; elsewhere
    the same call would renice a whole process, so nothing is done)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + READER_NICE))
    except (OSError, AttributeError):  # a sandbox that refuses it: the default priority
        pass


class _WriteThread:
    """Writes merged tensors and copies unchanged ones on its own thread, so that writing
    overlaps merging the next tensor and reading the one after; after each tensor it calls
    the item's release callbacks (returning its buffers to the reader or the engine).

    The writer puts each tensor at its offset, so the order is free: a merged tensor is
    written as soon as it arrives, because its buffer is what the reader and the engine wait
    for; unchanged tensors are copied part by part (``COPY_STEP``) whenever nothing else is
    queued, and at the end. (In file order, a checkpoint whose embeddings come first kept the
    engine waiting behind their copy.)"""

    def __init__(self, writer):
        self._writer = writer
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loratool-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        copies: collections.deque = collections.deque()  # [steps, releases], oldest first
        while True:
            try:
                item = self._q.get(block=not copies)
            except queue.Empty:  # nothing to write: one part of the oldest copy
                self._copy_step(copies)
                continue
            if item is None:
                while copies:
                    self._copy_step(copies)
                return
            kind, a, b, releases = item
            if kind == "copy":
                copies.append((a.copy_steps(b, self._writer), releases))
                continue
            try:
                if self._error is None:
                    self._writer.write(a, b)
            except BaseException as e:  # raised in the main thread by check()/finish()
                self._error = e
            finally:
                self._release(releases)

    def _copy_step(self, copies) -> None:
        steps, releases = copies[0]
        try:
            if self._error is None and not self._abort.is_set():
                next(steps)
                return
        except StopIteration:
            pass
        except BaseException as e:
            self._error = e
        copies.popleft()
        self._release(releases)

    def _release(self, releases) -> None:
        for release in releases:  # always: buffers go back even after an error
            if release is None:
                continue
            try:
                release()
            except BaseException as e:  # a failing progress callback, say
                if self._error is None:
                    self._error = e

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def copy(self, source, t, *releases) -> None:
        self.check()
        self._q.put(("copy", source, t, releases))

    def write(self, name: str, data, *releases) -> None:
        self.check()
        self._q.put(("write", name, data, releases))

    def finish(self) -> None:
        self._q.put(None)
        self._thread.join()
        self.check()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self._thread.is_alive():
            if exc_type is not None:  # the output is abandoned: copy nothing more
                self._abort.set()
            self._q.put(None)
            self._thread.join()
        return False


@dataclass
class Counts:
    merged: int = 0
    converted: int = 0
    copied: int = 0
    read: int = 0
    written: int = 0


def stream_file(source, dest: str, plan: dict, out_dtype: str | None, metadata: dict,
                 engine, counts: Counts, *, overwrite: bool, fsync: bool, tick) -> None:
    """Write ``source`` merged by ``plan`` to ``dest`` (safetensors), tensor by tensor: a
    reader thread, the merge on this thread, a writer thread, each on its own tensor."""
    converts = getattr(engine, "converts", ())  # FP8 weights dequantized (fp8_base)

    def target_dtype(t):
        if out_dtype is not None and (t.dtype in MERGEABLE_DTYPES or t.name in converts):
            return out_dtype
        return t.dtype

    drop = getattr(engine, "drop", ())  # their scales, then not written
    tensors = [t for t in source.tensors if t.name not in drop]
    entries = [(t.name, target_dtype(t), t.shape) for t in tensors]
    work = [t for t in tensors if t.name in plan or target_dtype(t) != t.dtype]
    with StreamWriter(dest, entries, metadata, overwrite=overwrite, fsync=fsync) as writer, \
            _Prefetcher(source, work, pinned=engine.pinned, buffers=3) as reader, \
            _WriteThread(writer) as out:
        for t in tensors:
            dt = target_dtype(t)
            done = functools.partial(tick, t.nbytes)  # progress counts written bytes
            if t.name not in plan and dt == t.dtype:
                out.copy(source, t, done)
                counts.copied += 1
            else:
                buf = reader.take(t.name)
                try:
                    ops = apply_replacements(buf, t.dtype, tuple(t.shape),
                                             plan.get(t.name, ()))
                    res, release = engine.run(buf, t.dtype, tuple(t.shape), ops, dt, t.name)
                except BaseException:
                    reader.give_back(buf)
                    raise
                out.write(t.name, res, release,
                          lambda buf=buf: reader.give_back(buf), done)
                if t.name in plan:
                    counts.merged += 1
                else:
                    counts.converted += 1
            counts.read += t.nbytes
            counts.written += math.prod(t.shape) * DTYPE_SIZES[dt]
        out.finish()
        writer.commit()
