"""One merge or unmerge, start to end: a ``MergeJob`` (the validated arguments) run by ``run``.

``Engines`` is the internal switchboard of the engines (tests pick the float32 torch engine
on the CPU, the torch or numpy adapter loader, the worker count); the public ``merge`` and
``unmerge`` take none of it.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

from ... import format as F
from ...atomic import check_destination
from ...checkpoint import (KIND_SHARDED, TIED_KEY, checkpoint_kind, list_tensors, open_source,
                           resolve_checkpoint, sidecar_path)
from ...errors import CheckpointError, OperationError
from ...stfile import DTYPE_SIZES
from .exact import NumpyExactEngine, cores
from .npadapter import header_allows_numpy
from .options import (DTYPE_CHOICES, default_output, normalize_adapters, output_format_for,
                      resolve_device)
from .plan import Loaded, load_item, make_plan, reader_options
from .provenance import (adapter_identity, adapter_record, checkpoint_metadata, match_unmerge,
                         merge_records, new_record)
from .streaming import Counts, stream_file
from .writers import write_pickle, write_sharded


@dataclass(frozen=True)
class Engines:
    """Which engine and loader a job uses; ``None`` means "what the device asks for"."""

    precision: str | None = None  # "fp64": the exact numpy engine; "fp32": torch's float32
    numpy_loader: bool | None = None  # True: loratool files read by numpy (no torch)
    workers: int | None = None  # exact engine threads (default: one per core but one)
    fast: bool = True  # False: the exact engine's reference kernel for every block
    compiled: bool | None = None  # the compiled kernel: False never, True required


@dataclass
class MergeJob:
    """The arguments of ``merge``/``unmerge``, as given."""

    op: str  # "merge" or "unmerge"
    base: object
    adapters: object
    output: object = None
    device: str = "auto"
    dtype: str = "keep"
    name_map: object = None
    allow_missing: bool = False
    overwrite: bool = False
    fsync: bool = False
    progress: object = None
    output_format: str | None = None
    force: bool = False
    adapter_options: dict | None = None
    gguf_type: str | None = None  # GGUF bases only: GGML type of every merged tensor
    allow_no_change: bool = False
    engines: Engines = field(default_factory=Engines)


@dataclass
class MergeReport:
    """What ``merge``/``unmerge`` did; ``to_dict()`` is the CLI's ``--json``."""

    operation: str
    base: str
    output: str
    output_format: str
    device: str
    precision: str
    dtype: str
    adapters: list[dict]
    modules_merged: int
    tensors_merged: int
    tensors_converted: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float  # the whole call: loading adapters (and torch), planning, streaming
    stream_seconds: float  # reading, merging and writing the tensors
    skipped: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    replacements_merged: int = 0  # base tensors (or rows of them) replaced (format 1.1)
    dropped: list[dict] = field(default_factory=list)  # {"adapter", "tensor"}: not applied
    fp8: dict | None = None  # merges into FP8 weights: retained delta (fp8_base.Fp8Base.report)

    def to_dict(self) -> dict:
        return asdict(self)




def run(job: MergeJob) -> MergeReport:
    """Do ``job``: check the arguments, load and plan, stream the output, report."""
    from ...naming import parse_map
    t0 = time.perf_counter()
    op = job.op
    base = os.fspath(job.base)
    if not os.path.exists(base):
        raise CheckpointError(f"base checkpoint {base} does not exist", code="LT401")
    from .gguf_base import is_gguf_base, run_gguf
    if is_gguf_base(base):
        return run_gguf(job)
    if job.gguf_type is not None:
        raise OperationError("gguf_type (--gguf-type) applies to GGUF bases only",
                             code="LT522")
    if job.dtype not in DTYPE_CHOICES:
        raise OperationError(f"dtype {job.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}",
                             code="LT522")
    items = normalize_adapters(job.adapters)
    name_map = job.name_map
    if isinstance(name_map, (list, tuple)):
        name_map = parse_map(name_map)
    given = base
    base = resolve_checkpoint(base)  # a model directory with one model.safetensors: that file
    kind = checkpoint_kind(base)
    output = os.fspath(job.output) if job.output is not None else None
    fmt = output_format_for(kind, output, job.output_format)
    dest = output if output is not None else default_output(
        given if base != given else base, kind, fmt, "-merged" if op == "merge" else "-unmerged")
    base_root = (base if os.path.isdir(base) else os.path.dirname(os.path.abspath(base))) \
        if kind == KIND_SHARDED else base
    inputs = [given, base, base_root] + [src for src, _ in items if isinstance(src, str)]
    check_destination(dest, overwrite=job.overwrite, inputs=inputs)
    if fmt == "pt":
        check_destination(sidecar_path(dest), overwrite=True, inputs=inputs)
    device = resolve_device(job.device)
    engine, use_numpy = _engine(job.engines, device, items,
                                reader_options("foreign", base, name_map, job.adapter_options))
    precision = engine.precision

    source = None
    with ExitStack() as stack:
        # The base: names, dtypes and shapes (headers only for safetensors).
        listed = None
        if kind == KIND_SHARDED:
            listed = list_tensors(base)
            base_tensors = {n: (t.dtype, t.shape) for n, t in listed.items()}
            metadata = checkpoint_metadata(base)
        else:
            source = stack.enter_context(open_source(base))
            base_tensors = {t.name: (t.dtype, t.shape) for t in source.tensors}
            metadata = dict(source.metadata)
        records = merge_records(metadata, path=base)
        from .sd_single import is_ldm
        # a single-file SD checkpoint: adapters name diffusers paths, mapped below (read
        # without the base, whose LDM names they would not find)
        ldm = kind != KIND_SHARDED and is_ldm(base_tensors)
        from .fp8_base import prepare as prepare_fp8
        fp8 = prepare_fp8(base_tensors, job.dtype, source, listed)

        loaded = []
        for src, scale in items:
            adapter, label, sfmt, dropped, reader_notes = load_item(
                src, None if ldm else base, name_map, job.adapter_options, numpy=use_numpy)
            identity = adapter.identity if use_numpy else adapter_identity(adapter)
            loaded.append(Loaded(label, sfmt, adapter, scale, identity, dropped=dropped,
                                 notes=reader_notes))
        if op == "unmerge":
            _refuse_dora_unmerge(loaded)
            _refuse_replacement_unmerge(loaded)
        residual_notes = []
        if op == "merge":
            from .._residual import check_residual, init_of
            residual_notes = check_residual(
                [(ld.source, init_of(ld.source, ld.adapter)) for ld in loaded],
                bool((job.adapter_options or {}).get("base_is_residual")))
        from .._tied import tied_names
        tied_map, tied_notes = tied_names(base, base_tensors, loaded, name_map)
        residual_notes += tied_notes
        sd_map = _ldm_names(base_tensors, loaded, job.allow_missing, residual_notes) \
            if ldm else {}
        plan, skipped = make_plan(loaded, base_tensors,
                                  {**tied_map, **sd_map, **(name_map or {})},
                                  sign=1.0 if op == "merge" else -1.0,
                                  allow_missing=job.allow_missing, base_label=base)
        if not plan and not job.allow_no_change:
            raise OperationError(_no_change_message(op, loaded, skipped, base), code="LT431")
        notes = tie_plan(plan, getattr(source, "tied", ()), fmt)
        notes += residual_notes + [f"{ld.source}: {n}" for ld in loaded
                                  for n in (ld.notes or [])]
        if op == "merge":
            records = records + [new_record("merge", loaded, device, precision, job.dtype)]
        else:
            records, unmatched = match_unmerge(records, loaded, force=job.force, path=base)
            if unmatched:
                records.append(new_record("unmerge", unmatched, device, precision, job.dtype))
                notes.append("forced: " + ", ".join(ld.source for ld in unmatched)
                             + " did not match the merge record; recorded as an unmerge")
        metadata = {k: v for k, v in metadata.items() if k not in (F.KEY_MERGED, TIED_KEY)}
        if records:
            metadata[F.KEY_MERGED] = F.canonical_json(records)
        tied = getattr(source, "tied", ())
        if tied and fmt == "safetensors":  # untied in the file: remember the groups
            metadata[TIED_KEY] = F.canonical_json(tied)

        total = sum(math.prod(s) * DTYPE_SIZES[d] for d, s in base_tensors.values())
        progress = job.progress

        def tick(n: int) -> None:
            if progress is not None:
                progress(n, total)

        counts = Counts()
        out_dtype = DTYPE_CHOICES[job.dtype]
        kw = dict(overwrite=job.overwrite, fsync=job.fsync, tick=tick)
        t_stream = time.perf_counter()
        if isinstance(engine, NumpyExactEngine):
            stack.callback(engine.close)  # its worker pool, however the streaming ends
        if fp8 is not None:  # FP8 weights: dequantized, merged, requantized (fp8_base)
            engine = fp8.wrap(engine)
        if kind == KIND_SHARDED:
            write_sharded(base, dest, plan, out_dtype, metadata, engine, counts, **kw)
        elif fmt == "safetensors":
            stream_file(source, dest, plan, out_dtype, metadata, engine, counts, **kw)
        else:
            write_pickle(source, dest, plan, out_dtype, metadata, engine, counts, **kw)
        t_stream = time.perf_counter() - t_stream
        if fp8 is not None:
            notes += fp8.notes()
    return MergeReport(
        operation=op, base=base, output=dest, output_format=fmt, device=device,
        precision=precision, dtype=job.dtype,
        adapters=[dict(adapter_record(ld), source=ld.source, skipped=ld.skipped)
                  for ld in loaded],
        modules_merged=sum(ld.merged for ld in loaded), tensors_merged=counts.merged,
        tensors_converted=counts.converted, tensors_copied=counts.copied,
        bytes_read=counts.read, bytes_written=counts.written,
        seconds=round(time.perf_counter() - t0, 3), stream_seconds=round(t_stream, 3),
        skipped=skipped, records=records, notes=notes,
        replacements_merged=sum(ld.replaced for ld in loaded),
        dropped=[{"adapter": ld.source, "tensor": t} for ld in loaded
                 for t in (ld.dropped or [])],
        fp8=None if fp8 is None else fp8.report())


def _ldm_names(base_tensors, loaded, allow_missing: bool, notes: list) -> dict:
    """sd-scripts' diffusers/LDM name mapping into a single-file SD checkpoint."""
    from .sd_single import name_map
    names = {n for ld in loaded for n in ld.adapter.modules}
    mapping, fused = name_map(base_tensors, sorted(names))
    if mapping:
        notes.append(f"{len(mapping)} module(s) mapped to the single-file (LDM) names as "
                     "sd-scripts does")
        for ld in loaded:  # LyCORIS conv factors stored flattened: the kernel from the base
            _shape_from_base(ld.adapter, mapping, base_tensors)
    if fused and not allow_missing:
        raise CheckpointError(
            f"{len(fused)} module(s) adapt q/k/v of the second text encoder ("
            + ", ".join(fused[:5]) + "), which a single-file SDXL checkpoint stores fused in "
            "one in_proj_weight (OpenCLIP): merge into a diffusers pipeline directory, or "
            "pass --allow-missing to skip them (listed in the report)", code="LT411")
    return mapping


def _shape_from_base(adapter, mapping: dict, base_tensors: dict) -> None:
    record_of = getattr(adapter, "modules", {})
    for name, m in list(record_of.items()):
        rec = getattr(m, "record", None)
        target = base_tensors.get(mapping.get(name, "") + ".weight")
        if rec is None or rec.shape_known or target is None or len(target[1]) < 3:
            continue
        from ...lycoris import parse_module
        from ...lycoris.native import as_module
        record_of[name] = as_module(name, parse_module(rec.name, dict(rec.tensors),
                                                       shape=tuple(target[1])))


def tie_plan(plan: dict, tied, fmt: str) -> list[str]:
    """Tensors that are one tensor in the base (tied weights in shared storage) get the same
    updates, all of them (a delta for any name is a delta for the one tensor): otherwise the
    copy left unmerged wins when ``load_state_dict`` fills the tied parameter. Returns notes."""
    notes = []
    for group in tied:
        names = [n for n in group if n in plan]
        if not names:
            continue
        ops = [op for n in group for op in plan.get(n, ())]
        for n in group:
            plan[n] = ops
        where = ("kept tied (one storage) in the .pt output" if fmt == "pt"
                 else "each carries the merged value")
        notes.append(f"tied weights: {', '.join(f'`{n}`' for n in group)} share one storage "
                     f"in the base; the update of {', '.join(f'`{n}`' for n in names)} was "
                     f"applied to the shared tensor, {where}")
    return notes


def _engine(engines: Engines, device: str, items, options):
    """(engine, whether the adapters are read by numpy); ``options``: the foreign readers'."""
    precision = engines.precision or ("fp64" if device == "cpu" else "fp32")
    if precision == "fp64":
        # one core is left to the reader and writer threads: with the compiled kernel the
        # merge is bound by their copies (2 cores: 1 worker measured as fast or faster, with
        # less CPU, than 2; benchmarks/README.md)
        workers = engines.workers or max(1, cores() - 1)
        engine = NumpyExactEngine(workers, fast=engines.fast, compiled=engines.compiled)
    else:
        from .torch_engine import FastEngine
        engine = FastEngine(device)
    # Loading the adapters as numpy arrays (no torch) when the engine is the exact one and
    # every adapter is a safetensors file (loratool, PEFT, kohya) without DoRA or replacement
    # entries; the engine, and so every output byte, is the same either way.
    can = precision == "fp64" and all(
        isinstance(src, str) and header_allows_numpy(src, options) for src, _ in items)
    if engines.numpy_loader and not can:
        raise OperationError("the numpy loader needs the exact CPU path and safetensors "
                             "adapter files (loratool, PEFT, kohya) without DoRA or "
                             "replacement entries", code="LT522")
    use_numpy = can if engines.numpy_loader is None else engines.numpy_loader
    return engine, use_numpy


def _refuse_dora_unmerge(loaded) -> None:
    dora = [f"{ld.source}: {m}" for ld in loaded
            for m, mod in ld.adapter.modules.items() if mod.magnitude is not None
            or (getattr(mod, "record", None) is not None and not mod.variant.additive)]
    if dora:
        raise CheckpointError(
            f"cannot unmerge DoRA modules ({len(dora)}: " + ", ".join(dora[:5])
            + (f" ({len(dora) - 5} more)" if len(dora) > 5 else "") + "): a DoRA merge "
            "rescales each output row by magnitude / ||W0 + dW||, a norm of the "
            "original weight W0 that the merged file no longer holds, so the merge "
            "cannot be inverted from the files. Keep the base checkpoint instead.",
            code="LT414")


def _refuse_replacement_unmerge(loaded) -> None:
    reps = [f"{ld.source}: {t}" for ld in loaded
            for t in (getattr(ld.adapter, "replacements", None) or {})]
    if reps:
        more = f" ({len(reps) - 5} more)" if len(reps) > 5 else ""
        raise CheckpointError(
            "cannot unmerge replacement entries (" + ", ".join(reps[:5]) + more + "): a merge "
            "overwrote these base tensors (PEFT modules_to_save, trained biases, saved "
            "embeddings or trainable token rows) and the merged file no longer holds their "
            "original values, so the merge cannot be inverted. Keep the base checkpoint "
            "instead.", code="LT430")


def _no_change_message(op: str, loaded, skipped, base: str) -> str:
    why = []
    if skipped:
        why.append(f"{len(skipped)} module(s) skipped (--allow-missing): the adapter may be "
                   "for another model")
    dropped = sum(len(ld.dropped or []) for ld in loaded)
    if dropped:
        why.append(f"{dropped} tensor(s) dropped (--allow-unknown)")
    if not why:
        why.append("the adapters have no module")
    return (f"the {op} would change no tensor of {base} ({'; '.join(why)}): the output would "
            "be a copy of the input. Pass --allow-no-change (allow_no_change=True) to write it "
            "anyway")


def run_with(engines: Engines, op: str, base, adapters, **options) -> MergeReport:
    """``merge``/``unmerge`` (``op``) with the engines chosen: the internal API of tests and
    benchmarks."""
    return run(MergeJob(op, base, adapters, engines=engines, **options))
