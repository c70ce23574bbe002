"""``loratool extract``: thin wrapper over ``loratool.ops.extract.extract``."""

from __future__ import annotations

from contextlib import ExitStack

import click

from .. import console
from ..ops.extract import DTYPES, EMBEDDINGS, LAYOUTS, TARGETS
from ._options import rank_rule_options


@click.command("extract")
@click.argument("base", type=click.Path(exists=True, dir_okay=True))
@click.argument("tuned", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "out", type=click.Path(),
              help="Write the adapter here (a file; a directory for --to peft). Without it, "
                   "only the report.")
@click.option("--to", "to", type=click.Choice(TARGETS),
              default="loratool", show_default=True,
              help="Output format: loratool (format 1.1 with replacement entries), a PEFT "
                   "directory (replacements as modules_to_save, biases, trainable tokens), "
                   "or a kohya file (LoRA modules only: refused when something was replaced).")
@rank_rule_options(certified=True)
@click.option("--modules", "patterns", multiple=True, metavar="PATTERN",
              help="Only tensors whose module (or tensor) name matches this glob; repeatable.")
@click.option("--skip-others", is_flag=True,
              help="Leave out changed tensors that cannot be LoRA modules (norms, biases; "
                   "listed in the report) instead of storing them as replacement entries.")
@click.option("--embeddings", type=click.Choice(EMBEDDINGS), default="full",
              show_default=True, help="Changed embeddings: replacement entries (the changed "
                                      "rows, or the whole tensor when more than half "
                                      "changed), LoRA embedding modules, or left out "
                                      "(listed).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="auto",
              show_default=True, help="Linear weight layout: from the base's config.json "
                                      "(GPT-2 Conv1D is in_out), or forced for every module.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32",
              show_default=True, help="dtype of the stored factors.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the randomized sketches.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_cmd(base, tuned, out, to, rank, fro, sv_ratio, cumulative, max_error, auto_rank,
                max_rank, min_rank, patterns, skip_others, embeddings, layout, dtype, seed,
                overwrite, as_json, quiet):
    """Extract the LoRA adapter that turns BASE into TUNED (the inverse of merge).

    Give exactly one rule: --rank K, --fro F, --sv-ratio R, --cumulative C, --max-error E or
    --auto-rank. Both checkpoints (a .safetensors file, a sharded Hugging Face directory or a
    .pt state dict) are streamed in row blocks; each module's error ||dW - BA||_F is computed
    exactly and reported. Factors are balanced, alpha = rank (scale 1). See spec/extract.md.

    \b
    Examples:
      loratool extract base.safetensors tuned.safetensors --rank 32 -o adapter.safetensors
      loratool extract base/ merged-bf16/ --auto-rank --max-rank 64 -o adapter.safetensors
      loratool extract base.safetensors tuned.safetensors --max-error 0.01 --json
      loratool extract base/ tuned/ --rank 16 --to peft -o peft_adapter/
    """
    from ..ops.extract import extract
    with ExitStack() as stack:
        result = extract(base, tuned, rank=rank, fro=fro, sv_ratio=sv_ratio,
                         cumulative=cumulative, max_error=max_error, auto_rank=auto_rank,
                         max_rank=max_rank, min_rank=min_rank, modules=list(patterns) or None,
                         others="skip" if skip_others else "full", embeddings=embeddings,
                         layout=layout, dtype=dtype, seed=seed, output=out, to=to,
                         overwrite=overwrite,
                         progress=console.progress_callback(stack, "extract", quiet=quiet))
    report = result.report
    for line in report.get("notes", []):
        console.note(line)
    console.render_written(report)
    if as_json:
        console.print_json(report)
    else:
        console.render_extract(report)

