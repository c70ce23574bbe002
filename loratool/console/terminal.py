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
    sys.stdout.write(dumps_indented(obj) + "\n")


def dumps_indented(obj) -> str:
    """``json.dumps(obj, indent=2, default=str)``, the same text, mostly by the C encoder.

    The standard library indents in pure Python (its C encoder runs only without
    ``indent``): a third of ``inspect --json`` at 20,000 modules. But the C encoder takes any
    separator, and a literal newline stands only in separators (strings escape it): a
    container of scalars at depth d is the C encoder's text with the separator ``",\n"`` + 2
    (d + 1) spaces, its brackets moved to their own lines; a list of such dicts (a report's
    rows) is one C call too, the seams between rows re-indented. Only the few containers
    above them are walked here."""
    parts: list[str] = []
    try:
        _indented(obj, 0, parts.append)
    except _Fallback:  # a non-string key in a walked dict: json's own rules for it
        return json.dumps(obj, indent=2, default=str)
    return "".join(parts)


class _Fallback(Exception):
    pass


_CONTAINERS = (dict, list, tuple)
_encoders: dict[int, json.JSONEncoder] = {}


def _encoder(depth: int) -> json.JSONEncoder:
    """Compact C encoding, items separated as ``indent=2`` separates them at ``depth``."""
    enc = _encoders.get(depth)
    if enc is None:
        enc = _encoders[depth] = json.JSONEncoder(
            separators=(",\n" + "  " * depth, ": "), default=str)
    return enc


def _flat(obj) -> bool:
    """Only scalars (and empty containers, which print as ``[]``/``{}``) inside."""
    for v in obj.values() if isinstance(obj, dict) else obj:  # a loop: any() is slower here
        if isinstance(v, _CONTAINERS) and v:
            return False
    return True


def _rows(obj) -> bool:
    """A list of non-empty flat dicts (a report's rows)."""
    for v in obj:
        if not (isinstance(v, dict) and v and _flat(v)):
            return False
    return True


def _indented(obj, level: int, put) -> None:
    if not isinstance(obj, _CONTAINERS) or not obj:
        put(_encoder(0).encode(obj))
        return
    pad, end = "\n" + "  " * (level + 1), "\n" + "  " * level
    if _flat(obj):
        text = _encoder(level + 1).encode(obj)
        put(text[0] + pad + text[1:-1] + end + text[-1])
        return
    is_dict = isinstance(obj, dict)
    if not is_dict and _rows(obj):
        # [{..},<sep>{..}]: a row's items start with a key ("), so "},<sep>{" is a seam
        inner = pad + "  "
        text = _encoder(level + 2).encode(obj)
        rows = text[2:-2].replace("}," + inner + "{", pad + "}," + pad + "{" + inner)
        put("[" + pad + "{" + inner + rows + pad + "}" + end + "]")
        return
    put("{" if is_dict else "[")
    for i, item in enumerate(obj.items() if is_dict else obj):
        put("," + pad if i else pad)
        if is_dict:
            key, item = item
            if not isinstance(key, str):
                raise _Fallback
            put(json.encoder.encode_basestring_ascii(key) + ": ")
        _indented(item, level + 1, put)
    put(end + ("}" if is_dict else "]"))


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
