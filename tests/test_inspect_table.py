"""``inspect``'s table stays short and linear (issue 10, item 17): the first rows and a
"(N more; --all ...)" line; --all and --json list every module."""

from __future__ import annotations

import json
import os

import torch
from click.testing import CliRunner

from loratool.adapter import save_adapter
from loratool.cli import main
from loratool.console import INSPECT_ROWS
from loratool.model import Adapter, LoraModule


def _many(path: str, n: int) -> list[str]:
    names = [f"model.layers.{i}.q_proj" for i in range(n)]
    mods = {m: LoraModule(m, "linear", "out_in", torch.ones(1, 3), torch.ones(2, 1), 1.0)
            for m in names}
    save_adapter(Adapter(modules=mods, alpha=1.0), path)
    return sorted(names)


def test_table_is_capped_with_a_more_line(tmp_path):
    p = str(tmp_path / "many.safetensors")
    names = _many(p, INSPECT_ROWS + 23)
    r = CliRunner().invoke(main, ["inspect", p])
    assert r.exit_code == 0, r.output
    shown = [n for n in names if f"{n} " in r.stdout]
    assert shown == names[:INSPECT_ROWS]
    assert "(23 more; --all to show every module" in r.stdout
    r = CliRunner().invoke(main, ["inspect", p, "--all"])
    assert r.exit_code == 0 and all(f"{n} " in r.stdout for n in names)
    assert "more; --all" not in r.stdout
    r = CliRunner().invoke(main, ["inspect", p, "--json"])
    assert [m["name"] for m in json.loads(r.stdout)["modules"]] == names


def test_small_table_has_no_more_line(tmp_path):
    p = str(tmp_path / "few.safetensors")
    names = _many(p, 3)
    r = CliRunner().invoke(main, ["inspect", p])
    assert r.exit_code == 0 and all(n in r.stdout for n in names)
    assert "more;" not in r.stdout
    header = next(line for line in r.stdout.splitlines() if line.startswith("module"))
    assert header.split() == ["module", "kind", "in", "out", "rank", "alpha", "scale"]


def test_inspect_parses_the_header_once(tmp_path, monkeypatch):
    """The merged-checkpoint probe, format detection and the reader all read the header;
    it is parsed once (issue 10 item 17), and a file changed on disk is parsed again."""
    import loratool.stfile as S
    from loratool import inspect
    p = str(tmp_path / "a.safetensors")
    _many(p, 5)
    calls = []
    real = S.parse_header_bytes
    monkeypatch.setattr(S, "parse_header_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(S, "_parsed", None)
    assert inspect(p)["totals"]["modules"] == 5
    assert len(calls) == 1
    h = S.read_header(p)
    h.metadata.clear()  # callers get their own dicts
    h.tensors.clear()
    assert inspect(p)["totals"]["modules"] == 5 and len(calls) == 1
    other = str(tmp_path / "b.safetensors")
    _many(other, 7)
    os.replace(other, p)  # same path, new bytes
    assert inspect(p)["totals"]["modules"] == 7 and len(calls) == 2
