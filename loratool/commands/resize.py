"""``loratool resize``: thin wrapper over ``loratool.ops.resize.resize``."""

from __future__ import annotations

from contextlib import ExitStack

import click

from .. import console
from ._options import rank_rule_options, source_options


@click.command("resize")
@click.argument("adapter", type=click.Path(exists=True, dir_okay=True))
@rank_rule_options()
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False),
              help="Write the resized adapter here (loratool format). Without it, only the "
                   "report is printed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@source_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def resize_cmd(adapter, rank, fro, sv_ratio, cumulative, max_rank, min_rank, out, overwrite,
               as_json, source, quiet):
    """Truncate every module's rank exactly, by SVD in factored form.

    Give exactly one rule: --rank K, --fro F, --sv-ratio R or --cumulative C (see
    spec/lowrank.md for the exact boundaries). Alpha and scaling are kept; the scale change
    is folded into the factors. Modules whose rank does not change are copied bit for bit.

    \b
    Examples:
      loratool resize examples/adapter.safetensors --rank 4 -o small.safetensors
      loratool resize examples/adapter.safetensors --fro 0.9 --max-rank 8 --json
    """
    from ..ops.resize import resize
    with ExitStack() as stack:
        report = resize(adapter, rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative,
                        max_rank=max_rank, min_rank=min_rank, output=out, overwrite=overwrite,
                        progress=console.progress_callback(stack, "resize", quiet=quiet),
                        **source).report
    console.render_written(report)
    if as_json:
        console.print_json(report)
    else:
        console.render_resize(report)
