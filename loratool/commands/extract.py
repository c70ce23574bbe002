"""``loratool extract``: thin wrapper over ``loratool.ops.extract.extract``."""

from __future__ import annotations

import click

from .. import console


@click.command("extract")
@click.argument("base", type=click.Path(exists=True, dir_okay=True))
@click.argument("tuned", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "out", type=click.Path(),
              help="Write the adapter here (a file; a directory for --to peft). Without it, "
                   "only the report.")
@click.option("--to", "to", type=click.Choice(["loratool", "peft", "kohya"]),
              default="loratool", show_default=True,
              help="Output format: loratool (format 1.1 with replacement entries), a PEFT "
                   "directory (replacements as modules_to_save, biases, trainable tokens), "
                   "or a kohya file (LoRA modules only: refused when something was replaced).")
@click.option("--rank", type=click.IntRange(min=1), help="Fixed rank K for every module.")
@click.option("--fro", type=click.FloatRange(0, 1, min_open=True),
              help="Smallest rank keeping fraction F of each delta's Frobenius norm.")
@click.option("--sv-ratio", type=click.FloatRange(min=1),
              help="Keep singular values s_i >= s_max / R.")
@click.option("--cumulative", type=click.FloatRange(0, 1, min_open=True),
              help="Smallest rank keeping fraction C of the sum of singular values (exact "
                   "SVD of every tensor: slow on large ones).")
@click.option("--max-error", type=click.FloatRange(0, 1, max_open=True),
              help="Smallest rank with ||dW - BA||_F <= E ||dW||_F (certified).")
@click.option("--auto-rank", is_flag=True,
              help="The singular values above the tuned dtype's rounding-noise floor (for "
                   "adapters merged into bf16/fp16 checkpoints).")
@click.option("--max-rank", type=click.IntRange(min=1), help="Upper bound on every rank.")
@click.option("--min-rank", type=click.IntRange(min=1), help="Lower bound on every rank.")
@click.option("--modules", "patterns", multiple=True, metavar="PATTERN",
              help="Only tensors whose module (or tensor) name matches this glob; repeatable.")
@click.option("--skip-others", is_flag=True,
              help="Leave out changed tensors that cannot be LoRA modules (norms, biases; "
                   "listed in the report) instead of storing them as replacement entries.")
@click.option("--embeddings", type=click.Choice(["full", "lora", "skip"]), default="full",
              show_default=True, help="Changed embeddings: replacement entries (the changed "
                                      "rows, or the whole tensor when more than half "
                                      "changed), LoRA embedding modules, or left out "
                                      "(listed).")
@click.option("--layout", type=click.Choice(["auto", "out_in", "in_out"]), default="auto",
              show_default=True, help="Linear weight layout: from the base's config.json "
                                      "(GPT-2 Conv1D is in_out), or forced for every module.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "fp64"]), default="fp32",
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
    from ..atomic import check_destination
    from ..ops.extract import extract
    rules = [n for n, v in (("--rank", rank), ("--fro", fro), ("--sv-ratio", sv_ratio),
                            ("--cumulative", cumulative), ("--max-error", max_error),
                            ("--auto-rank", auto_rank or None)) if v is not None]
    if len(rules) != 1:
        raise click.UsageError("give exactly one of --rank, --fro, --sv-ratio, --cumulative, "
                               "--max-error, --auto-rank"
                               + (f" (got {', '.join(rules)})" if rules else ""))
    if out is not None:
        check_destination(out, overwrite=overwrite, inputs=[base, tuned])
    from contextlib import ExitStack
    with ExitStack() as stack:
        bars = []

        def progress(advance, total):
            if not bars:  # the library knows the total once it has matched the tensors
                bars.append(stack.enter_context(console.progress(total, "extract",
                                                                 quiet=quiet)))
            bars[0].advance(advance)
        result = extract(base, tuned, rank=rank, fro=fro, sv_ratio=sv_ratio,
                         cumulative=cumulative, max_error=max_error, auto_rank=auto_rank,
                         max_rank=max_rank, min_rank=min_rank, modules=list(patterns) or None,
                         others="skip" if skip_others else "full", embeddings=embeddings,
                         layout=layout, dtype=dtype, seed=seed, progress=progress)
    report = dict(result.report, output=out)
    if out is not None:
        saved = result.save(out, to=to, overwrite=overwrite)
        report.update(format=to, notes=saved["notes"])
        if "tensor_hash" in saved:
            report["tensor_hash"] = saved["tensor_hash"]
        for line in saved["notes"]:
            console.note(line)
        n_rep = len(result.adapter.replacements)
        console.note(f"wrote {out} ({len(result.adapter.modules)} modules"
                     + (f", {n_rep} replacement entries" if n_rep else "") + ")")
    if as_json:
        console.print_json(report)
    else:
        render_extract(report)


def render_extract(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from ..console import fmt
    c = console.out()
    rule = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in report["rule"].items())
    c.print(f"{report['base']} -> {report['tuned']}  extract ({rule})", style="bold",
            markup=False, highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "kind", "shape", "rank", "rel. error", "error", "retained",
                "method", "reason"):
        table.add_column(col, justify="right" if col in ("rank", "rel. error", "error",
                                                          "retained") else "left",
                         no_wrap=col == "module")
    for r in report["modules"]:
        table.add_row(Text(r["name"]), r["kind"] + (" (T)" if r["layout"] == "in_out" else ""),
                      "x".join(map(str, r["shape"])), str(r["rank"]),
                      fmt(r["relative_error"], 3), fmt(r["error"], 3),
                      f"{r['retained']:.6f}", r["method"], Text(r["reason"]))
    if report["modules"]:
        c.print(table)
    s = report["summary"]
    ranks = ", ".join(f"{k} x{v}" for k, v in s["ranks"].items()) or "-"
    for key, value in (
            ("modules", f"{s['modules']} extracted, {s['identical_weights']} weights "
                        f"unchanged, {s['not_selected']} tensors not selected"),
            ("ranks", ranks),
            ("parameters", f"{s['parameters']:,}"),
            ("error", f"relative {s['relative_error_overall']:.3g} overall, max "
                      f"{s['relative_error_max']:.3g} (||dW - BA||_F / ||dW||_F)")):
        c.print(f"  {key:<11} {value}", markup=False, highlight=False)
    for action, label in (("replaced", "replaced"), ("replaced_rows", "rows"),
                          ("skipped", "skipped")):
        rows = [o for o in report["others"] if o["action"] == action]
        if not rows:
            continue
        what = {"replaced": "stored whole (replacement entries)",
                "replaced_rows": "changed rows stored (row replacement entries)",
                "skipped": "left out"}[action]
        c.print(f"  {label:<11}{len(rows)} changed tensor(s) that are not LoRA modules, "
                f"{what}:", markup=False, highlight=False)
        for o in rows:
            rows_text = (f", {o['rows_changed']} of {o['shape'][0]} rows changed"
                         if o.get("rows_changed") is not None else "")
            c.print(f"    {o['name']} {o['shape']} {o['dtype']} ({o['category']}, relative "
                    f"change {fmt(o['relative_change'], 3)}{rows_text})", markup=False,
                    highlight=False)
