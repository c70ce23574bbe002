"""merge/unmerge arguments: adapter specs, device, output format and default names."""

from __future__ import annotations

import math
import os
import sys

from ...checkpoint import KIND_PICKLE, KIND_SHARDED
from ...errors import OperationError
from ...guards import PICKLE_SUFFIXES, parse_path_number, weighted_inputs

DTYPE_CHOICES = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
OUTPUT_FORMATS = ("safetensors", "pt")


def parse_adapter_spec(text: str) -> tuple[str, float]:
    """``"adapter.safetensors:0.5"`` -> ``("adapter.safetensors", 0.5)``.

    Paths may contain ``:``; only a trailing ``:<decimal number>`` is a scale, and only when
    ``text`` is not itself an existing path. ``"a:b.safetensors"`` is a path, scale 1.0.
    """
    return parse_path_number(text, what="scale", code="LT520")


def normalize_adapters(adapters) -> list[tuple[object, float]]:
    adapters = weighted_inputs(adapters, what="scale", code="LT520")
    out = []
    for item in adapters:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise OperationError(f"adapter entry {item!r} is not (adapter, scale)",
                                     code="LT520")
            src, scale = item
        else:
            src, scale = item, 1.0
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise OperationError(f"scale {scale!r} of adapter {src!r} is not a number",
                                 code="LT520") from None
        if not math.isfinite(scale):
            raise OperationError(f"scale {scale!r} of adapter {src!r} is not finite",
                                 code="LT520")
        out.append((os.fspath(src) if isinstance(src, (str, os.PathLike)) else src, scale))
    if not out:
        raise OperationError("no adapter given: pass at least one ADAPTER[:SCALE]",
                             code="LT520")
    return out


def resolve_device(device: str) -> str:
    """``auto``: CUDA when torch sees a device, else the CPU; decided without importing
    torch when the machine has no NVIDIA driver at all (``cuda_may_exist``)."""
    if device not in DEVICE_CHOICES:
        raise OperationError(f"device {device!r} is not one of {', '.join(DEVICE_CHOICES)}",
                             code="LT521")
    if device == "cpu" or (device == "auto" and not cuda_may_exist()):
        return "cpu"
    import torch
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise OperationError("--device cuda was asked for but torch sees no CUDA device; use "
                             "--device cpu (exact, float64) or auto", code="LT521")
    if device == "auto":
        return "cuda" if cuda else "cpu"
    return device


def cuda_may_exist() -> bool:
    """False when this machine certainly has no NVIDIA GPU (no driver nodes): then
    ``--device auto`` means the CPU and torch need not be imported to ask."""
    if "torch" in sys.modules:
        return True  # torch is loaded anyway: let it answer
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl",
                                            "/proc/driver/nvidia", "/dev/dxg"))


def output_format_for(kind: str, output: str | None, output_format: str | None) -> str:
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise OperationError(f"output format {output_format!r} is not one of "
                             f"{', '.join(OUTPUT_FORMATS)}", code="LT522")
    if kind == KIND_SHARDED:
        if output_format is not None or (output and output.lower().endswith(
                (".safetensors", *PICKLE_SUFFIXES))):
            raise OperationError("a sharded checkpoint is written as a sharded directory "
                                 "with the same layout; give -o a directory name and no "
                                 "--output-format", code="LT522")
        return "sharded"
    by_suffix = None
    if output:
        low = output.lower()
        by_suffix = ("pt" if low.endswith(PICKLE_SUFFIXES)
                     else "safetensors" if low.endswith(".safetensors") else None)
    if output_format and by_suffix and output_format != by_suffix:
        raise OperationError(f"--output-format {output_format} contradicts the suffix of "
                             f"{output}", code="LT522")
    return output_format or by_suffix or ("pt" if kind == KIND_PICKLE else "safetensors")


def default_output(base: str, kind: str, fmt: str, suffix: str) -> str:
    if kind == KIND_SHARDED:
        root = base if os.path.isdir(base) else os.path.dirname(os.path.abspath(base))
        return os.path.normpath(root) + suffix
    if os.path.isdir(base):  # a single-file model directory: the output goes beside it
        return os.path.normpath(base) + suffix + (".safetensors" if fmt == "safetensors"
                                                  else ".pt")
    stem, ext = os.path.splitext(base)
    if fmt == "safetensors":
        ext = ".safetensors"
    elif kind != KIND_PICKLE:
        ext = ".pt"
    return stem + suffix + ext
