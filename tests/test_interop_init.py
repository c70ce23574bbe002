"""PiSSA-initialised adapters (issue 10, item 3) against PEFT: the base of such an adapter is
the residual model made at initialisation. loratool keeps the init (``loratool.init``), shows
it, keeps it through convert, and merge refuses it (LT419) unless told the base is residual."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from _interop_helpers import tiny_llama
from loratool import convert, inspect, load_adapter, read_adapter_info
from loratool.errors import LoraToolError
from loratool.ops.merge import merge


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _close(ours, want, base) -> bool:
    tol = 8 * 2.0**-24 * (base.abs() + (want - base).abs()) + 1e-7
    return bool(((ours - want).abs() <= tol).all())


@pytest.fixture(scope="module")
def pissa(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pissa")
    model = tiny_llama()
    original = _state(model)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # "training": move the factors away from their initial values
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.eval()
    residual = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.clone()
                for k, v in pm.state_dict().items() if "lora_" not in k}
    peft_dir = str(tmp / "pissa")
    pm.save_pretrained(peft_dir)
    merged_peft = _state(copy.deepcopy(pm).merge_and_unload())
    paths = {"original": str(tmp / "original.safetensors"),
             "residual": str(tmp / "residual.safetensors")}
    save_file(original, paths["original"])
    save_file(residual, paths["residual"])
    # PEFT's own conversion to a plain LoRA of the original base (rank 2r)
    converted = str(tmp / "converted")
    init_dir = str(tmp / "init")
    pm0 = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    pm0.save_pretrained(init_dir)
    pm.save_pretrained(converted, path_initial_model_for_weight_conversion=init_dir)
    return dict(tmp=tmp, model=model, original=original, residual=residual, peft=peft_dir,
                merged_peft=merged_peft, paths=paths, converted=converted)


def test_peft_saves_pissa_with_its_init(pissa):
    with open(os.path.join(pissa["peft"], "adapter_config.json")) as f:
        assert json.load(f)["init_lora_weights"] == "pissa"
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(pissa["residual"][key], pissa["original"][key])


def test_inspect_shows_init(pissa):
    info = read_adapter_info(pissa["peft"])
    assert info.init == {"method": "pissa", "init_lora_weights": "pissa"}
    report = inspect(pissa["peft"])
    assert report["init"]["method"] == "pissa" and "residual" in report["details"]["init"]
    from click.testing import CliRunner

    from loratool.cli import main
    res = CliRunner().invoke(main, ["inspect", pissa["peft"]])
    assert res.exit_code == 0 and "pissa" in res.output and "residual" in res.output


def test_merge_into_original_base_is_refused(pissa):
    out = str(pissa["tmp"] / "m.safetensors")
    with pytest.raises(LoraToolError) as e:
        merge(pissa["paths"]["original"], [(pissa["peft"], 1.0)], output=out, device="cpu")
    assert e.value.code == "LT419" and "--base-is-residual" in e.value.message
    assert not os.path.exists(out)


def test_merge_into_residual_base_equals_peft(pissa):
    out = str(pissa["tmp"] / "r.safetensors")
    report = merge(pissa["paths"]["residual"], [(pissa["peft"], 1.0)], output=out,
                   device="cpu", adapter_options={"base_is_residual": True})
    assert any("residual" in n for n in report.notes)
    merged = load_file(out)
    changed = 0
    for k, want in pissa["merged_peft"].items():
        base = pissa["residual"][k]
        assert _close(merged[k], want, base), k
        changed += not torch.equal(want, base)
    assert changed == 4


def test_cli_base_is_residual(pissa):
    from click.testing import CliRunner

    from loratool.cli import main
    out = str(pissa["tmp"] / "c.safetensors")
    res = CliRunner().invoke(main, ["merge", pissa["paths"]["original"], pissa["peft"], "-o",
                                    out])
    assert res.exit_code == 1 and "[LT419]" in res.output
    res = CliRunner().invoke(main, ["merge", pissa["paths"]["residual"], pissa["peft"], "-o",
                                    out, "--base-is-residual"])
    assert res.exit_code == 0, res.output


def test_convert_keeps_init_peft_loratool_peft(pissa):
    tmp = pissa["tmp"]
    native = str(tmp / "a.safetensors")
    convert(pissa["peft"], native)
    assert load_adapter(native).init["method"] == "pissa"
    from loratool.stfile import read_header
    assert json.loads(read_header(native).metadata["loratool.init"])["method"] == "pissa"
    with pytest.raises(LoraToolError) as e:  # the native file is refused the same way
        merge(pissa["paths"]["original"], [(native, 1.0)], output=str(tmp / "n.safetensors"))
    assert e.value.code == "LT419"
    back = str(tmp / "peft_back")
    report = convert(native, back, to="peft")
    assert any("residual model" in n for n in report.notes)
    assert read_adapter_info(back).init["method"] == "pissa"
    # PEFT loads our PEFT output onto the residual model and gets PEFT's own merge
    rm = tiny_llama()
    rm.load_state_dict(pissa["residual"])
    merged = _state(PeftModel.from_pretrained(rm, back).merge_and_unload())
    for k, want in pissa["merged_peft"].items():
        assert torch.allclose(merged[k], want, atol=1e-6), k
    # kohya cannot record it: said in the notes
    report = convert(native, str(tmp / "k.safetensors"), to="kohya")
    assert any("init pissa not recorded" in n for n in report.notes)


def test_peft_converted_pissa_is_plain_lora_of_the_original_base(pissa):
    with open(os.path.join(pissa["converted"], "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["init_lora_weights"] is True and cfg["r"] == 4
    assert read_adapter_info(pissa["converted"]).init is None
    out = str(pissa["tmp"] / "o.safetensors")
    merge(pissa["paths"]["original"], [(pissa["converted"], 1.0)], output=out, device="cpu")
    merged = load_file(out)
    for k, want in pissa["merged_peft"].items():
        assert torch.allclose(merged[k], want, atol=2e-6), k
