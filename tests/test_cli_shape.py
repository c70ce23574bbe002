"""Every CLI command module has one shape: parse, ONE call of the library, render.

Read from the source with ``ast`` (the same scan as the import-cycle test): a command module
neither loads, saves nor checks files itself (no import of the readers, writers or guards of
outputs), and each command function calls at most one function of ``loratool.ops``.
"""

from __future__ import annotations

import ast
import os

from test_no_import_cycles import PACKAGE, import_graph, modules_of

# What a command may not do itself: read or write adapters and checkpoints, check outputs.
FORBIDDEN = ("loratool.adapter", "loratool.atomic", "loratool.checkpoint", "loratool.stfile",
             "loratool.interop.native", "loratool.interop.peft", "loratool.interop.kohya",
             "loratool.interop.loralib", "loratool.interop.lycoris", "loratool.interop.gguf",
             "loratool.gguf", "loratool.tensors")
# Modules not yet in that shape, with the reason (none today).
EXCEPTIONS: set[str] = set()


def _command_modules():
    return {n: p for n, p in modules_of(PACKAGE, "loratool").items()
            if n.startswith("loratool.commands.") and n not in EXCEPTIONS}


def test_commands_do_not_read_or_write_files_themselves():
    graph = import_graph(PACKAGE, "loratool")
    bad = {name: sorted(t for t in graph[name] if t.startswith(FORBIDDEN))
           for name in _command_modules()}
    assert {n: t for n, t in bad.items() if t} == {}


def _ops_names(tree) -> set[str]:
    """Local names bound to functions imported from loratool.ops (relative imports)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and \
                (node.module or "").startswith("ops"):
            names |= {a.asname or a.name for a in node.names if a.name.islower()}
    return names


def test_each_command_makes_at_most_one_library_call():
    calls = {}
    for name, path in _command_modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        ops = _ops_names(tree)
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            made = [c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call)
                    and isinstance(c.func, ast.Name) and c.func.id in ops]
            calls[f"{name}.{fn.name}"] = made
    assert calls["loratool.commands.resize.resize_cmd"] == ["resize"]  # the scan sees calls
    assert {k: v for k, v in calls.items() if len(v) > 1} == {}


def test_the_shape_check_sees_every_command_module():
    names = set(_command_modules())
    from loratool.cli import COMMANDS
    assert {m for m, _, _ in COMMANDS.values()} - EXCEPTIONS <= names
    assert os.path.basename(PACKAGE) == "loratool"
