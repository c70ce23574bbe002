"""No command writes over a file its inputs read (issue 10, item 8): adapter files, configs,
shards, the index, sidecars, the base, by path, symlink or hard link, --overwrite or not."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from _merge_helpers import base_for, mixed_adapter
from click.testing import CliRunner
from safetensors.torch import save_file

from loratool.adapter import save_adapter
from loratool.atomic import check_destination
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.guards import files_read
from loratool.model import Adapter
from loratool.ops.convert import convert


def _digest(root: str) -> dict[str, str]:
    """sha256 of every file below ``root`` (or of the file ``root``)."""
    if os.path.isfile(root):
        return {root: hashlib.sha256(open(root, "rb").read()).hexdigest()}
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def world(tmp_path):
    """A base file, a sharded base, a .pt base with sidecar, a loratool adapter, its PEFT
    conversion, a second adapter, and a merged checkpoint."""
    full = mixed_adapter(0)
    ad = Adapter(modules={n: full.modules[n] for n in ("model.layers.0.q_proj",)},
                 alpha=full.alpha)
    base = base_for(ad)
    w = {"dir": tmp_path}
    w["base"] = str(tmp_path / "base.safetensors")
    save_file(base, w["base"])
    w["a"] = str(tmp_path / "a.safetensors")
    save_adapter(ad, w["a"])
    w["b"] = str(tmp_path / "b.safetensors")
    save_adapter(ad, w["b"])
    w["peft"] = str(tmp_path / "peft")
    convert(w["a"], w["peft"], to="peft")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = list(base)
    wm = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: base[k] for k in part}, str(shard_dir / shard))
        wm.update({k: shard for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    w["sharded"] = str(shard_dir)
    w["shard1"] = str(shard_dir / "model-00001-of-00002.safetensors")
    w["pt"] = str(tmp_path / "base.pt")
    torch.save(base, w["pt"])
    with open(w["pt"] + ".loratool.json", "w") as f:
        json.dump({"note": "x"}, f)
    w["merged"] = str(tmp_path / "merged.safetensors")
    r = CliRunner().invoke(main, ["merge", w["base"], w["a"], "-o", w["merged"], "-q"])
    assert r.exit_code == 0, r.output
    return w


def _refused(args, *protected):
    before = {k: v for p in protected for k, v in _digest(p).items()}
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, (args, r.output)
    assert "[LT502]" in r.stderr, r.stderr
    assert {k: v for p in protected for k, v in _digest(p).items()} == before
    return r


def _hardlink(src: str, tmp_path, name: str) -> str:
    dst = str(tmp_path / name)
    os.link(src, dst)
    return dst


def _symlink(src: str, tmp_path, name: str) -> str:
    dst = str(tmp_path / name)
    os.symlink(src, dst)
    return dst


def test_merge_refuses_adapter_files_and_config(world):
    peft = world["peft"]
    for target in ("adapter_model.safetensors", "adapter_config.json"):
        _refused(["merge", world["base"], peft, "-o", os.path.join(peft, target),
                  "--overwrite", "-q"], peft)


def test_merge_refuses_base_by_symlink_and_hard_link(world, tmp_path):
    for link in (_symlink(world["base"], tmp_path, "sym.safetensors"),
                 _hardlink(world["base"], tmp_path, "hard.safetensors")):
        _refused(["merge", world["base"], world["a"], "-o", link, "--overwrite", "-q"],
                 world["base"])
    hard_a = _hardlink(world["a"], tmp_path, "hard_a.safetensors")
    _refused(["merge", world["base"], world["a"], "-o", hard_a, "--overwrite", "-q"],
             world["a"])


def test_merge_refuses_shards_index_and_the_directory(world, tmp_path):
    sd = world["sharded"]
    _refused(["merge", sd, world["a"], "-o", sd, "--overwrite", "-q"], sd)
    # another directory output that holds a hard link to a shard is fine to replace only if
    # no input is inside it: the shard itself is the input here
    link_dir = tmp_path / "out_dir"
    link_dir.mkdir()
    _refused(["merge", os.path.join(sd, "model.safetensors.index.json"), world["a"], "-o",
              sd, "--overwrite", "-q"], sd)


def test_merge_refuses_pt_sidecar(world, tmp_path):
    # the output's own sidecar would replace the base's sidecar (a hard link to it)
    out = str(tmp_path / "out.pt")
    os.link(world["pt"] + ".loratool.json", out + ".loratool.json")
    _refused(["merge", world["pt"], world["a"], "-o", out, "--overwrite", "-q"],
             world["pt"] + ".loratool.json")


def test_unmerge_refuses(world, tmp_path):
    _refused(["unmerge", world["merged"], world["a"], "-o", world["merged"], "--overwrite",
              "-q"], world["merged"])
    _refused(["unmerge", world["merged"], world["peft"], "-o",
              os.path.join(world["peft"], "adapter_model.safetensors"), "--overwrite", "-q"],
             world["peft"])


def test_resize_refuses(world, tmp_path):
    peft = world["peft"]
    _refused(["resize", peft, "--rank", "2", "-o", os.path.join(peft, "adapter_model.safetensors"),
              "--overwrite"], peft)
    _refused(["resize", world["a"], "--rank", "2", "-o",
              _hardlink(world["a"], tmp_path, "h.safetensors"), "--overwrite"], world["a"])


def test_convert_refuses(world, tmp_path):
    peft = world["peft"]
    _refused(["convert", peft, "-o", os.path.join(peft, "adapter_model.safetensors"),
              "--overwrite"], peft)
    _refused(["convert", world["a"], "-o", _symlink(world["a"], tmp_path, "s.safetensors"),
              "--overwrite", "--to", "kohya"], world["a"])
    # the --base a foreign reader opens is an input too
    _refused(["convert", world["a"], "-o", world["base"], "--base", world["base"],
              "--overwrite"], world["base"])


def test_compose_refuses(world, tmp_path):
    _refused(["compose", world["a"], world["b"], "-o",
              _hardlink(world["b"], tmp_path, "hb.safetensors"), "--overwrite", "-q"],
             world["b"])
    _refused(["compose", world["a"], world["peft"], "-o",
              os.path.join(world["peft"], "adapter_config.json"), "--overwrite", "-q"],
             world["peft"])


def test_extract_refuses(world, tmp_path):
    _refused(["extract", world["base"], world["merged"], "--rank", "2", "-o",
              _symlink(world["merged"], tmp_path, "m.safetensors"), "--overwrite", "-q"],
             world["merged"])
    _refused(["extract", world["sharded"], world["merged"], "--rank", "2", "-o",
              world["shard1"], "--overwrite", "-q"], world["sharded"])


def test_compare_plot_refuses(world, tmp_path):
    _refused(["compare", world["a"], world["b"], "--subspace", "--plot",
              _hardlink(world["a"], tmp_path, "a.png"), "--overwrite"], world["a"])


def test_files_read_lists_what_readers_open(world, tmp_path):
    sd = world["sharded"]
    assert set(files_read(sd)) >= {sd, world["shard1"],
                                   os.path.join(sd, "model.safetensors.index.json")}
    assert world["pt"] + ".loratool.json" in files_read(world["pt"])
    peft_bin = os.path.join(world["peft"], "adapter_model.bin")
    open(peft_bin, "wb").close()
    assert os.path.join(world["peft"], "adapter_config.json") in files_read(peft_bin)
    assert files_read(world["a"]) == [world["a"]]


def test_library_refuses_too(world, tmp_path):
    from loratool.ops.merge import merge
    with pytest.raises(LoraToolError) as e:
        merge(world["base"], (world["peft"], 1.0),
              output=os.path.join(world["peft"], "adapter_model.safetensors"), overwrite=True)
    assert e.value.code == "LT502"
    with pytest.raises(LoraToolError) as e:
        check_destination(str(tmp_path), overwrite=True, inputs=[world["a"]])
    assert e.value.code == "LT502"
    # an unrelated existing output is still replaced with overwrite
    other = str(tmp_path / "other.safetensors")
    open(other, "wb").close()
    check_destination(other, overwrite=True, inputs=[world["a"], world["peft"]])


def test_an_output_beside_the_inputs_is_fine(world):
    """Only what readers open is protected: a merge written into the PEFT directory can be
    replaced by the next run."""
    out = os.path.join(world["peft"], "merged.safetensors")
    for _ in range(2):
        r = CliRunner().invoke(main, ["merge", world["base"], world["peft"], "-o", out,
                                      "--overwrite", "-q"])
        assert r.exit_code == 0, r.output
