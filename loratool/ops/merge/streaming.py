"""Streaming one safetensors file through the merge: a reader thread, the engine on the
calling thread and a writer thread, each on its own tensor. Tensors nothing changes are
copied file-to-file by the kernel. Peak memory is about three of the largest merged tensors,
independent of the checkpoint's size."""

from __future__ import annotations

import functools
import math
import queue
import threading
from dataclasses import dataclass

from ...checkpoint import StreamWriter
from ...stfile import DTYPE_SIZES
from .plan import MERGEABLE_DTYPES
from .replace import KINDS, apply_replacements


class _Prefetcher:
    """Reads the tensors to merge, in order, on a thread: each into one of a pool of reused
    buffers, or (``mapped(t)``) as a read-only map of the base whose pages the thread
    populates, so that the engine reads the page cache itself (no copy into a buffer). At
    most ``buffers`` read tensors and ``maps`` mapped ones are out at a time."""

    def __init__(self, source, tensors, *, pinned: bool, buffers: int = 2, maps: int = 2,
                 mapped=None):
        import numpy as np
        self._tensors = list(tensors)
        self._mapped = mapped or (lambda t: False)
        read = [t for t in self._tensors if not self._mapped(t)]
        size = max((t.nbytes for t in read), default=0)
        self._free: queue.Queue = queue.Queue()
        self._maps: queue.Queue = queue.Queue()  # tokens: maps not yet given back
        self._ready: queue.Queue = queue.Queue()
        for _ in range(min(buffers, len(read))):
            if pinned:  # page-locked host memory for the CUDA engine's uploads
                import torch
                self._free.put(torch.empty(size, dtype=torch.uint8, pin_memory=True))
            else:
                self._free.put(np.empty(size, dtype=np.uint8))
        for _ in range(maps):
            self._maps.put(True)
        self._stop = threading.Event()
        self._source = source
        self._thread = None
        if self._tensors:
            self._thread = threading.Thread(target=self._run, name="loratool-read", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import numpy as np
        try:
            for t in self._tensors:
                mapped = self._mapped(t)
                buf = (self._maps if mapped else self._free).get()
                if buf is None or self._stop.is_set():
                    return
                if mapped:
                    got = self._source.map_tensor(t)
                    if got is not None:
                        mm, start = got
                        self._ready.put((t.name, _Mapped(mm, start, t.nbytes)))
                        continue
                    self._maps.put(True)  # no map after all (platform): read a copy
                    buf = np.empty(t.nbytes, dtype=np.uint8)
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
        if isinstance(buf, _Mapped):
            buf.close()
            self._maps.put(True)
        else:
            self._free.put(buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._free.put(None)
        self._maps.put(None)
        if self._thread is not None:
            self._thread.join()
        while not self._ready.empty():  # maps read ahead and never taken
            got, buf = self._ready.get()
            if isinstance(buf, _Mapped):
                buf.close()
        return False


class _Mapped:
    """A tensor's bytes in a read-only map of the base (``SafetensorsSource.map_tensor``)."""

    def __init__(self, mm, start: int, nbytes: int):
        import numpy as np
        self._mm = mm
        self.array = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)

    def close(self) -> None:
        self.array = None  # the last view of the map: it can close now
        try:
            self._mm.close()
        except BufferError:  # a view still held somewhere: unmapped when that goes
            pass


class _OutBuffers:
    """Reused output buffers of the engine (``engine.run(..., out=)``), ``n`` of them, made
    on first use and given back by the writer once written."""

    def __init__(self, size: int, n: int):
        self._size = size
        self._free: queue.Queue = queue.Queue()
        for _ in range(n):
            self._free.put(None)

    def take(self):
        import numpy as np
        buf = self._free.get()
        return np.empty(self._size, dtype=np.uint8) if buf is None else buf

    def give_back(self, buf) -> None:
        self._free.put(buf)


class _WriteThread:
    """Writes (or kernel-copies) tensors in output order on its own thread, so that writing
    tensor i overlaps merging tensor i+1 and reading tensor i+2; after each write it calls the
    item's release callbacks (returning its buffers to the reader or the engine)."""

    def __init__(self, writer):
        self._writer = writer
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loratool-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            kind, a, b, releases = item
            try:
                if self._error is None:
                    if kind == "copy":
                        a.copy_raw(b, self._writer)
                    else:
                        self._writer.write(a, b)
            except BaseException as e:  # raised in the main thread by check()/finish()
                self._error = e
            finally:
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

    def __exit__(self, *exc):
        if self._thread.is_alive():
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

    def mapped(t) -> bool:
        """Read through a map, merged into an output buffer: the engine takes ``out=``,
        the source maps, and no op writes into the base's bytes or needs torch."""
        return (getattr(engine, "takes_out", False) and hasattr(source, "map_tensor")
                and not any(op.kind in KINDS or op.kind in ("dora", "fn")
                            for op in plan.get(t.name, ())))

    out_size = max((math.prod(t.shape) * DTYPE_SIZES[target_dtype(t)] for t in work
                    if mapped(t)), default=0)
    outs = _OutBuffers(out_size, 3)
    with StreamWriter(dest, entries, metadata, overwrite=overwrite, fsync=fsync) as writer, \
            _Prefetcher(source, work, pinned=engine.pinned, buffers=3,
                        mapped=mapped) as reader, \
            _WriteThread(writer) as out:
        for t in tensors:
            dt = target_dtype(t)
            done = functools.partial(tick, t.nbytes)  # progress counts written bytes
            if t.name not in plan and dt == t.dtype:
                out.copy(source, t, done)
                counts.copied += 1
            else:
                buf = reader.take(t.name)
                if isinstance(buf, _Mapped):
                    dst = outs.take()
                    try:
                        res, release = engine.run(buf.array, t.dtype, tuple(t.shape),
                                                  list(plan.get(t.name, ())), dt, t.name,
                                                  out=dst)
                    except BaseException:
                        outs.give_back(dst)
                        raise
                    finally:
                        reader.give_back(buf)  # the base's pages are no longer needed
                    out.write(t.name, res, release, lambda dst=dst: outs.give_back(dst), done)
                else:
                    try:
                        ops = apply_replacements(buf, t.dtype, tuple(t.shape),
                                                 plan.get(t.name, ()))
                        res, release = engine.run(buf, t.dtype, tuple(t.shape), ops, dt,
                                                  t.name)
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
