"""Model directories as people have them (issue 10, item 12): a Hugging Face directory with a
single ``model.safetensors`` or ``pytorch_model.bin`` is a base; a directory of adapters in
subfolders is named in the error; ``inspect`` of a plain checkpoint summarises it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _merge_helpers import base_for, mixed_adapter
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratool.adapter import load_adapter, save_adapter
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.model import Adapter
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge


@pytest.fixture
def files(tmp_path):
    full = mixed_adapter(0)
    ad = Adapter(modules={n: full.modules[n] for n in ("model.layers.0.q_proj",
                                                        "h.0.attn.c_attn")}, alpha=full.alpha)
    base = base_for(ad)
    ap = str(tmp_path / "a.safetensors")
    save_adapter(ad, ap)
    single = tmp_path / "hf"
    single.mkdir()
    save_file(base, str(single / "model.safetensors"), metadata={"format": "pt"})
    (single / "config.json").write_text('{"model_type": "tiny"}')
    binary = tmp_path / "hf_bin"
    binary.mkdir()
    torch.save(base, str(binary / "pytorch_model.bin"))
    flat = str(tmp_path / "flat.safetensors")
    save_file(base, flat)
    return {"ad": ad, "a": ap, "base": base, "single": str(single), "bin": str(binary),
            "flat": flat, "tmp": tmp_path}


def test_single_file_directory_is_a_base(files):
    rep = merge(files["single"], [(files["a"], 0.5)])
    assert rep.output == files["single"] + "-merged.safetensors"
    ref = merge(files["flat"], [(files["a"], 0.5)], output=str(files["tmp"] / "ref.safetensors"))
    got, want = load_file(rep.output), load_file(ref.output)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert rep.modules_merged == 2


def test_pytorch_model_bin_directory_is_a_base(files):
    out = str(files["tmp"] / "m.safetensors")
    merge(files["bin"], [(files["a"], 0.5)], output=out)
    want = merge(files["flat"], [(files["a"], 0.5)], output=str(files["tmp"] / "r.safetensors"))
    got, ref = load_file(out), load_file(want.output)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    r = CliRunner().invoke(main, ["merge", files["bin"], files["a"], "-q"])
    assert r.exit_code == 0, r.output
    assert os.path.exists(files["bin"] + "-merged.pt")


def test_directory_of_adapters_names_them(files):
    multi = files["tmp"] / "multi"
    multi.mkdir()
    for sub in ("adapter_a", "adapter_b"):
        convert(files["a"], str(multi / sub), to="peft")
    with pytest.raises(LoraToolError) as e:
        load_adapter(str(multi))
    assert e.value.code == "LT301"
    assert "adapter_a/ (adapter)" in str(e.value) and "adapter_b/ (adapter)" in str(e.value)
    with pytest.raises(LoraToolError) as e:
        merge(str(multi), [(files["a"], 1.0)])
    assert e.value.code == "LT401" and "adapter_a/" in str(e.value)
    r = CliRunner().invoke(main, ["inspect", str(multi)])
    assert r.exit_code == 1 and "adapter_b/ (adapter)" in r.stderr


@pytest.mark.parametrize("which", ["flat", "single"])
def test_inspect_plain_checkpoint(files, which):
    rep = inspect(files[which])
    base = files["base"]
    assert rep["source_format"] == "checkpoint"
    assert rep["tensors"] == len(base)
    assert rep["parameters"] == sum(t.numel() for t in base.values())
    assert rep["bytes"] == sum(t.numel() * t.element_size() for t in base.values())
    assert rep["dtypes"] == {"F32": len(base) - 1, "I64": 1}
    assert rep["merged"] == []
    r = CliRunner().invoke(main, ["inspect", files[which]])
    assert r.exit_code == 0, r.output
    assert "checkpoint (not an adapter)" in r.stdout and f"{rep['parameters']:,}" in r.stdout
    r = CliRunner().invoke(main, ["inspect", files[which], "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tensors"] == len(base)


def test_inspect_plain_checkpoint_reads_headers_only(files):
    code = ("import sys; from loratool.ops.inspect import inspect; "
            f"r = inspect({files['flat']!r}); assert r['source_format'] == 'checkpoint'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inspect_merged_checkpoint_keeps_its_record(files):
    out = merge(files["flat"], [(files["a"], 0.5)]).output
    rep = inspect(out)
    assert rep["source_format"] == "merged-checkpoint" and len(rep["merged"]) == 1
    assert rep["parameters"] == sum(t.numel() for t in files["base"].values())


def test_a_broken_adapter_keeps_its_error(files):
    """A file with LoRA-looking names is not shown as a checkpoint: its reader's error stands."""
    bad = str(files["tmp"] / "bad.safetensors")
    save_file({"x.lora_down.weight": torch.zeros(2, 3)}, bad)
    with pytest.raises(LoraToolError):
        inspect(bad)
