"""All terminal output: rich tables on stdout, diagnostics and progress on stderr, JSON.

The library never prints; the CLI renders what library functions return through here.
"""

from __future__ import annotations

import json
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


def render_inspect(report: dict) -> None:
    if report.get("source_format") == "merged-checkpoint":
        return render_merged_checkpoint(report)
    from rich.table import Table
    from rich.text import Text
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
    for key, value in lines:
        c.print(f"  {key:<13} {value}", highlight=False, markup=False)
    for key, value in (report.get("details") or {}).items():
        c.print(f"  {key:<13} {value}", highlight=False, markup=False)
    stats = any("stats" in m for m in report["modules"])
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "kind", "in", "out", "rank", "alpha", "scale"):
        table.add_column(col, justify="left" if col in ("module", "kind") else "right",
                         no_wrap=col == "module", overflow="fold")
    if stats:
        for col in ("norm", "eff. rank", "flags"):
            table.add_column(col, justify="right" if col != "flags" else "left")
    for m in report["modules"]:
        kind = m["kind"] + ("" if m["kind"] != "linear" or m["layout"] == "out_in" else " (T)")
        if m.get("dora"):
            kind += " +DoRA"
        if m["kernel"]:
            kind += " " + "x".join(map(str, m["kernel"]))
        row = [Text(m["name"]), Text(kind), str(m["in"]), str(m["out"]), str(m["rank"]),
               _fmt_num(m["alpha"]), _fmt_num(m["scale"])]
        if stats:
            s = m.get("stats", {})
            row += [_fmt_num(s.get("norm")), _fmt_num(s.get("effective_rank")),
                    Text(", ".join(s.get("flags", [])))]
        table.add_row(*row)
    if report["modules"]:
        c.print(table)


def render_merged_checkpoint(report: dict) -> None:
    """``inspect`` of a base checkpoint carrying a ``loratool.merged`` record."""
    c = out()
    c.print(report["path"], style="bold", markup=False, highlight=False)
    lines = [("format", f"merged {report['checkpoint']} checkpoint (not an adapter)")]
    if report.get("tensors") is not None:
        lines.append(("tensors", f"{report['tensors']} ({fmt_bytes(report['bytes'])}; "
                                 + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())
                                 + ")"))
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
