"""``resize``/``compose``/``compare`` write their own outputs (``output=``/``plot=``) and
report progress (``progress(n, total)``), so each CLI command is parse + one library call +
render: the library and the CLI must write the same bytes and refuse the same paths."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import loratool
from loratool.adapter import load_adapter, save_adapter
from loratool.cli import main
from loratool.errors import LoraToolError

from _lowrank_helpers import adapter, module


def _source(seed=0):
    return adapter(module("lin", 20, 16, 6, 12.0, seed=seed, decay=0.8),
                   module("conv", 8, 3, 6, 5.0, kind="conv", kernel=(3, 3), seed=seed + 1),
                   module("emb", 9, 30, 4, 3.0, kind="embedding", dtype=torch.bfloat16,
                          seed=seed + 2))


def _tensor_bytes(a) -> int:
    """Bytes of every factor, counted from the tensors themselves (not loratool's helper)."""
    return sum(t.numel() * t.element_size() for m in a.modules.values()
               for t in (m.A, m.B, m.bias, m.magnitude) if t is not None)


@pytest.fixture
def files(tmp_path):
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_adapter(_source(0), pa)
    save_adapter(_source(10), pb)
    return pa, pb


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_resize_output_writes_what_it_returns(files, tmp_path):
    pa, _ = files
    out = str(tmp_path / "small.safetensors")
    seen = []
    result = loratool.resize(pa, rank=2, output=out,
                             progress=lambda n, total: seen.append((n, total)))
    assert result.report["output"] == out
    # The written file is the returned adapter, byte for byte (saving is deterministic).
    again = str(tmp_path / "again.safetensors")
    digest = save_adapter(result.adapter, again)
    assert _read(out) == _read(again) and result.report["tensor_hash"] == digest
    back = load_adapter(out)
    for name, m in result.adapter.modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
    # One call per module, with that module's bytes, all against the same total.
    total = _tensor_bytes(load_adapter(pa))
    assert len(seen) == 3 and {t for _, t in seen} == {total}
    assert sum(n for n, _ in seen) == total


def test_resize_without_output_writes_nothing(files, tmp_path):
    pa, _ = files
    before = sorted(os.listdir(tmp_path))
    report = loratool.resize(pa, rank=2).report
    assert report["output"] is None and "tensor_hash" not in report
    assert sorted(os.listdir(tmp_path)) == before


def test_resize_output_refusals_come_before_any_work(files, tmp_path):
    pa, _ = files
    calls = []
    progress = lambda n, total: calls.append(n)  # noqa: E731
    link = tmp_path / "link.safetensors"
    os.symlink(pa, link)
    original = _read(pa)
    for dest, overwrite, code in ((pa, True, "LT502"), (str(link), True, "LT502"),
                                  (pa, False, "LT502"),
                                  (str(tmp_path / "no" / "x.safetensors"), False, "LT504")):
        with pytest.raises(LoraToolError) as e:
            loratool.resize(pa, rank=2, output=dest, overwrite=overwrite, progress=progress)
        assert e.value.code == code, dest
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(LoraToolError) as e:
        loratool.resize(pa, rank=2, output=str(existing), progress=progress)
    assert e.value.code == "LT503" and existing.read_bytes() == b"keep"
    assert calls == [] and _read(pa) == original
    loratool.resize(pa, rank=2, output=str(existing), overwrite=True)
    assert load_adapter(str(existing)).modules["lin"].rank == 2


def test_compose_output_and_progress(files, tmp_path):
    pa, pb = files
    out = str(tmp_path / "mix.safetensors")
    seen = []
    result = loratool.compose([pa, (pb, -0.5)], rank=3, output=out,
                              progress=lambda n, total: seen.append((n, total)))
    again = str(tmp_path / "again.safetensors")
    assert result.report["tensor_hash"] == save_adapter(result.adapter, again)
    assert _read(out) == _read(again) and result.report["output"] == out
    total = _tensor_bytes(load_adapter(pa)) + _tensor_bytes(load_adapter(pb))
    assert len(seen) == 3 and {t for _, t in seen} == {total}
    assert sum(n for n, _ in seen) == total
    # An output that is the second input (or its path through a symlink) is refused.
    os.symlink(pb, tmp_path / "b-link.safetensors")
    for dest in (pb, str(tmp_path / "b-link.safetensors")):
        with pytest.raises(LoraToolError) as e:
            loratool.compose([pa, (pb, 0.5)], output=dest, overwrite=True)
        assert e.value.code == "LT502"
    # In-memory adapters have no file to protect: only the destination rules apply.
    mem = str(tmp_path / "mem.safetensors")
    r = loratool.compose([_source(0), (_source(10), -0.5)], rank=3, output=mem)
    assert r.report["tensor_hash"] == result.report["tensor_hash"]


def test_compare_plot_needs_subspace_and_is_checked_first(files, tmp_path):
    pa, pb = files
    with pytest.raises(LoraToolError) as e:
        loratool.compare(pa, pb, plot=str(tmp_path / "phi.png"))
    assert e.value.code == "LT536"
    with pytest.raises(LoraToolError) as e:
        loratool.compare(pa, pb, subspace=True, plot=pb, overwrite=True)
    assert e.value.code == "LT502"


@pytest.mark.parametrize("command,args", [
    ("resize", ["--rank", "2"]),
    ("compose", ["{b}:-0.5", "--rank", "3"]),
])
def test_cli_writes_the_library_bytes(files, tmp_path, command, args):
    pa, pb = files
    cli_out, lib_out = str(tmp_path / "cli.safetensors"), str(tmp_path / "lib.safetensors")
    argv = [command, pa, *(a.format(b=pb) for a in args)]
    r = CliRunner().invoke(main, [*argv, "-o", cli_out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    if command == "resize":
        lib = loratool.resize(pa, rank=2, output=lib_out).report
    else:
        lib = loratool.compose([pa, (pb, -0.5)], rank=3, output=lib_out).report
    assert _read(cli_out) == _read(lib_out)
    assert report["tensor_hash"] == lib["tensor_hash"] and report["output"] == cli_out
    assert report["modules"] == json.loads(json.dumps(lib["modules"]))
    assert f"wrote {cli_out} (3 modules, {lib['tensor_hash']})" in r.stderr
    # Same output again without --overwrite: LT503, exit 1, file untouched.
    before = _read(cli_out)
    r = CliRunner().invoke(main, [*argv, "-o", cli_out])
    assert r.exit_code == 1 and "[LT503]" in r.stderr and _read(cli_out) == before

