"""``merge``/``unmerge`` into a GGUF base (llama.cpp): the arguments of a ``MergeJob`` handed
to ``loratool.gguf.merge_gguf``, which streams one tensor at a time (spec/gguf.md section 4).

Adapters of any format are read into the canonical model and mapped to GGUF tensor names
(q/k rows permuted with the base's head counts); GGUF adapters are taken by their own names
and row order, with no round trip. The report carries the retained delta per tensor and
overall: ``retained`` = ||eff|| / ||delta|| and ``kept`` = <eff, delta> / ||delta||^2,
where eff = decode(output) - W is what the written file really changed.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field

from ...errors import OperationError

# --dtype of merge -> GGML type name (keep: each tensor in its base type)
_DTYPES = {"keep": "keep", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_UNMERGE_TYPES = ("F32", "F16", "BF16")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}$")


def is_gguf_base(path) -> bool:
    """Whether ``path`` is a GGUF file (or one part of a split set): magic ``GGUF``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass
class GGUFMergeReport:
    """What a merge into a GGUF base did; ``to_dict()`` is the CLI's ``--json``."""

    operation: str
    base: str
    output: str
    output_type: str          # "keep" or a GGML type name
    adapters: list[dict]
    tensors_merged: int
    tensors_copied: int
    retained: float | None    # overall ||eff|| / ||delta||
    kept: float | None        # overall <eff, delta> / ||delta||^2
    rel_error: float | None   # overall ||eff - delta|| / ||delta||
    tensors: list[dict]       # per tensor: name, base_type, out_type, norms, the three ratios
    seconds: float
    parts: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_format: str = "gguf"

    def to_dict(self) -> dict:
        return asdict(self)


def _out_type(job) -> str:
    gtype = getattr(job, "gguf_type", None)
    if job.dtype not in _DTYPES:
        raise OperationError(f"dtype {job.dtype!r} is not one of {', '.join(_DTYPES)}",
                             code="LT522")
    if gtype is not None:
        if gtype.lower() not in GGUF_TYPES:
            raise OperationError(f"GGUF type {gtype!r} is not one of {', '.join(GGUF_TYPES)}",
                                 code="LT522")
        if job.dtype != "keep" and _DTYPES[job.dtype] != gtype.upper():
            raise OperationError(f"--dtype {job.dtype} contradicts --gguf-type {gtype}",
                                 code="LT522")
        return gtype.upper()
    return _DTYPES[job.dtype]


def _check_options(job) -> None:
    bad = [flag for flag, on in (("--output-format", job.output_format is not None),
                                 ("--device cuda", job.device == "cuda"),
                                 ("--fsync", job.fsync)) if on]
    if bad:
        raise OperationError(f"{', '.join(bad)}: not available for a GGUF base (GGUF merges "
                             "run on the CPU in float64 and write one GGUF file)",
                             code="LT522")


def default_output(base: str, suffix: str) -> str:
    stem = _SPLIT.sub("", os.path.splitext(base)[0])  # a split set becomes one file
    return stem + suffix + ".gguf"


def _factors(item, scale, header, arch, job, skipped):
    """(label, format, factors under GGUF names with B in GGUF row order)."""
    from ...gguf import LoraFactors, read_gguf_adapter
    from ...interop import detect_format
    from ...interop.gguf import factors_of, refuse_unwritable
    if isinstance(item, str) and detect_format(item) == "gguf":
        info, fs = read_gguf_adapter(item, hf_names=False)
        if info.architecture != arch.arch:
            raise OperationError(f"{item} is an adapter for {info.architecture!r} but the base "
                                 f"is {arch.arch!r}", code="LT327")
        return item, "gguf", [LoraFactors(f.name, f.A, f.B, f.scale * scale, f.kind)
                              for f in fs]
    from ...adapter import load_adapter
    from ...interop._common import rename_modules
    if hasattr(item, "modules"):
        adapter, label, fmt = item, "<in memory>", getattr(item, "source_format", "loratool")
    else:
        adapter, label = load_adapter(item, **(job.adapter_options or {})), item
        fmt = adapter.source_format
    from ...naming import parse_map
    name_map = parse_map(job.name_map) if isinstance(job.name_map, (list, tuple)) \
        else job.name_map
    adapter, _ = rename_modules(adapter, name_map or None)
    try:
        refuse_unwritable(adapter)
    except Exception as e:  # the same reasons, said of a merge
        raise OperationError(str(getattr(e, "message", e)).replace(
            "cannot be written to a GGUF LoRA", "cannot be merged into a GGUF base"),
            code="LT329") from None
    fs = [LoraFactors(f.name, f.A, f.B, f.scale * scale, f.kind) for f in factors_of(adapter)]
    return label, fmt, _to_gguf_names(fs, header, arch, job, label, skipped)


def _to_gguf_names(fs, header, arch, job, label, skipped):
    from ...gguf import LoraFactors, hf_to_gguf_names
    from ...gguf.names import hf_to_gguf_names_lenient, to_gguf_b
    if not job.allow_missing:
        names = hf_to_gguf_names([f.name for f in fs], arch.arch)  # LT328 lists the unmapped
    else:
        names = hf_to_gguf_names_lenient([f.name for f in fs], arch.arch)
    out = []
    for f in fs:
        g = names.get(f.name)
        t = header.tensors.get(g) if g else None
        B = to_gguf_b(f.B, g, arch) if t is not None else f.B
        want = (B.shape[0], f.A.shape[1])
        if t is not None and (f.kind == "embedding" or g == "token_embd.weight"):
            want = want[::-1]
        if job.allow_missing and (t is None or t.shape != want):
            why = ("no GGUF tensor name" if g is None else f"{g} not in the base" if t is None
                   else f"{g} is {t.shape}, the delta {want}")
            skipped.append({"adapter": label, "module": f.name, "reason": why})
            continue
        out.append(LoraFactors(g, f.A, B, f.scale, f.kind))
    return out


def run_gguf(job) -> GGUFMergeReport:
    """Merge (or unmerge: F32/F16/BF16 tensors only) ``job``'s adapters into a GGUF base."""
    from ...gguf import arch_from_gguf, merge_gguf, read_gguf
    from .options import normalize_adapters
    t0 = time.perf_counter()
    _check_options(job)
    base = os.fspath(job.base)
    out_type = _out_type(job)
    header = read_gguf(base)
    arch = arch_from_gguf(header)
    items = normalize_adapters(job.adapters)
    sign = 1.0 if job.op == "merge" else -1.0
    skipped: list[dict] = []
    factors, adapters = [], []
    for item, scale in items:
        label, fmt, fs = _factors(item, scale * sign, header, arch, job, skipped)
        factors += fs
        adapters.append({"source": label, "format": fmt, "scale": scale, "modules": len(fs)})
    notes = []
    if job.op == "unmerge":
        if out_type not in ("keep", *_UNMERGE_TYPES):
            raise OperationError(f"unmerge writes the merged file's own types; "
                                 f"{out_type} was asked for", code="LT522")
        quant = sorted({f"{f.name} ({header.tensors[f.name].type_name})" for f in factors
                        if f.name in header.tensors
                        and header.tensors[f.name].type_name not in _UNMERGE_TYPES})
        if quant:
            raise OperationError(
                f"cannot unmerge from {len(quant)} quantized tensor(s) ("
                + ", ".join(quant[:5]) + "): requantizing erased part of the delta and "
                "rounded the rest, so subtracting it does not give the base back. Keep the "
                "base GGUF instead", code="LT335", path=base)
        notes.append("GGUF files carry no merge record: the adapters and scales were not "
                     "checked against the merge (subtracted in float64, rounded once)")
    output = os.fspath(job.output) if job.output is not None else default_output(
        base, "-merged" if job.op == "merge" else "-unmerged")
    inputs = [src for src, _ in items if isinstance(src, str)]
    from ...atomic import check_destination
    check_destination(output, overwrite=job.overwrite, inputs=inputs + list(header.parts))
    rep = merge_gguf(base, output, factors, arch=arch, names="gguf", out_type=out_type,
                     overwrite=job.overwrite)
    return GGUFMergeReport(
        operation=job.op, base=base, output=output, output_type=out_type.lower(),
        adapters=adapters, tensors_merged=len(rep.tensors), tensors_copied=rep.copied,
        retained=rep.retained, kept=rep.kept, rel_error=rep.rel_error,
        tensors=[asdict(t) for t in rep.tensors], seconds=round(time.perf_counter() - t0, 3),
        parts=list(rep.parts), skipped=skipped, notes=notes)
