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
@source_options
def inspect_cmd(path, as_json, stats, source):
    """Show what an adapter is: format, base model, scaling, totals and a per-module table.

    Without --stats only the header is read, so a multi-GB adapter inspects as fast as a
    tiny one.

    \b
    Examples:
      loratool inspect examples/adapter.safetensors
      loratool inspect examples/adapter.safetensors --stats --json
    """
    report = inspect(path, stats=stats, **source)
    if as_json:
        console.print_json(report)
    else:
        console.render_inspect(report)
