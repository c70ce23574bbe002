from __future__ import annotations

import click

from .. import console
from ..ops.validate import validate


@click.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--format", "style", type=click.Choice(["text", "json", "github"]),
              default="text", show_default=True,
              help="github prints GitHub Actions annotations (::error file=...::).")
@click.option("--header-only", is_flag=True,
              help="Skip the data rules (NaN/Inf, all-zero B, tensor hash): header rules only.")
def validate_cmd(paths, as_json, style, header_only):
    """Check adapter files against every rule of the spec; exit 1 if any MUST rule fails.

    A directory stands for every adapter below it (*.safetensors files and PEFT adapter
    directories). Findings of SHOULD rules are warnings and do not fail the run.

    \b
    Exit codes: 0 all valid, 1 a MUST rule failed, 2 usage error.
    \b
    Examples:
      loratool validate examples/adapter.safetensors
      loratool validate adapters/ --format github
    """
    report = validate(list(paths), data=not header_only)
    data = report.to_dict()
    if as_json or style == "json":
        console.print_json(data)
    else:
        console.render_validate(data, style)
    if not report.ok:
        raise SystemExit(1)
