"""``loratool compose`` and ``loratool compare``: thin wrappers over ``loratool.ops.compose``."""

from __future__ import annotations

from contextlib import ExitStack

import click

from .. import console
from ..ops.subspace import SUBSPACE_ON
from ._options import path_numbers, source_options


_weighted = path_numbers("weight", "LT534")


@click.command("compose")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...",
                callback=_weighted)
@click.option("--rank", type=click.IntRange(min=1),
              help="Truncate each module's sum to this rank (best approximation).")
@click.option("--fro", type=click.FloatRange(0, 1, min_open=True),
              help="Truncate each module's sum to the smallest rank keeping fraction F of its "
                   "Frobenius norm.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False),
              help="Write the composed adapter here (loratool format). Without it, only the "
                   "report is printed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@source_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compose_cmd(adapters, rank, fro, out, overwrite, as_json, source, quiet):
    """Linear combination of adapters: each module's delta is sum_i w_i * delta_i.

    Each ADAPTER may end with :WEIGHT (default 1; negative subtracts). Only a trailing
    :<number> is a weight, so paths may contain ':'. Without --rank/--fro the result is exact
    (ranks add up); with one, each module is the best approximation of that rank of the exact
    sum. Output modules have scaling "standard" and alpha = rank (scale 1).

    \b
    Examples:
      loratool compose examples/adapter.safetensors examples/adapter_style.safetensors:0.5 \
          -o mix.safetensors
      loratool compose examples/adapter.safetensors examples/adapter_style.safetensors:-1 \
          --rank 8 --json
    """
    from ..ops.compose import compose
    if rank is not None and fro is not None:
        raise click.UsageError("give at most one of --rank, --fro")
    with ExitStack() as stack:
        report = compose(adapters, rank=rank, fro=fro, output=out, overwrite=overwrite,
                         progress=console.progress_callback(stack, "compose", quiet=quiet),
                         **source).report
    for w in report["warnings"]:
        console.note(f"warning: {w}")
    console.render_written(report)
    if as_json:
        console.print_json(report)
    else:
        console.render_compose(report)


@click.command("compare")
@click.argument("a", type=click.Path(exists=True, dir_okay=True))
@click.argument("b", type=click.Path(exists=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--subspace", is_flag=True,
              help="Also the subspace similarity phi(i, j) of the LoRA paper per module "
                   "(top-i singular directions of A against top-j of B).")
@click.option("--on", "on", type=click.Choice(SUBSPACE_ON), default=None,
              help="With --subspace: singular vectors of the A matrices (default, as in the "
                   "paper) or of the deltas (input and output side).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="With --subspace: write heatmaps of phi per module group (needs the plot "
                   "extra: pip install 'loratool[plot]').")
@click.option("--overwrite", is_flag=True, help="Replace the --plot file if it exists.")
@source_options
def compare_cmd(a, b, as_json, subspace, on, plot, overwrite, source):
    """Per-module cosine similarity and norm ratio |dB|/|dA| of two adapters' deltas.

    Computed in factored form, without forming any dense matrix. Modules present in only
    one adapter are listed. Use it to see how adapters relate before composing them.
    --subspace adds the LoRA paper's subspace similarity (do two runs, or two ranks, learn
    the same directions?).

    \b
    Examples:
      loratool compare examples/adapter.safetensors examples/adapter_style.safetensors
      loratool compare examples/adapter.safetensors examples/adapter_style.safetensors --json
      loratool compare examples/adapter.safetensors examples/adapter_style.safetensors \
          --subspace --plot subspace.png
    """
    from ..ops.compose import compare
    if (on is not None or plot is not None) and not subspace:
        raise click.UsageError("--on and --plot need --subspace")
    report = compare(a, b, subspace=subspace, on=on or "a", plot=plot, overwrite=overwrite,
                     **source)
    if as_json:
        console.print_json(report)
    else:
        console.render_compare(report)
