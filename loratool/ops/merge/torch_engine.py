"""The torch engines: float32 on a device (CUDA; on the CPU in tests), and whole-tensor
float64 for DoRA (whose per-row norm needs the whole row before anything is rounded).
Importing this module does not import torch; using it does."""

from __future__ import annotations

import math
import queue

import numpy as np

from ...numerics import FLOAT_NP
from ...stfile import DTYPE_SIZES
from .plan import nonfinite_error


def check_finite(res, orig, name: str, ops) -> None:
    """Raise LT412 when ``res`` holds NaN/Inf where ``orig`` (the base) held finite values."""
    import torch
    if res.numel() == 0:
        return
    if math.isfinite(float(res.sum())):  # NaN and Inf reach the sum; overflow is re-checked
        return
    bad = int((~torch.isfinite(res) & torch.isfinite(orig.to(res.device))).sum())
    if bad:
        raise nonfinite_error(name, bad, ops)


def apply_whole(w, ops) -> None:
    """Apply ``ops`` in order to ``w`` (a private float tensor, modified in place)."""
    import torch
    w2 = w.reshape(w.shape[0], -1) if w.ndim >= 2 else w
    w0 = w2.clone() if any(op.kind == "dora" for op in ops) else None

    for op in ops:  # ops already cast to w's dtype and device
        if op.kind == "vector":
            w2.add_(op.vec, alpha=op.scale)
        elif op.kind == "lowrank":
            w2.addmm_(op.L, op.R, alpha=op.scale)
        elif op.kind == "fn":
            w2.copy_(op.fn(w2))
        else:  # DoRA, as PEFT merges it: m / ||W0 + dW|| (per output) * (W + dW)
            delta = torch.mm(op.L, op.R).mul_(op.scale)
            norm = torch.linalg.vector_norm(w0 + delta, dim=op.axis, keepdim=True)
            w2.add_(delta).mul_(op.magnitude.reshape(norm.shape) / norm)


def run_whole_f64(raw, dtype, shape, ops, out_dtype, name):
    """The exact engine's DoRA path (torch-loaded adapters only): the whole tensor in
    float64 with torch, rounded once; raw bytes in, bytes out."""
    import torch

    from ...tensors import TORCH_DTYPES, round_once, to_bytes
    n = math.prod(shape)
    src = torch.from_numpy(raw[: n * np.dtype(FLOAT_NP[dtype]).itemsize]).view(
        TORCH_DTYPES[dtype]).view(shape)
    ops = [op.cast(torch.float64) for op in ops]
    w = src.to(torch.float64, copy=True)
    apply_whole(w, ops)
    res = round_once(w, TORCH_DTYPES[out_dtype])
    check_finite(res, src, name, ops)
    return to_bytes(res)


class FastEngine:
    """float32 on a device (CUDA); the same code runs on the CPU in tests (``job.Engines``)."""

    precision = "fp32"
    _HOST_BUFFERS = 2  # pinned results: one being written while the next is copied back

    def __init__(self, device: str):
        import torch
        self.device = device
        self._dev = torch.device(device)
        self.pinned = self._dev.type == "cuda"
        self._hosts: queue.Queue = queue.Queue()
        self._made = 0

    def _acquire_host(self, nbytes: int):
        import torch
        if self._made < self._HOST_BUFFERS and self._hosts.empty():
            self._made += 1
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            buf = self._hosts.get()  # released by the writer thread once written
        if buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def run(self, raw, dtype: str, shape, ops, out_dtype: str, name: str):
        """Raw bytes in (numpy or pinned torch uint8), (bytes, release) out, like the exact
        engine's ``run``."""
        import torch

        from ...tensors import TORCH_DTYPES, to_bytes
        if not isinstance(raw, torch.Tensor):
            raw = torch.from_numpy(raw)
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        src = raw[:n].view(TORCH_DTYPES[dtype]).view(tuple(shape))
        res, release = self._run(src, ops, TORCH_DTYPES[out_dtype], name)
        return to_bytes(res), release

    def _run(self, src, ops, out_dtype, name: str):
        import torch
        if src.numel() == 0:
            return src.to(out_dtype), None
        compute = torch.float64 if torch.float64 in (src.dtype, out_dtype) else torch.float32
        w = src.to(self._dev, non_blocking=True)
        # A private copy: the source buffer must stay intact for the NaN check.
        w = w.to(compute, copy=w.data_ptr() == src.data_ptr())
        apply_whole(w, [op.cast(compute, self._dev) for op in ops])
        res = w.to(out_dtype)
        release = None
        if self._dev.type != "cpu":
            buf = self._acquire_host(res.numel() * res.element_size())
            host = buf[: res.numel() * res.element_size()].view(out_dtype).view(res.shape)
            host.copy_(res, non_blocking=True)
            torch.cuda.synchronize(self._dev)  # also orders the upload from ``src`` before reuse
            res = host

            def release(buf=buf):
                self._hosts.put(buf)
        try:
            check_finite(res, src, name, ops)
        except BaseException:
            if release is not None:
                release()
            raise
        return res, release
