"""Reports about adapter and checkpoint files: ``inspect`` (with ``--base``: the
amplification table) and ``validate``."""

from __future__ import annotations

import sys

from .terminal import fmt, fmt_bytes, out, print_fields, print_report, table

# Module rows `inspect` prints by default; the rest is one "(N more ...)" line (--all).
INSPECT_ROWS = 50


def _kind_label(m: dict) -> str:
    kind = m["kind"] + ("" if m["kind"] != "linear" or m["layout"] == "out_in" else " (T)")
    if m.get("dora"):
        kind += " +DoRA"
    if m["kernel"]:
        kind += " " + "x".join(map(str, m["kernel"]))
    return kind


def render_inspect(report: dict, *, show_all: bool = False,
                   max_rows: int = INSPECT_ROWS) -> None:
    """The header lines, then the module table: at most ``max_rows`` rows unless
    ``show_all``. The table is plain aligned text written in one pass (rich's table layout
    took 3.7 s for 2,000 modules and 40 s for 20,000), so even --all is linear."""
    if report.get("source_format") in ("merged-checkpoint", "checkpoint"):
        return render_merged_checkpoint(report)
    c = out()
    t = report["totals"]
    c.print(report["path"], style="bold", markup=False, highlight=False)
    lines = [
        ("format", f"{report['source_format']}" + (
            f" (loratool format {report['format_version']})" if report.get("format_version")
            else "")),
        ("base model", report.get("base_model") or "-"),
        ("scaling", f"{report['scaling']}, default alpha {fmt(report['alpha'])}"),
        ("modules", f"{t['modules']} ({', '.join(f'{k} {v}' for k, v in t['kinds'].items())})"),
        ("parameters", f"{t['parameters']:,}"),
        ("tensor bytes", fmt_bytes(t["bytes"])),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in t["dtypes"].items()) or "-"),
        ("ranks", ", ".join(map(str, t["ranks"])) or "-"),
    ]
    if report.get("tensor_hash"):
        lines.append(("tensor hash", report["tensor_hash"]))
    if report.get("init") and "init" not in (report.get("details") or {}):
        lines.append(("init", f"{report['init'].get('method')} (applies to the residual "
                              "model made at initialisation, not the original base)"))
    print_fields(c, [*lines, *(report.get("details") or {}).items()], width=13)
    modules = report["modules"]
    if not modules:
        _render_replacements(c, report)
        return
    stats = any("stats" in m for m in modules)
    shown = modules if show_all else modules[:max_rows]
    header = ["module", "kind", "in", "out", "rank", "alpha", "scale"]
    if stats:
        header += ["norm", "eff. rank", "flags"]
    rows = []
    for m in shown:
        row = [m["name"], _kind_label(m), str(m["in"]), str(m["out"]), str(m["rank"]),
               fmt(m["alpha"]), fmt(m["scale"])]
        if stats:
            st = m.get("stats", {})
            row += [fmt(st.get("norm")), fmt(st.get("effective_rank")),
                    ", ".join(st.get("flags", []))]
        rows.append(row)
    c.file.write(_aligned(header, rows, left={0, 1, len(header) - 1 if stats else 1}))
    if len(shown) < len(modules):
        c.file.write(f"({len(modules) - len(shown)} more; --all to show every module, "
                     "--json for all of them as data)\n")

    c.file.flush()
    _render_replacements(c, report)


def _render_replacements(c, report: dict) -> None:
    from rich.table import Table
    from rich.text import Text
    reps = report.get("replacements") or []
    if reps:
        c.print(f"  replaced tensors ({len(reps)}): written over the base's when merged",
                highlight=False, markup=False)
        rt = Table(show_edge=False, pad_edge=False)
        for col in ("base tensor", "replaces", "shape", "dtype"):
            rt.add_column(col, no_wrap=col == "base tensor", overflow="fold")
        for r in reps:
            what = "whole tensor" if r["kind"] == "full" else f"{r['rows']} row(s)"
            rt.add_row(Text(r["target"]), what, "x".join(map(str, r["shape"])), r["dtype"])
        c.print(rt)


def _aligned(header: list[str], rows: list[list[str]], *, left: set[int]) -> str:
    """Columns padded to their widest cell, separated by two spaces; one pass per column."""
    widths = [max(len(header[i]), max((len(r[i]) for r in rows), default=0))
              for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip() + "\n"

    rule = "  ".join("-" * w for w in widths) + "\n"
    return "".join([line(header), rule] + [line(r) for r in rows])


def render_merged_checkpoint(report: dict) -> None:
    """``inspect`` of a base checkpoint (with its ``loratool.merged`` records, if any)."""
    c = out()
    c.print(report["path"], style="bold", markup=False, highlight=False)
    merged = "merged " if report["merged"] else ""
    lines = [("format", f"{merged}{report['checkpoint']} checkpoint (not an adapter)")]
    if report.get("tensors") is not None:
        lines.append(("tensors", f"{report['tensors']} ({fmt_bytes(report['bytes'])}; "
                                 + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())
                                 + ")"))
    if report.get("parameters") is not None:
        lines.append(("parameters", f"{report['parameters']:,}"))
    print_fields(c, lines, width=13)
    for i, rec in enumerate(report["merged"], 1):
        c.print(f"  {rec.get('op', 'merge')} #{i}: loratool {rec.get('loratool_version')}, "
                f"{rec.get('device')} {rec.get('precision')}, dtype {rec.get('dtype')}",
                highlight=False, markup=False)
        for a in rec.get("adapters", []):
            c.print(f"    {a.get('source')}  scale {fmt(a.get('scale'))}  "
                    f"{a.get('modules')} modules  {a.get('identity')}",
                    highlight=False, markup=False, soft_wrap=True)


def render_validate(report: dict, style: str) -> None:
    if style == "github":
        for f in report["files"]:
            for x in f["findings"]:
                kind = "error" if x["severity"] == "error" else "warning"
                msg = x["message"].replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
                sys.stdout.write(f"::{kind} file={f['path']},title={x['code']}::"
                                 f"[{x['code']}] {msg}\n")
        s = report["summary"]
        sys.stdout.write(f"{s['files']} file(s), {s['errors']} error(s), "
                         f"{s['warnings']} warning(s)\n")
        return
    from rich.markup import escape
    c = out()
    for f in report["files"]:
        mark = "[green]ok[/green]" if f["valid"] else "[red]INVALID[/red]"
        fmt = f" ({f['source_format']})" if f["source_format"] else ""
        c.print(f"{mark}  {escape(f['path'])}{fmt}", highlight=False)
        for x in f["findings"]:
            color = "red" if x["severity"] == "error" else "yellow"
            named = x.get("module") and repr(x["module"]) in x["message"]
            where = f" {x['module']}:" if x.get("module") and not named else ""
            c.print(f"    [{color}]{x['severity']} {x['code']}[/{color}]{escape(where)} "
                    f"{escape(x['message'])}", highlight=False, markup=True)
    s = report["summary"]
    c.print(f"{s['files']} file(s), {s['errors']} error(s), {s['warnings']} warning(s)",
            highlight=False)


def render_amplification(report: dict) -> None:
    """After the inspect table (``inspect --base``): per module ||dW||, ||U^T W V||, ||W||,
    the baselines and the amplification factor of the LoRA paper."""
    from rich.text import Text
    c = out()
    b = report["base"]
    c.print(f"amplification against {b['path']} (random baseline seed {b['seed']})",
            style="bold", markup=False, highlight=False)
    t = table(("module", "k", "|dW|", "|U'WV|", "|W|", "top-k of W", "random", "amplif."))
    for m in report["modules"]:
        a = m.get("amplification")
        if a is None:
            why = ("experts: not analyzed" if m.get("kind") == "experts"
                   else "DoRA: not analyzed")
            t.add_row(Text(m["name"]), "-", "-", "-", "-", "-", "-", why)
            continue
        t.add_row(Text(m["name"]), str(a["rank"]), fmt(a["delta_norm"], 4),
                  fmt(a["projection_norm"], 4), fmt(a["base_norm"], 4),
                  fmt(a["top_projection_norm"], 4), fmt(a["random_projection_norm"], 4),
                  fmt(a["amplification"], 4))
    print_report(c, t, report["modules"], [
        ("amplification", f"min {fmt(b['amplification_min'], 4)}, max "
                          f"{fmt(b['amplification_max'], 4)} (|dW| / |U'WV|; U, V: dW's "
                          "top-k singular vectors)")], width=14)
