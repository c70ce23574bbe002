"""Merging into a diffusers pipeline directory (``model_index.json`` + ``unet/``,
``text_encoder/``, ...): one command, each adapter module routed to its component.

sd-scripts (kohya) and LyCORIS name the part of the model first: ``lora_unet_*`` is the UNet
(or, for files trained on a transformer, ``transformer/``), ``lora_te_*``/``lora_te1_*`` the
first text encoder and ``lora_te2_*`` the second (SDXL); diffusers' own files say
``unet.``/``text_encoder.``/``text_encoder_2.``. Each adapter is read once per component
against that component's weights (names dotted, conv shapes known, as ``--base`` does), its
modules of that part are merged by the ordinary merge of that component's checkpoint, and the
output is a pipeline directory with every other file copied. A module of a part the pipeline
does not have is refused (LT411) unless ``allow_missing``, which lists it.
"""

from __future__ import annotations

import os
import shutil
from ...errors import CheckpointError, OperationError

MODEL_INDEX = "model_index.json"
# component folder -> the first segments of the module names it takes
PARTS = {"unet": ("unet",), "transformer": ("transformer", "unet"),
         "text_encoder": ("text_encoder", "te", "te1"), "text_encoder_2": ("text_encoder_2", "te2"),
         "text_encoder_3": ("text_encoder_3", "te3")}
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
            "diffusion_pytorch_model.bin", "pytorch_model.bin")


def is_pipeline(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


def components(path: str) -> dict[str, str]:
    """Component folder -> its weights (file, or the folder of a sharded checkpoint), for the
    components of ``model_index.json`` that have weights."""
    from ...checkpoint import find_index
    from ...interop._common import read_json_config
    index = read_json_config(os.path.join(path, MODEL_INDEX))
    out = {}
    for name in sorted(index):
        sub = os.path.join(path, name)
        if name.startswith("_") or not os.path.isdir(sub) or os.path.islink(sub):
            continue
        if find_index(sub):
            out[name] = sub
            continue
        found = [w for w in _WEIGHTS if os.path.isfile(os.path.join(sub, w))]
        others = sorted(f for f in os.listdir(sub) if f.endswith((".safetensors", ".bin"))
                        and f not in found[:1])
        if found and others:
            raise CheckpointError(f"{sub} holds {found[0]} and also {', '.join(others[:4])} "
                                  "(variants?): a pipeline merge would leave those unmerged; "
                                  "merge the component's file directly", code="LT401")
        if found:
            out[name] = os.path.join(sub, found[0])
    return out


def _route(job, comps: dict[str, str]):
    """{component: [(Adapter of its modules, scale)]}, the notes, and the modules of parts the
    pipeline lacks ``[(adapter, module)]``."""
    from ...interop import reader_for
    from ...interop._common import rename_modules
    from ...interop.base import ReaderOptions
    from ...model import Adapter
    from .options import normalize_adapters
    from .sd_single import ldm_index_of_diffusers
    taken = {seg: c for c in comps for seg in PARTS.get(c, (c,))}
    ldm_unet = _ldm_index(comps, ldm_index_of_diffusers)
    if "unet" in comps:
        taken["unet"] = "unet"
    routed: dict[str, list] = {}
    unrouted, notes = [], []
    for src, scale in normalize_adapters(job.adapters):
        label = src if isinstance(src, str) else "<in memory>"
        seen: dict[str, str] = {}
        for comp, weights in comps.items():
            if isinstance(src, str):
                opts = ReaderOptions.of(base=weights, **(job.adapter_options or {}))
                adapter = reader_for(src, opts).load_report(src, opts).adapter
            else:
                adapter = src
            if getattr(adapter, "replacements", None):
                raise CheckpointError(f"{label} has replacement entries: a pipeline merge "
                                      "routes modules only; merge into the component's "
                                      "checkpoint", code="LT411")
            mods = {}
            for name, m in adapter.modules.items():
                part, _, rest = name.partition(".")
                seen.setdefault(name, taken.get(part, ""))
                if taken.get(part) == comp and rest:
                    mods[name] = m
            if not mods:
                continue
            # the component's own names: the part's segment goes
            sub = Adapter(modules=mods, alpha=adapter.alpha, extra_metadata=dict(
                adapter.extra_metadata), source_format=adapter.source_format,
                init=getattr(adapter, "init", None))
            # SDXL kohya names are the LDM paths of the UNet: their diffusers paths
            sub, _ = rename_modules(sub, {n: (ldm_unet.get(n.partition(".")[2].replace(
                ".", "_")) if comp in ("unet", "transformer") else None) or n.partition(".")[2]
                for n in mods})
            sub.source_label = label
            routed.setdefault(comp, []).append((sub, scale))
            notes.append(f"{label}: {len(mods)} module(s) -> {comp}/")
        unrouted += [(label, n) for n, c in seen.items() if not c]
    return routed, notes, unrouted


def _ldm_index(comps, build) -> dict[str, str]:
    from ...checkpoint import list_tensors
    weights = comps.get("unet")
    return build(list_tensors(weights)) if weights else {}


def run_pipeline(job):
    """``merge``/``unmerge`` of a pipeline directory (``job.base``); see the module docstring."""
    from ...atomic import AtomicDir, TEMP_PREFIX, check_destination
    from .job import MergeJob, run
    from .options import normalize_adapters
    base = os.path.normpath(os.fspath(job.base))
    if job.output_format is not None:
        raise OperationError("a pipeline directory is written as a pipeline directory; give "
                             "-o a directory name and no --output-format", code="LT522")
    comps = components(base)
    if not comps:
        raise CheckpointError(f"{base} has {MODEL_INDEX} but no component with weights",
                              code="LT401")
    dest = os.fspath(job.output) if job.output is not None else base + (
        "-merged" if job.op == "merge" else "-unmerged")
    inputs = [base] + [os.fspath(src) for src, _ in normalize_adapters(job.adapters)
                       if isinstance(src, (str, os.PathLike))]
    check_destination(dest, overwrite=job.overwrite, inputs=inputs)
    routed, notes, unrouted = _route(job, comps)
    if unrouted:
        shown = ", ".join(f"{a}: {m}" for a, m in unrouted[:8]) + (
            f" ({len(unrouted) - 8} more)" if len(unrouted) > 8 else "")
        if not job.allow_missing:
            raise CheckpointError(
                f"{len(unrouted)} adapter module(s) name a part the pipeline {base} does not "
                f"have (it has {', '.join(comps)}): {shown}. Pass --allow-missing to skip "
                "them (they are listed in the report)", code="LT411")
        notes.append(f"skipped {len(unrouted)} module(s) of parts the pipeline lacks: {shown}")
    if not routed and not job.allow_no_change:
        raise CheckpointError(f"no adapter module belongs to a component of {base} "
                              f"({', '.join(comps)})", code="LT411")
    reports = {}
    with AtomicDir(dest, overwrite=job.overwrite) as tmp:
        for entry in sorted(os.listdir(base)):
            if entry.startswith(TEMP_PREFIX):
                continue
            src, out = os.path.join(base, entry), os.path.join(tmp, entry)
            if entry not in routed:
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, out)
                continue
            weights = comps[entry]
            if os.path.isdir(weights):  # sharded: the merge writes the whole folder
                target = out
            else:
                shutil.copytree(src, out, ignore=lambda d, names, w=weights: [
                    n for n in names if os.path.join(d, n) == w])
                target = os.path.join(out, os.path.basename(weights))
            reports[entry] = run(MergeJob(
                job.op, weights, routed[entry], output=target, device=job.device,
                dtype=job.dtype, name_map=job.name_map, allow_missing=job.allow_missing,
                overwrite=False, fsync=job.fsync, progress=job.progress, force=job.force,
                allow_no_change=job.allow_no_change, engines=job.engines))
    return _combined(job, base, dest, reports, notes)


def _combined(job, base, dest, reports: dict, notes: list):
    from .job import MergeReport
    rs = list(reports.values())
    first = rs[0] if rs else None
    adapters = [dict(a, component=c) for c, r in reports.items() for a in r.adapters]
    return MergeReport(
        operation=job.op, base=base, output=dest, output_format="diffusers",
        device=first.device if first else str(job.device),
        precision=first.precision if first else "", dtype=job.dtype, adapters=adapters,
        modules_merged=sum(r.modules_merged for r in rs),
        tensors_merged=sum(r.tensors_merged for r in rs),
        tensors_converted=sum(r.tensors_converted for r in rs),
        tensors_copied=sum(r.tensors_copied for r in rs),
        bytes_read=sum(r.bytes_read for r in rs), bytes_written=sum(r.bytes_written for r in rs),
        seconds=round(sum(r.seconds for r in rs), 3),
        stream_seconds=round(sum(r.stream_seconds for r in rs), 3),
        skipped=[dict(s, component=c) for c, r in reports.items() for s in r.skipped],
        records=[{"component": c, "records": r.records} for c, r in reports.items()],
        notes=notes + [f"{c}/: {n}" for c, r in reports.items() for n in r.notes],
        dropped=[d for r in reports.values() for d in r.dropped])
