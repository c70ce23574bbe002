"""All terminal output: rich tables on stdout, diagnostics and progress on stderr, JSON.

The library never prints; the CLI renders what library functions return through here.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

_consoles: dict[str, object] = {}


def out():
    """Console for data (stdout)."""
    if "out" not in _consoles:
        from rich.console import Console
        # Piped output is read by scripts and people alike: never wrap or cut module names.
        _consoles["out"] = Console(soft_wrap=False,
                                   width=None if sys.stdout.isatty() else 200)
    return _consoles["out"]


def err():
    """Console for diagnostics and progress (stderr)."""
    if "err" not in _consoles:
        from rich.console import Console
        _consoles["err"] = Console(stderr=True)
    return _consoles["err"]


def reset() -> None:
    """Forget cached consoles (Click's CliRunner swaps sys.stdout between invocations)."""
    _consoles.clear()


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def error(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")


def note(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _fmt_num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


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
        ("scaling", f"{report['scaling']}, default alpha {_fmt_num(report['alpha'])}"),
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
    for key, value in lines:
        c.print(f"  {key:<13} {value}", highlight=False, markup=False)
    for key, value in (report.get("details") or {}).items():
        c.print(f"  {key:<13} {value}", highlight=False, markup=False)
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
               _fmt_num(m["alpha"]), _fmt_num(m["scale"])]
        if stats:
            st = m.get("stats", {})
            row += [_fmt_num(st.get("norm")), _fmt_num(st.get("effective_rank")),
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
    for key, value in lines:
        c.print(f"  {key:<13} {value}", highlight=False, markup=False)
    for i, rec in enumerate(report["merged"], 1):
        c.print(f"  {rec.get('op', 'merge')} #{i}: loratool {rec.get('loratool_version')}, "
                f"{rec.get('device')} {rec.get('precision')}, dtype {rec.get('dtype')}",
                highlight=False, markup=False)
        for a in rec.get("adapters", []):
            c.print(f"    {a.get('source')}  scale {_fmt_num(a.get('scale'))}  "
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


class _NullProgress:
    def advance(self, n: int) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass


class _RichProgress:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: int) -> None:
        self._p.advance(self._t, n)

    def set_description(self, text: str) -> None:
        self._p.update(self._t, description=text)


# --- operation reports (resize, compose, compare, merge) ------------------------------------

def fmt(x, digits: int = 6) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render_resize(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text
    c = out()
    rule = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in report["rule"].items())
    c.print(f"{report['input']}  resize ({rule})", style="bold", markup=False, highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "kind", "rank", "new", "retained", "residual", "s_max", "note"):
        table.add_column(col, justify="left" if col in ("module", "kind", "note") else "right",
                         no_wrap=col == "module")
    for r in report["modules"]:
        note = []
        if r["unchanged"]:
            note.append("unchanged")
        if r["clamped"]:
            note.append(f"clamped to {r['limit']}")
        table.add_row(Text(r["name"]), r["kind"], str(r["old_rank"]), str(r["new_rank"]),
                      f"{r['retained']:.6f}", fmt(r["residual"], 3), fmt(r["sv_max"], 4),
                      ", ".join(note))
    if report["modules"]:
        c.print(table)
    s = report["summary"]
    ranks = lambda h: ", ".join(f"{k} x{v}" for k, v in h.items()) or "-"  # noqa: E731
    for key, value in (
            ("modules", f"{s['modules']} ({s['resized']} resized, {s['unchanged']} unchanged, "
                        f"{s['clamped']} clamped)"),
            ("ranks", f"{ranks(s['ranks_before'])} -> {ranks(s['ranks_after'])}"),
            ("parameters", f"{s['parameters_before']:,} -> {s['parameters_after']:,}"),
            ("retained", f"overall {s['retained_overall']:.6f}, min {s['retained_min']:.6f} "
                         f"(fraction of the Frobenius norm)")):
        c.print(f"  {key:<11} {value}", markup=False, highlight=False)


def render_compose(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text
    c = out()
    inputs = " + ".join(f"{fmt(i['weight'])} x {i['input']}" for i in report["inputs"])
    rule = ", ".join(f"{k} {v}" for k, v in report["rule"].items()) or "exact"
    c.print(f"compose {inputs}  ({rule})", style="bold", markup=False, highlight=False)
    truncating = bool(report["rule"])
    table = Table(show_edge=False, pad_edge=False)
    cols = ["module", "kind", "ranks", "sum rank", "new"]
    if truncating:
        cols += ["retained", "residual"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("module", "kind", "ranks") else "right",
                         no_wrap=col == "module")
    for r in report["modules"]:
        ranks = "+".join("-" if x is None else str(x) for x in r["ranks"])
        row = [Text(r["name"]), r["kind"], ranks, str(r["concat_rank"]), str(r["new_rank"])]
        if truncating:
            row += [f"{r['retained']:.6f}", fmt(r["residual"], 3)]
        table.add_row(*row)
    if report["modules"]:
        c.print(table)
    s = report["summary"]
    lines = [("modules", f"{s['modules']} ({s['in_all_inputs']} in every input; {s['exact']} "
                         f"exact, {s['truncated']} truncated)"),
             ("parameters", f"{s['parameters_before']:,} in the inputs -> "
                            f"{s['parameters_after']:,}")]
    if "retained_overall" in s:
        lines.append(("retained", f"overall {s['retained_overall']:.6f}, min "
                                  f"{s['retained_min']:.6f} (fraction of the Frobenius norm)"))
    for key, value in lines:
        c.print(f"  {key:<11} {value}", markup=False, highlight=False)


def render_compare(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text
    c = out()
    c.print(f"A = {report['a']}\nB = {report['b']}", style="bold", markup=False,
            highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "|dA|", "|dB|", "|dB|/|dA|", "cosine", "|dB-dA|/|dA|", "status"):
        table.add_column(col, justify="left" if col in ("module", "status") else "right",
                         no_wrap=col == "module")
    for r in report["modules"]:
        status = {"ok": "", "only_a": "only in A", "only_b": "only in B",
                  "shape_mismatch": "shapes differ", "dora": "DoRA, not compared"}[r["status"]]
        if r.get("note"):
            status = r["note"]
        table.add_row(Text(r["name"]), fmt(r["norm_a"], 5), fmt(r["norm_b"], 5),
                      fmt(r["norm_ratio"], 5), fmt(r["cosine"], 6), fmt(r["rel_diff"], 4),
                      status)
    if report["modules"]:
        c.print(table)
    s = report["summary"]
    lines = [("modules", f"{s['common']} compared, {len(s['only_a'])} only in A, "
                         f"{len(s['only_b'])} only in B, {len(s['not_compared'])} not comparable"),
             ("cosine", f"{fmt(s['cosine'])} (whole adapter), mean {fmt(s['cosine_mean'])}, "
                        f"min {fmt(s['cosine_min'])}"),
             ("norm ratio", f"{fmt(s['norm_ratio'])} (whole adapter, |B|/|A|)")]
    for key, value in lines:
        c.print(f"  {key:<11} {value}", markup=False, highlight=False)


def render_merge(d: dict) -> None:
    c = out()
    verb = "Merged" if d["operation"] == "merge" else "Unmerged"
    names = ", ".join(f"{os.path.basename(a['source'])}:{a['scale']:g}" for a in d["adapters"])
    rate = d["bytes_read"] / d["stream_seconds"] if d["stream_seconds"] else 0.0
    how = "float64, rounded once" if d["precision"] == "fp64" else "float32"
    lines = [
        f"{verb} {names} -> {d['output']}",
        f"  modules     {d['modules_merged']} ({d['tensors_merged']} tensors changed, "
        f"{d['tensors_copied']} copied, {d['tensors_converted']} converted)",
        f"  data        {fmt_bytes(d['bytes_read'])} streamed in {d['stream_seconds']:.2f} s "
        f"({fmt_bytes(rate)}/s); {d['seconds']:.2f} s in all",
        f"  device      {d['device']} ({how}), dtype {d['dtype']}",
    ]
    for a in d["adapters"]:
        lines.append(f"  identity    {os.path.basename(a['source'])} {a['identity']}")
    for line in lines:
        c.print(line, markup=False, highlight=False, soft_wrap=True)
    for text in d.get("notes", []):
        note(f"note: {text}")
    if d.get("replacements_merged"):
        note(f"note: {d['replacements_merged']} base tensor(s) replaced (PEFT modules_to_save, "
             "biases, embeddings or trainable tokens)")
    render_dropped(d.get("dropped", []))
    if d["skipped"]:
        note(f"warning: {len(d['skipped'])} module(s) skipped (--allow-missing):")
        for s in d["skipped"]:
            note(f"  {s['adapter']}: {s['module']} {s['reason']}")


def render_gguf_merge(d: dict) -> None:
    """A merge into a GGUF base: what was written, and how much of each delta survived."""
    from rich.table import Table
    c = out()
    verb = "Merged" if d["operation"] == "merge" else "Unmerged"
    names = ", ".join(f"{os.path.basename(a['source'])}:{a['scale']:g}" for a in d["adapters"])
    c.print(f"{verb} {names} -> {d['output']} (GGUF, types: {d['output_type']})",
            markup=False, highlight=False, soft_wrap=True)
    c.print(f"  tensors     {d['tensors_merged']} merged, {d['tensors_copied']} copied; "
            f"{d['seconds']:.2f} s", markup=False, highlight=False)
    c.print(f"  delta       retained {fmt(d['retained'], 4)}, kept {fmt(d['kept'], 4)}, "
            f"rel. error {fmt(d['rel_error'], 3)} (overall)", markup=False, highlight=False)
    t = Table(box=None, header_style="bold")
    for col in ("tensor", "type", "||delta||", "retained", "kept", "rel_error"):
        t.add_column(col, justify="left" if col in ("tensor", "type") else "right")
    for r in d["tensors"]:
        types = r["base_type"] if r["base_type"] == r["out_type"] else \
            f"{r['base_type']}->{r['out_type']}"
        t.add_row(r["name"], types, fmt(r["delta_norm"], 4), fmt(r["retained"], 4),
                  fmt(r["kept"], 4), fmt(r["rel_error"], 3))
    c.print(t)
    for s in d.get("skipped", []):
        c.print(f"  skipped     {s['module']} ({s['adapter']}): {s['reason']}", markup=False,
                highlight=False)
    for note in d.get("notes", []):
        c.print(f"  note: {note}", markup=False, highlight=False)


def render_dropped(dropped: list[dict]) -> None:
    """Tensors an operation did not apply (``--allow-unknown``), one per line on stderr."""
    if dropped:
        note(f"warning: {len(dropped)} tensor(s) dropped, not applied (--allow-unknown):")
        for d in dropped:
            note(f"  {d['adapter']}: {d['tensor']}")


@contextmanager
def progress(total_bytes: int, description: str, *, quiet: bool = False):
    """A bytes progress bar (with bytes/s) on a terminal; silent when piped or ``quiet``."""
    if quiet or not sys.stderr.isatty():
        yield _NullProgress()
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err(),
                  transient=False) as p:
        yield _RichProgress(p, p.add_task(description, total=total_bytes))


# --- extract (loratool extract) ------------------------------------------------------------

def render_extract(report: dict) -> None:
    """The report of ``extract``: per-module table, summary, changed non-LoRA tensors."""
    from rich.table import Table
    from rich.text import Text

    c = out()
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
