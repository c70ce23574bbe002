"""The consoles (stdout for data, stderr for diagnostics), JSON, notes, number formats and
progress bars: what every renderer of ``loratool.console`` builds on."""

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


def fmt(x, digits: int = 6) -> str:
    """A number for a table cell: ``-`` for None, floats to ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def table(columns, *, left=("module",)):
    """A borderless rich table; ``left`` columns are left-justified, the others right, and
    the first column (module names) never wraps."""
    from rich.table import Table
    t = Table(show_edge=False, pad_edge=False)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right",
                     no_wrap=col == columns[0])
    return t


def print_fields(c, fields, *, width: int = 11) -> None:
    """``  key        value`` lines, keys padded to ``width``, printed verbatim."""
    for key, value in fields:
        c.print(f"  {key:<{width}} {value}", markup=False, highlight=False)


def print_report(c, t, rows, fields, *, width: int = 11) -> None:
    """The usual end of an operation's report: the table ``t`` (unless there were no
    ``rows``: a table of only its header says nothing), then the summary ``fields``."""
    if rows:
        c.print(t)
    print_fields(c, fields, width=width)


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


def progress_callback(stack, description: str, *, quiet: bool = False):
    """The ``progress(n, total)`` callback that library operations take (merge, resize,
    compose): the first call opens a bar of ``total`` bytes in ``stack`` (an ``ExitStack``),
    every call advances it by ``n``. The library knows the total only once its inputs are
    read, so the bar cannot be opened before the call."""
    bar = []

    def callback(n: int, total: int) -> None:
        if not bar:
            bar.append(stack.enter_context(progress(total, description, quiet=quiet)))
        bar[0].advance(n)

    return callback
