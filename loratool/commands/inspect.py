from __future__ import annotations

import click

from .. import console
from ..ops.inspect import inspect
from ._options import source_options


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--stats", is_flag=True,
              help="Also read the tensors: per-module norm of delta W, singular values, "
                   "effective rank, flags for all-zero B and NaN/Inf (imports torch).")
@click.option("--base", type=click.Path(exists=True, dir_okay=True), default=None,
              help="A base checkpoint (streamed): per module ||U^T W V||_F, ||W||_F and the "
                   "amplification factor of the LoRA paper, with baselines (imports torch).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="With --base: seed of the random-subspace baseline.")
@click.option("--all", "show_all", is_flag=True,
              help="Print every module (the table stops after the first "
                   f"{console.INSPECT_ROWS} otherwise; --json always has all of them).")
@source_options
def inspect_cmd(path, as_json, stats, base, seed, show_all, source):
    """Show what an adapter is: format, base model, scaling, totals and a per-module table.

    Without --stats only the header is read, so a multi-GB adapter inspects as fast as a
    tiny one. The table shows the first 50 modules (--all: every one). A base checkpoint
    (safetensors file, sharded or single-file model directory) gets a summary instead:
    tensors, dtypes, parameters, bytes and loratool's merge records.

    \b
    Examples:
      loratool inspect examples/adapter.safetensors
      loratool inspect examples/adapter.safetensors --stats --json
      loratool inspect examples/adapter.safetensors --base examples/base.safetensors
    """
    if seed != 0 and base is None:
        raise click.UsageError("--seed needs --base")
    report = inspect(path, stats=stats, base=base, seed=seed, **source)
    if as_json:
        console.print_json(report)
    else:
        console.render_inspect(report, show_all=show_all)
        if base is not None:
            console.render_amplification(report)
