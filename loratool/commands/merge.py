from __future__ import annotations

from contextlib import ExitStack

import click

from .. import console
from ..ops.merge import DEVICE_CHOICES, DTYPE_CHOICES, OUTPUT_FORMATS
from ..ops.merge.gguf_base import GGUF_TYPES
from ._options import path_numbers, source_options

_scaled = path_numbers("scale", "LT520")

_COMMON = [
    click.option("-o", "--output", type=click.Path(dir_okay=True),
                 help="Output path. Default: beside the input with a -merged (-unmerged) suffix "
                      "(model-merged.safetensors, or <dir>-merged for a sharded directory)."),
    click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto",
                 show_default=True,
                 help="cpu: exact (float64, rounded once). cuda: float32 on the GPU, overlapped "
                      "I/O. auto: cuda when available."),
    click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)),
                 default="keep", show_default=True,
                 help="Storage dtype of the output's floating-point tensors. GGUF base: "
                      "keep requantizes each merged tensor to its own type (refused, naming "
                      "the writable types, where gguf cannot write it)."),
    click.option("--gguf-type", type=click.Choice(GGUF_TYPES), default=None,
                 help="GGUF base only: write every merged tensor in this type (e.g. q8_0 for "
                      "a Q4_K base that cannot be requantized)."),
    click.option("--map", "maps", multiple=True, metavar="OLD=NEW",
                 help="Map an adapter module path to a base path (repeatable); a trailing '.' "
                      "maps a prefix, e.g. --map base_model.model.="),
    click.option("--allow-missing", is_flag=True,
                 help="Skip adapter modules with no (or a misshapen) base tensor instead of "
                      "failing; they are listed."),
    click.option("--allow-no-change", is_flag=True,
                 help="Write the output even when no tensor changes (otherwise LT431: every "
                      "module skipped or every tensor dropped)."),
    click.option("--output-format", type=click.Choice(OUTPUT_FORMATS),
                 help="Output container for a single-file base. Default: the -o suffix, else "
                      "the input's format."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output."),
    click.option("--fsync", is_flag=True,
                 help="fsync the output before renaming it into place (survives power loss; "
                      "costs seconds per GB)."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
]


def _common(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return source_options(f)


def _run(fn, base, adapters, output, device, dtype, gguf_type, maps, allow_missing,
         allow_no_change,
         output_format, overwrite, fsync, quiet, as_json, source, **extra):
    items = adapters
    with ExitStack() as stack:
        label = {"merge": "merging", "unmerge": "unmerging"}[fn.__name__]
        progress = console.progress_callback(stack, label, quiet=quiet or as_json)
        report = fn(base, items, output=output, device=device, dtype=dtype,
                    name_map=list(maps), allow_missing=allow_missing, overwrite=overwrite,
                    fsync=fsync, progress=progress, output_format=output_format,
                    adapter_options=source, gguf_type=gguf_type,
                    allow_no_change=allow_no_change, **extra)
    data = report.to_dict()
    if as_json:
        console.print_json(data)
        console.render_dropped(data.get("dropped", []))  # stderr: never dropped without a word
        return
    if data.get("output_format") == "gguf":
        console.render_gguf_merge(data)
    else:
        console.render_merge(data)


@click.command("merge")
@click.argument("base", type=click.Path(exists=True, dir_okay=True))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:SCALE]...",
                callback=_scaled)
@_common
@click.option("--base-is-residual", is_flag=True,
              help="BASE is the residual model of PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA-initialised "
                   "adapters (without it they are refused: LT419).")
def merge_cmd(base, adapters, base_is_residual, **kw):
    """Merge one or more adapters into BASE and write a new checkpoint.

    BASE is a .safetensors file, a sharded Hugging Face directory (with
    model.safetensors.index.json) or a .pt/.bin state dict. Each ADAPTER may be any
    supported format, with an optional trailing :SCALE (default 1). W + sum of scale * delta
    is computed in float64 and rounded once; tensors are streamed one at a time, so memory
    stays a few tensors whatever the checkpoint's size. The output records what was
    merged (metadata loratool.merged) so that `loratool unmerge` can check it.

    A GGUF BASE (llama.cpp, quantized or not; a split set given by any part) is
    dequantized, merged in float64 and written back in its types (--dtype keep) or in
    --gguf-type. The report says how much of each delta survived: retained =
    ||eff|| / ||delta|| and kept = <eff, delta> / ||delta||^2, eff being what the written
    file really changed. Read kept: rounding noise makes retained large even when little of
    the delta survived (at ||delta||/||W|| = 1e-2 about 98% survives Q8_0, 3% Q4_0).

    \b
    Examples:
      loratool merge model.safetensors examples/adapter.safetensors
      loratool merge llama-dir/ style.safetensors:0.7 detail.safetensors:0.3 -o out-dir
      loratool merge sd15.ckpt lora.safetensors --output-format safetensors --dtype fp16
      loratool merge llama-q8_0.gguf peft_adapter/ -o merged-q8_0.gguf --json
      loratool merge llama-Q4_K_M.gguf adapter.gguf --gguf-type q8_0
    """
    from ..ops.merge import merge
    if base_is_residual:
        kw["source"] = {**kw["source"], "base_is_residual": True}
    _run(merge, base, adapters, **kw)


@click.command("unmerge")
@click.argument("merged", type=click.Path(exists=True, dir_okay=True))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:SCALE]...",
                callback=_scaled)
@_common
@click.option("--force", is_flag=True,
              help="Subtract even when the adapter or scale does not match the loratool.merged "
                   "record (or there is none).")
def unmerge_cmd(merged, adapters, force, **kw):
    """Subtract adapters from a merged checkpoint: the inverse of `loratool merge`.

    Each ADAPTER[:SCALE] must match an entry of MERGED's loratool.merged record (same
    adapter content, same scale); otherwise nothing is written unless --force. DoRA merges
    cannot be inverted and are refused. A GGUF file is unmerged only where every adapted
    tensor is F32, F16 or BF16 (LT335 otherwise: requantizing is not invertible).

    \b
    Examples:
      loratool unmerge model-merged.safetensors examples/adapter.safetensors
      loratool unmerge out-dir style.safetensors:0.7 -o restored-dir
    """
    from ..ops.merge import unmerge
    _run(unmerge, merged, adapters, force=force, **kw)
