"""``inspect``'s table stays short and linear (issue 10, item 17): the first rows and a
"(N more; --all ...)" line; --all and --json list every module."""

from __future__ import annotations

import json

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
