"""diffusers LoRA files (issue 10, item 15) against diffusers 0.42 as the oracle, on a tiny
UNet built from a config: the alphas of ``lora_adapter_metadata`` are read, and a kohya file
converted from a diffusers file loads and applies in diffusers exactly as our merge."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool import convert, read_adapter_info
from loratool.ops.merge import merge

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4).eval()


def _fused(path):
    """What diffusers makes of a LoRA file: the two calls of ``load_lora_weights`` (without a
    whole pipeline: no tokenizer to download) into a fresh UNet, then fuse, read weights."""
    unet = _unet()
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=unet,
                                                metadata=metadata)
    unet.fuse_lora()
    out = {}
    for name, mod in unet.named_modules():
        if hasattr(mod, "base_layer"):
            out[name + ".weight"] = mod.base_layer.weight.detach().clone()
    return out


@pytest.fixture(scope="module")
def diff(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusers")
    unet = _unet()
    base_state = {k: v.clone().contiguous() for k, v in unet.state_dict().items()}
    base = str(tmp / "unet.safetensors")
    save_file(base_state, base)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     init_lora_weights=False)
    unet.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp / "lora"), unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=cfg.to_dict())
    return dict(tmp=tmp, base=base, base_state=base_state,
                file=str(tmp / "lora" / "pytorch_lora_weights.safetensors"))


def _assert_equal_to_diffusers(merged_path, fused, base_state):
    merged = load_file(merged_path)
    assert len(fused) == 32  # 2 blocks x 2 attentions x to_q/k/v/out.0 x (down, up)
    for key, want in fused.items():
        w0 = base_state[key]
        assert not torch.equal(want, w0), key  # the LoRA applied in diffusers
        tol = 8 * 2.0**-24 * (w0.abs() + (want - w0).abs()) + 1e-7
        assert bool(((merged[key] - want).abs() <= tol).all()), key


def test_alpha_comes_from_lora_adapter_metadata(diff):
    with safe_open(diff["file"], "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    info = read_adapter_info(diff["file"])
    assert {m.alpha for m in info.modules.values()} == {6.0}
    assert {m.scale for m in info.modules.values()} == {3.0}
    assert "diffusers" in info.details["peft_config"]


def test_merge_of_diffusers_file_equals_diffusers_fuse(diff):
    out = str(diff["tmp"] / "m.safetensors")
    merge(diff["base"], [(diff["file"], 1.0)], output=out, device="cpu")
    _assert_equal_to_diffusers(out, _fused(diff["file"]), diff["base_state"])


def test_convert_to_kohya_loads_and_applies_in_diffusers(diff):
    kohya = str(diff["tmp"] / "k.safetensors")
    report = convert(diff["file"], kohya, to="kohya")
    assert any("lora_adapter_metadata" in n for n in report.notes)
    with safe_open(kohya, "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
        assert all(k.startswith("lora_unet_") for k in f.keys())
    ours = str(diff["tmp"] / "mk.safetensors")
    merge(diff["base"], [(kohya, 1.0)], output=ours, device="cpu")
    _assert_equal_to_diffusers(ours, _fused(kohya), diff["base_state"])
    # and through a loratool file too
    native = str(diff["tmp"] / "n.safetensors")
    convert(diff["file"], native)
    kohya2 = str(diff["tmp"] / "k2.safetensors")
    convert(native, kohya2, to="kohya")
    _assert_equal_to_diffusers(ours, _fused(kohya2), diff["base_state"])


def test_text_encoder_component_becomes_lora_te():
    from loratool.interop.kohya import diffusers_parts, kohya_name
    parts = diffusers_parts(["unet.a", "text_encoder.text_model.encoder.layers.0.q_proj"])
    assert kohya_name("text_encoder.text_model.encoder.layers.0.q_proj", parts) == \
        "lora_te_text_model_encoder_layers_0_q_proj"
    parts = diffusers_parts(["text_encoder.x", "text_encoder_2.y"])
    assert (kohya_name("text_encoder.x", parts), kohya_name("text_encoder_2.y", parts)) == (
        "lora_te1_x", "lora_te2_y")


def test_kohya_to_peft_with_base_loads_in_peft(diff):
    from peft import PeftModel
    kohya = str(diff["tmp"] / "k3.safetensors")
    convert(diff["file"], kohya, to="kohya")
    peft_dir = str(diff["tmp"] / "peft")
    report = convert(kohya, peft_dir, to="peft", base=diff["base"])
    assert any("unet." in n and "base paths" in n for n in report.notes)
    with safe_open(peft_dir + "/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("base_model.model.unet.") for k in keys)
    model = PeftModel.from_pretrained(_unet(), peft_dir)
    merged = model.merge_and_unload().state_dict()
    ours = str(diff["tmp"] / "mp.safetensors")
    merge(diff["base"], [(kohya, 1.0)], output=ours, device="cpu")
    mine = load_file(ours)
    changed = 0
    for key, want in merged.items():
        w0 = diff["base_state"][key]
        tol = 8 * 2.0**-24 * (w0.abs() + (want - w0).abs()) + 1e-7
        assert bool(((mine[key] - want).abs() <= tol).all()), key
        changed += not torch.equal(want, w0)
    assert changed == 32
