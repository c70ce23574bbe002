"""The torch-free half of ``merge``: the exact (float64) CPU engine in numpy, and loading
loratool-format adapters as numpy arrays.

The exact engine is the one CPU engine of ``merge``/``unmerge`` whatever loaded the adapters
(numpy here, or torch for foreign formats, DoRA and in-memory ``Adapter`` objects): the
results are therefore bit-identical either way. Only DoRA tensors go through torch (they are
merged whole, as before). ``merge`` needs torch only when something asks for it: a foreign
adapter, DoRA, a ``.pt`` base or output, CUDA.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .. import format as F
from ..errors import CheckpointError

# Rows per block: ~2^18 float64 values (2 MiB) stay in cache through the
# convert -> matmul -> add -> round -> copy sequence, so each tensor crosses memory about twice.
BLOCK_ELEMS = 1 << 18
_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}


def cuda_may_exist() -> bool:
    """False when this machine certainly has no NVIDIA GPU (no driver nodes): then
    ``--device auto`` means the CPU and torch need not be imported to ask."""
    if "torch" in sys.modules:
        return True  # torch is loaded anyway: let it answer
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl",
                                            "/proc/driver/nvidia", "/dev/dxg"))


# --- loading loratool adapters without torch ---------------------------------------------------

def to_f64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 copy of ``raw`` (a numpy array of safetensors dtype ``dtype``; BF16 as
    uint16 bits). Exact."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def as_f64(t) -> np.ndarray | None:
    """A contiguous float64 numpy array of ``t`` (numpy array or torch tensor); exact."""
    if t is None:
        return None
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float64)
    import torch  # a torch tensor: torch is loaded already
    return t.detach().to("cpu", torch.float64).contiguous().numpy()


@dataclass
class NpModule:
    """The parts of ``model.LoraModule`` that ``merge`` uses, with numpy tensors."""

    info: object  # ModuleInfo, from the header
    A: np.ndarray
    B: np.ndarray
    bias: np.ndarray | None = None
    magnitude: None = None

    @property
    def scale(self) -> float:
        return self.info.scale

    def factors(self):
        r = self.info.rank
        return self.B.reshape(self.B.shape[0], r), self.A.reshape(r, -1)


@dataclass
class NpAdapter:
    modules: dict
    identity: str
    source_format: str = "loratool"


def header_allows_numpy(path: str) -> bool:
    """True when ``path`` is a loratool-format adapter without DoRA modules (header only)."""
    from ..interop.native import read_info as read_loratool_info
    from ..interop import detect_format
    try:
        if detect_format(path) != "loratool":
            return False
        info = read_loratool_info(path)
    except Exception:  # noqa: BLE001 - the torch path reports the problem with its own error
        return False
    return not any(m.magnitude for m in info.modules.values())


def load_numpy(path: str) -> NpAdapter:
    """A loratool-format adapter as numpy arrays, with every check of ``load_loratool``.

    Its identity equals ``merge.adapter_identity`` of the torch-loaded adapter: the canonical
    tensors of a loratool file are exactly its tensors, so their hash is the file's data hash.
    """
    from ..interop.native import read_tensors as read_loratool_tensors
    from ..stfile import NUMPY_DTYPES
    info, raw, digest = read_loratool_tensors(path)
    arrays = {}
    for name, (t, data) in raw.items():
        a = np.frombuffer(data, dtype=np.dtype(NUMPY_DTYPES[t.dtype]).newbyteorder("<"))
        if t.dtype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)  # exact
        arrays[name] = a.reshape(t.shape)
    modules = {}
    for name, m in sorted(info.modules.items()):
        get = lambda role: arrays.get(F.tensor_name(name, role))  # noqa: E731
        modules[name] = NpModule(m, get(F.ROLE_A), get(F.ROLE_B), get(F.ROLE_BIAS))
    table = {n: {"kind": m.info.kind, "layout": m.info.layout, "scale": float(m.scale)}
             for n, m in modules.items()}
    doc = F.canonical_json({"modules": table, "tensor_hash": digest})
    return NpAdapter(modules, "sha256:" + hashlib.sha256(doc.encode("ascii")).hexdigest())


# --- rounding ------------------------------------------------------------------------------------

def round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd (as ``tensors.round_to_odd_f32``, in numpy)."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(np.float32)
        back = y.astype(np.float64)
    inexact = back != x
    bits = y.view(np.int32)
    bits -= (inexact & (np.abs(back) > np.abs(x))).astype(np.int32)  # step toward zero
    bits |= inexact.astype(np.int32)
    return y


def f32_to_bf16_bits(y: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, to nearest even (overflow to Inf; NaN -> 0x7FC0, like torch)."""
    bits = y.view(np.uint32)
    out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(y)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def round_into(dst: np.ndarray, x: np.ndarray, out_dtype: str) -> None:
    """``dst[...] = RN_out_dtype(x)`` for float64 ``x``: one rounding."""
    with np.errstate(over="ignore", invalid="ignore"):
        if out_dtype == "F64":
            dst[...] = x
        elif out_dtype == "F32":
            dst[...] = x  # numpy's float64 -> float32 cast rounds to nearest even
        elif out_dtype == "F16":
            dst[...] = round_to_odd_f32(x)  # float32 -> float16 rounds to nearest even
        else:
            dst[...] = f32_to_bf16_bits(round_to_odd_f32(x))


def as_float(dst: np.ndarray, out_dtype: str) -> np.ndarray:
    if out_dtype == "BF16":
        return (dst.astype(np.uint32) << 16).view(np.float32)
    return dst


def _any_nonfinite(dst: np.ndarray, out_dtype: str) -> bool:
    if out_dtype == "BF16":
        return bool(((dst & 0x7F80) == 0x7F80).any())
    with np.errstate(over="ignore", invalid="ignore"):
        return not math.isfinite(float(dst.sum(dtype=np.float64 if out_dtype == "F64"
                                                else np.float32)))


def _raise_produced(bad: int, name: str, ops) -> None:
    mods = sorted({op.module for op in ops})
    raise CheckpointError(
        f"merging into `{name}` produced {bad} NaN/Inf value(s) (modules "
        f"{', '.join(mods[:5])}): the adapter has huge or non-finite values or the scale "
        "is too large for the stored dtype; nothing was written", code="LT412")


# --- the engine ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _blas_local_threads():
    """OpenBLAS's ``openblas_set_num_threads_local`` of numpy's BLAS (0.3.27+), or None.

    The engine runs one worker per core; each worker's small matmuls must not start OpenBLAS's
    own threads as well (they spin-wait and fight the workers for the cores: measured 2x
    slower on 2 cores). The setting is per calling thread, so no global state changes.
    """
    import ctypes
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f
                     if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths, key=lambda p: not p.startswith(numpy_dir)):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


@contextmanager
def _one_blas_thread():
    fn = _blas_local_threads()
    before = fn(1) if fn is not None else None
    try:
        yield
    finally:
        if fn is not None:
            fn(before)


class NumpyExactEngine:
    """CPU, float64, rounded once; blocked by rows so each tensor crosses memory ~twice.

    Row blocks are shared out to one Python worker thread per core (numpy releases the GIL
    in its loops and in BLAS). ``run`` takes the raw bytes of a tensor (a numpy uint8 array)
    and returns the bytes of the result.
    """

    device = "cpu"
    precision = "fp64"
    pinned = False

    def __init__(self, workers: int | None = None):
        from .merge import _cores
        self.workers = workers or _cores()
        self._pool = None
        self._scratch: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def run(self, raw, dtype: str, shape, ops, out_dtype: str, name: str):
        """(bytes of the merged tensor, release callback or None). ``raw`` is overwritten
        when the dtype is kept (the result is written in place)."""
        n = math.prod(shape)
        if n == 0:
            return memoryview(b""), None
        if any(op.kind == "dora" for op in ops):
            return self._run_torch(raw, dtype, shape, ops, out_dtype, name), None
        src = raw[: n * np.dtype(_NP[dtype]).itemsize].view(_NP[dtype]).reshape(shape)
        out = src if out_dtype == dtype else np.empty(shape, dtype=_NP[out_dtype])
        w2 = src.reshape(shape[0] if len(shape) else 1, -1)
        o2 = out.reshape(w2.shape)
        rows, cols = w2.shape
        # The scale goes into the left factor: delta = (s L) @ R, one rounding per entry of
        # s L; the sum stays within the bound of spec/merge.md G1 (rank + 2 operations).
        ops = [_NpOp(op.kind, op.scale, op.module,
                     None if op.L is None else as_f64(op.L) * op.scale, as_f64(op.R),
                     as_f64(op.vec)) for op in ops]
        step = max(1, BLOCK_ELEMS // max(cols, 1))
        blocks = -(-rows // step)
        k = min(self.workers, blocks)
        if k <= 1:
            self._rows(0, 0, rows, step, w2, o2, dtype, ops, out_dtype, name)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.workers,
                                                thread_name_prefix="loratool-merge")
            per = -(-blocks // k) * step
            futures = [self._pool.submit(self._rows, q, q * per, min(rows, (q + 1) * per),
                                         step, w2, o2, dtype, ops, out_dtype, name)
                       for q in range(k)]
            for f in futures:
                f.result()  # re-raises a worker's error (LT412) here
        return memoryview(out.reshape(-1).view(np.uint8)), None

    def _rows(self, *args) -> None:
        with _one_blas_thread():
            self._rows_1(*args)

    def _rows_1(self, q, lo, hi, step, w2, o2, dtype, ops, out_dtype, name) -> None:
        cols = w2.shape[1]
        have = self._scratch.get(q)
        if have is None or have[0].size < step * cols:
            have = self._scratch[q] = (np.empty(step * cols), np.empty(step * cols))
        buf, tmp_buf = have
        lowrank = [op for op in ops if op.kind == "lowrank"]
        vectors = [op for op in ops if op.kind != "lowrank"]
        for i in range(lo, hi, step):
            j = min(hi, i + step)
            blk = buf[: (j - i) * cols].reshape(j - i, cols)
            w = w2[i:j]
            if dtype == "BF16":
                w = (w.astype(np.uint32) << 16).view(np.float32)
            if lowrank:
                # blk = delta_1 + W (= W + delta_1: addition commutes), then + delta_2 ...;
                # the float64 matmul writes straight into the block, W is converted on the fly
                np.matmul(lowrank[0].L[i:j], lowrank[0].R, out=blk)
                blk += w
                for op in lowrank[1:]:
                    tmp = tmp_buf[: (j - i) * cols].reshape(j - i, cols)
                    np.matmul(op.L[i:j], op.R, out=tmp)
                    blk += tmp
            else:
                blk[...] = w
            for op in vectors:  # vector op on a 1-D tensor, viewed as [n, 1]
                blk += op.vec[i:j].reshape(-1, 1) * op.scale
            dst = o2[i:j]
            round_into(dst, blk, out_dtype)
            if _any_nonfinite(dst, out_dtype):  # rare: look closer
                self._check_block(dst, blk, ops, i, j, name, out_dtype)

    @staticmethod
    def _check_block(dst, blk, ops, i, j, name, out_dtype) -> None:
        """LT412 for a block whose output holds NaN/Inf that the base did not (the base is
        inferred: a non-finite base entry makes the float64 sum non-finite, unless the
        delta itself is)."""
        delta = np.zeros_like(blk)
        with np.errstate(over="ignore", invalid="ignore"):
            for op in ops:
                if op.kind == "lowrank":
                    delta += op.L[i:j] @ op.R  # L holds s L
                else:
                    delta += op.vec[i:j].reshape(-1, 1) * op.scale
        produced = ~np.isfinite(as_float(dst, out_dtype)) & (np.isfinite(blk)
                                                              | ~np.isfinite(delta))
        bad = int(produced.sum())
        if bad:
            _raise_produced(bad, name, ops)

    @staticmethod
    def _run_torch(raw, dtype, shape, ops, out_dtype, name):
        """DoRA (torch-loaded adapters only): the whole tensor in float64 with torch."""
        import torch

        from ..tensors import TORCH_DTYPES, round_once, to_bytes
        from .merge import _apply_whole, _check_finite
        n = math.prod(shape)
        src = torch.from_numpy(raw[: n * np.dtype(_NP[dtype]).itemsize]).view(
            TORCH_DTYPES[dtype]).view(shape)
        ops = [op.cast(torch.float64) for op in ops]
        w = src.to(torch.float64, copy=True)
        _apply_whole(w, ops)
        res = round_once(w, TORCH_DTYPES[out_dtype])
        _check_finite(res, src, name, ops)
        return to_bytes(res)


@dataclass
class _NpOp:
    kind: str
    scale: float
    module: str
    L: np.ndarray | None
    R: np.ndarray | None
    vec: np.ndarray | None
