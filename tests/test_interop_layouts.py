"""Issue 10 reader semantics against PEFT as the oracle: linear layouts never guessed (GPT-2
Conv1D in kohya files, PEFT's fan_in_fan_out on nn.Linear models), kohya alphas of any numeric
dtype, kohya names kept verbatim, one behaviour for a base of the wrong shape."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from _interop_helpers import randomize_lora, save_state_dict, tiny_gpt2, tiny_llama
from loratool.adapter import load_adapter
from loratool.errors import LoraToolError
from loratool.ops.convert import convert
from loratool.ops.merge import merge


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _close(ours, want, base) -> bool:
    tol = 8 * 2.0**-24 * (base.abs() + (want - base).abs()) + 1e-7
    return bool(((ours - want).abs() <= tol).all())


def _assert_equals_peft(merged_path, merged_peft, base_state, min_changed=2):
    merged = load_file(merged_path)
    changed = 0
    for key, want in merged_peft.items():
        if torch.equal(want, base_state[key]):
            assert torch.equal(merged[key], base_state[key]), key
            continue
        assert _close(merged[key], want, base_state[key]), (
            key, float((merged[key] - want).abs().max()))
        changed += 1
    assert changed >= min_changed


def _peft(model, tmp, name, **cfg):
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**cfg))
    randomize_lora(peft_model, 5)
    peft_model.eval()
    path = str(tmp / name)
    peft_model.save_pretrained(path)
    return path, _state(copy.deepcopy(peft_model).merge_and_unload())


# --- item 2: kohya file of a GPT-2 (Conv1D) adapter, square c_proj ---------------------------

@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2()
    base_state = _state(model)
    peft_dir, merged_peft = _peft(model, tmp, "peft", r=4, lora_alpha=8,
                                  target_modules=["c_attn", "c_proj", "c_fc"],
                                  fan_in_fan_out=True)
    kohya = str(tmp / "kohya.safetensors")
    convert(peft_dir, kohya, to="kohya")
    # a base with its config.json beside it, and the same weights without one
    with_cfg = tmp / "with_config"
    with_cfg.mkdir()
    save_state_dict(model, str(with_cfg / "model.safetensors"))
    model.config.to_json_file(str(with_cfg / "config.json"))
    bare = str(tmp / "bare.safetensors")
    save_state_dict(model, bare)
    return dict(tmp=tmp, kohya=kohya, merged_peft=merged_peft, base_state=base_state,
                base_cfg=str(with_cfg / "model.safetensors"), bare=bare, peft_dir=peft_dir)


def test_kohya_gpt2_square_module_layout_from_base_config(gpt2_case):
    c = gpt2_case
    out = str(c["tmp"] / "m1.safetensors")
    merge(c["base_cfg"], [(c["kohya"], 1.0)], output=out, device="cpu")
    _assert_equals_peft(out, c["merged_peft"], c["base_state"], min_changed=6)


def test_kohya_gpt2_square_module_without_config_is_refused_naming_the_option(gpt2_case):
    c = gpt2_case
    with pytest.raises(LoraToolError) as e:
        merge(c["bare"], [(c["kohya"], 1.0)], output=str(c["tmp"] / "m2.safetensors"),
              device="cpu")
    assert e.value.code == "LT309"
    assert "c_proj" in str(e.value) and "--fan-in-fan-out" in str(e.value)
    assert not os.path.exists(c["tmp"] / "m2.safetensors")
    # the explicit option decides
    out = str(c["tmp"] / "m3.safetensors")
    merge(c["bare"], [(c["kohya"], 1.0)], output=out, device="cpu",
          adapter_options={"fan_in_fan_out": True})
    _assert_equals_peft(out, c["merged_peft"], c["base_state"], min_changed=6)


def test_kohya_gpt2_convert_with_base_keeps_conv1d_layout(gpt2_case):
    c = gpt2_case
    out = str(c["tmp"] / "k.safetensors")
    convert(c["kohya"], out, base=c["base_cfg"])
    a = load_adapter(out)
    assert {m.layout for m in a.modules.values()} == {"in_out"}
    with pytest.raises(LoraToolError) as e:
        convert(c["kohya"], str(c["tmp"] / "k2.safetensors"), base=c["bare"])
    assert e.value.code == "LT309"
    # without any base, a Conv1D-named module is refused too (nothing shows its layout)
    with pytest.raises(LoraToolError) as e:
        convert(c["kohya"], str(c["tmp"] / "k3.safetensors"))
    assert e.value.code == "LT309"


def test_cli_no_fan_in_fan_out_option(gpt2_case):
    from click.testing import CliRunner

    from loratool.cli import main
    c = gpt2_case
    out = str(c["tmp"] / "k4.safetensors")
    res = CliRunner().invoke(main, ["convert", c["kohya"], "-o", out, "--no-fan-in-fan-out"])
    assert res.exit_code == 0, res.output
    assert {m.layout for m in load_adapter(out).modules.values()} == {"out_in"}
    res = CliRunner().invoke(main, ["convert", c["kohya"], "-o", out + "x"])
    assert res.exit_code == 1 and "[LT309]" in res.output and "--fan-in-fan-out" in res.output


# --- item 5: fan_in_fan_out: true on an nn.Linear model ----------------------------------------

@pytest.fixture(scope="module")
def llama_fif(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_fif")
    model = tiny_llama()
    base_state = _state(model)
    peft_dir, merged_peft = _peft(model, tmp, "peft", r=4, lora_alpha=8,
                                  target_modules=["q_proj", "o_proj", "up_proj"])
    cfg_path = os.path.join(peft_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["fan_in_fan_out"] = True  # PEFT warns and sets it False for nn.Linear at load
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with_cfg = tmp / "with_config"
    with_cfg.mkdir()
    save_state_dict(model, str(with_cfg / "model.safetensors"))
    model.config.to_json_file(str(with_cfg / "config.json"))
    bare = str(tmp / "bare.safetensors")
    save_state_dict(model, bare)
    return dict(tmp=tmp, peft=peft_dir, merged_peft=merged_peft, base_state=base_state,
                base_cfg=str(with_cfg / "model.safetensors"), bare=bare, model=model)


def test_peft_loads_the_flag_as_false_for_linear(llama_fif):
    # the oracle's own behaviour, so the test below asserts what PEFT does
    from peft import PeftModel
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        pm = PeftModel.from_pretrained(copy.deepcopy(llama_fif["model"]), llama_fif["peft"])
    merged = _state(pm.merge_and_unload())
    for k, v in llama_fif["merged_peft"].items():
        assert torch.equal(merged[k], v), k


def test_peft_fan_in_fan_out_corrected_from_base_config(llama_fif):
    c = llama_fif
    out = str(c["tmp"] / "m.safetensors")
    report = merge(c["base_cfg"], [(c["peft"], 1.0)], output=out, device="cpu")
    _assert_equals_peft(out, c["merged_peft"], c["base_state"], min_changed=6)
    del report
    res = convert(c["peft"], str(c["tmp"] / "a.safetensors"), base=c["base_cfg"])
    assert any("fan_in_fan_out=true corrected" in n and "q_proj" in n for n in res.notes)


def test_peft_fan_in_fan_out_square_without_config_is_refused(llama_fif):
    c = llama_fif
    with pytest.raises(LoraToolError) as e:
        merge(c["bare"], [(c["peft"], 1.0)], output=str(c["tmp"] / "m2.safetensors"),
              device="cpu")
    assert e.value.code == "LT309" and "--no-fan-in-fan-out" in str(e.value)
    # the non-square up_proj alone is decided by its base shape, with a note
    out = str(c["tmp"] / "m3.safetensors")
    merge(c["bare"], [(c["peft"], 1.0)], output=out, device="cpu",
          adapter_options={"fan_in_fan_out": False})
    _assert_equals_peft(out, c["merged_peft"], c["base_state"], min_changed=6)


def test_peft_flag_agreeing_with_names_needs_no_base(tmp_path):
    # PEFT writes fan_in_fan_out true for GPT-2 (c_attn...) and false for nn.Linear models:
    # those files read without a base as before.
    model = tiny_gpt2()
    peft_dir, _ = _peft(model, tmp_path, "g", r=2, target_modules=["c_proj"],
                        fan_in_fan_out=True)
    assert {m.layout for m in load_adapter(peft_dir).modules.values()} == {"in_out"}
    peft_dir, _ = _peft(tiny_llama(), tmp_path, "l", r=2, target_modules=["q_proj"])
    assert {m.layout for m in load_adapter(peft_dir).modules.values()} == {"out_in"}


# --- item 10: kohya alpha of any numeric dtype -------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_kohya_alpha_any_numeric_dtype(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    alpha = torch.tensor(6, dtype=dtype)
    path = str(tmp_path / "k.safetensors")
    save_file({"lora_unet_x_proj.lora_down.weight": down, "lora_unet_x_proj.lora_up.weight": up,
               "lora_unet_x_proj.alpha": alpha}, path)
    m = load_adapter(path).modules["unet.x_proj"]
    assert m.alpha == alpha.item() == 6  # the value diffusers reads (alpha.item())
    assert m.scale == 6 / 4


def test_kohya_alpha_from_diffusers_convert_state_dict_to_kohya(tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    g = torch.Generator().manual_seed(1)
    peft_sd = {"unet.down_blocks.0.proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "unet.down_blocks.0.proj.lora_B.weight": torch.randn(6, 2, generator=g)}
    kohya = convert_state_dict_to_kohya(peft_sd)
    assert any(v.dtype == torch.int64 for k, v in kohya.items() if k.endswith(".alpha"))
    path = str(tmp_path / "d.safetensors")
    save_file(kohya, path)
    (m,) = load_adapter(path).modules.values()
    assert m.alpha == 2


def test_kohya_alpha_not_numeric_is_refused(tmp_path):
    path = str(tmp_path / "b.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4),
               "lora_unet_x.lora_up.weight": torch.ones(3, 2),
               "lora_unet_x.alpha": torch.tensor(True)}, path)
    with pytest.raises(LoraToolError) as e:
        load_adapter(path)
    assert e.value.code == "LT305" and "BOOL" in str(e.value)


# --- item 14: kohya names without a base --------------------------------------------------------

def test_kohya_names_kept_verbatim_unless_a_model_part(tmp_path):
    path = str(tmp_path / "n.safetensors")
    t = {}
    for name in ("lora_lm_head", "lora_unet_mid_block_proj", "lora_te1_text_model_fc1",
                 "lora_model_layers_0_self_attn_q_proj"):
        t[name + ".lora_down.weight"] = torch.ones(2, 4)
        t[name + ".lora_up.weight"] = torch.ones(4, 2)
    save_file(t, path)
    a = load_adapter(path)
    assert sorted(a.modules) == ["lm_head", "model_layers_0_self_attn_q_proj",
                                 "te1.text_model_fc1", "unet.mid_block_proj"]
    from loratool import read_adapter_info
    info = read_adapter_info(path)
    assert info.details["model_parts"] == "te1, unet"
    # the round trip keeps every kohya name
    back = str(tmp_path / "back.safetensors")
    convert(path, back, to="kohya")
    assert sorted(load_file(back)) == sorted([*t, *(
        n[: -len(".lora_down.weight")] + ".alpha" for n in t if n.endswith("down.weight"))])


def test_kohya_lm_head_merges_into_a_base_by_underscored_match(tmp_path):
    model = tiny_llama()
    base = save_state_dict(model, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, 32, generator=g), torch.randn(64, 2, generator=g)
    path = str(tmp_path / "k.safetensors")
    save_file({"lora_lm_head.lora_down.weight": down, "lora_lm_head.lora_up.weight": up,
               "lora_lm_head.alpha": torch.tensor(2.0)}, path)
    out = str(tmp_path / "m.safetensors")
    merge(base, [(path, 1.0)], output=out, device="cpu")
    w0 = model.lm_head.weight.detach().double()
    want = (w0 + up.double() @ down.double()).float()
    assert torch.equal(load_file(out)["lm_head.weight"], want)


# --- item 16: a base of the wrong shape, the same for every format ----------------------------

def test_wrong_base_shape_same_behaviour_for_every_format(tmp_path):
    model = tiny_llama()
    peft_dir, _ = _peft(model, tmp_path, "p", r=2, target_modules=["q_proj", "up_proj"])
    sd = _state(model)
    # make two targets the wrong shape: all are listed, and --allow-missing skips them
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(30, 32)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
    base = str(tmp_path / "bad.safetensors")
    save_file(sd, base)
    native = str(tmp_path / "n.safetensors")
    convert(peft_dir, native)
    kohya = str(tmp_path / "k.safetensors")
    convert(peft_dir, kohya, to="kohya")
    for src in (peft_dir, native, kohya):
        with pytest.raises(LoraToolError) as e:
            merge(base, [(src, 1.0)], output=str(tmp_path / "x.safetensors"), device="cpu")
        msg = str(e.value)
        assert e.value.code == "LT411", (src, msg)
        assert "2 adapter module(s)" in msg and "q_proj" in msg and "up_proj" in msg, msg
        rep = merge(base, [(src, 1.0)], output=str(tmp_path / "y.safetensors"), device="cpu",
                    allow_missing=True, overwrite=True)
        assert len(rep.skipped) == 2, src
    # convert --base lists every module that does not fit
    with pytest.raises(LoraToolError) as e:
        convert(peft_dir, str(tmp_path / "z.safetensors"), base=base)
    assert e.value.code == "LT305" and "2 module(s)" in str(e.value)


def test_lt414_says_how_many_more(tmp_path):
    from loratool.model import Adapter, LoraModule
    from loratool.ops.merge import unmerge
    g = torch.Generator().manual_seed(0)
    mods = {f"m{i}": LoraModule(f"m{i}", "linear", "out_in", torch.randn(2, 4, generator=g),
                                torch.randn(3, 2, generator=g), 2.0,
                                magnitude=torch.rand(3, generator=g) + 1) for i in range(7)}
    base = str(tmp_path / "b.safetensors")
    save_file({f"m{i}.weight": torch.randn(3, 4, generator=g) for i in range(7)}, base)
    with pytest.raises(LoraToolError) as e:
        unmerge(base, [(Adapter(modules=mods, alpha=2.0), 1.0)],
                output=str(tmp_path / "u.safetensors"), force=True)
    assert e.value.code == "LT414" and "DoRA modules (7: " in str(e.value)
    assert "(2 more)" in str(e.value)
