"""torch <-> safetensors conversions. Importing this module imports torch."""

from __future__ import annotations

from typing import BinaryIO

import torch

from .errors import ContainerError
from .numerics import round_to_odd_f32
from .stfile import Header, TensorInfo, read_bytes

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64,
    "F64": torch.float64, "C64": torch.complex64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def st_dtype(t: torch.Tensor) -> str:
    try:
        return ST_DTYPES[t.dtype]
    except KeyError:
        raise ContainerError(f"dtype {t.dtype} cannot be stored in safetensors by loratool",
                             code="LT006") from None


def from_bytes(data, dtype: str, shape) -> torch.Tensor:
    """A tensor owning a copy of ``data`` (little-endian safetensors bytes)."""
    if dtype not in TORCH_DTYPES:
        raise ContainerError(f"dtype {dtype} has no torch equivalent", code="LT006")
    buf = bytearray(data)  # writable, so torch does not warn and callers may modify in place
    if not buf:
        return torch.empty(tuple(shape), dtype=TORCH_DTYPES[dtype])
    t = torch.frombuffer(buf, dtype=torch.uint8)
    return t.view(TORCH_DTYPES[dtype]).reshape(tuple(shape))  # reshape handles 0-dim scalars


def read_tensor(header: Header, info: TensorInfo, f: BinaryIO | None = None) -> torch.Tensor:
    return from_bytes(read_bytes(header, info, f), info.dtype, info.shape)


def to_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian contiguous bytes of a CPU tensor (no copy when already contiguous)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def round_once(x, dtype):
    """``x`` rounded once, to nearest-even, to ``dtype`` (float64 input gives the correctly
    rounded bf16/fp16/fp32 value; torch's ``.to`` alone double-rounds float64 -> bf16/fp16)."""
    if x.dtype == dtype:
        return x
    if x.dtype == torch.float64 and dtype in (torch.bfloat16, torch.float16):
        return round_to_odd_f32(x).to(dtype)
    return x.to(dtype)
