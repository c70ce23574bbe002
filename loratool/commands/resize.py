"""``loratool resize``: thin wrapper over ``loratool.ops.resize.resize``.

The tables are rendered here through ``console.out()`` (the one owner of the consoles); the
shared helpers below are also used by ``compose``.
"""

from __future__ import annotations

import click

from .. import console
from ._options import rank_rule_options, source_options


def load_with_progress(paths, quiet: bool, label: str, options: dict):
    """Load adapters (any format) and open a bytes progress bar over their tensors."""
    from ..adapter import load_adapter
    adapters = [load_adapter(p, **options) for p in paths]
    total = sum(module_bytes_total(a) for a in adapters)
    return adapters, console.progress(total, label, quiet=quiet)


def module_bytes_total(adapter) -> int:
    from ..ops.resize import module_bytes
    return sum(module_bytes(m) for m in adapter.modules.values())


def write_output(adapter, out: str, overwrite: bool) -> str:
    from ..adapter import save_adapter
    digest = save_adapter(adapter, out, overwrite=overwrite)
    console.note(f"wrote {out} ({len(adapter.modules)} modules, {digest})")
    return digest


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
    from ..atomic import check_destination
    from ..ops.resize import resize
    rules = [n for n, v in (("--rank", rank), ("--fro", fro), ("--sv-ratio", sv_ratio),
                            ("--cumulative", cumulative)) if v is not None]
    if len(rules) != 1:
        raise click.UsageError("give exactly one of --rank, --fro, --sv-ratio, --cumulative"
                               + (f" (got {', '.join(rules)})" if rules else ""))
    if out is not None:
        check_destination(out, overwrite=overwrite, inputs=[adapter])
    (source,), bar = load_with_progress([adapter], quiet, "resize", source)
    with bar as p:
        result = resize(source, rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative,
                        max_rank=max_rank, min_rank=min_rank, progress=p.advance)
    report = dict(result.report, input=adapter, output=out)
    if out is not None:
        report["tensor_hash"] = write_output(result.adapter, out, overwrite)
    if as_json:
        console.print_json(report)
    else:
        console.render_resize(report)
