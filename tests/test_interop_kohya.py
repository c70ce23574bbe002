"""kohya / sd-scripts files, written the way sd-scripts writes them (safetensors.torch.save_file,
``lora_unet_...``/``lora_te_...`` names, 0-dim ``.alpha`` in the save dtype, LoCon kxk down +
1x1 up, ``ss_*``/``modelspec.*`` metadata). The oracle for the delta is sd-scripts' forward
pass: ``org(x) + lora_up(lora_down(x)) * alpha / r``."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from loratool import convert, load_adapter, read_adapter_info
from loratool.errors import LoraToolError
from loratool.interop import detect_format
from loratool.interop import kohya as K
from loratool.interop.base import ReaderOptions
from loratool.model import Adapter, LoraModule
from loratool.naming import resolve_modules

# kohya name -> (in, out, kernel or None, rank, alpha or None)
MODULES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8, 1, 4, 1.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": (8, 8, 3, 4, 2.0),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8, None, 4, 1.0),
    "lora_unet_mid_block_attentions_0_proj_out": (8, 12, None, 2, 0.5),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (16, 16, None, 4, 3.0),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (16, 32, None, 4, 4.0),
}
BASE_KEYS = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_mid_block_attentions_0_proj_out": "mid_block.attentions.0.proj_out",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1",
}
METADATA = {
    "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0",
    "ss_base_model_version": "sd_v1", "ss_output_name": "tiny",
    "ss_tag_frequency": json.dumps({"img": {"a cat": 3}}), "ss_network_args": "{\"conv_dim\": 4}",
    "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "tiny", "sshs_model_hash": "0" * 64,
}


def _kohya_file(path, *, dtype=torch.float16, with_alpha=True, extra=None, seed=0):
    """Tensors as sd-scripts' LoRANetwork.save_weights writes them (save dtype applied to all,
    alpha included)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (cin, cout, k, r, alpha) in MODULES.items():
        if k is None:
            down, up = torch.randn(r, cin, generator=g), torch.randn(cout, r, generator=g)
        else:
            down = torch.randn(r, cin, k, k, generator=g)
            up = torch.randn(cout, r, 1, 1, generator=g)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        if with_alpha:
            sd[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    sd.update(extra or {})
    save_file(sd, path, metadata=METADATA)
    return path


def _base(path):
    g = torch.Generator().manual_seed(9)
    sd = {}
    for name, (cin, cout, k, r, alpha) in MODULES.items():
        shape = (cout, cin) if k is None else (cout, cin, k, k)
        sd[BASE_KEYS[name] + ".weight"] = torch.randn(shape, generator=g)
    sd["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 16, generator=g)
    save_file(sd, path)
    return path


def _read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_roundtrip_keeps_every_tensor_and_key(tmp_path, dtype):
    src = _kohya_file(str(tmp_path / "k.safetensors"), dtype=dtype)
    assert detect_format(src) == "kohya"
    mid, back = str(tmp_path / "mid.safetensors"), str(tmp_path / "back.safetensors")
    convert(src, mid)
    assert detect_format(mid) == "loratool"
    convert(mid, back, to="kohya")
    (a, ma), (b, mb) = _read_all(src), _read_all(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    assert ma == mb  # every ss_* / modelspec.* / sshs_* key, untouched
    # The loratool file in the middle keeps them too.
    assert {k: v for k, v in _read_all(mid)[1].items() if not k.startswith("loratool.")} == ma


def test_roundtrip_with_base_names_is_still_exact(tmp_path):
    src = _kohya_file(str(tmp_path / "k.safetensors"))
    base = _base(str(tmp_path / "base.safetensors"))
    mid, back = str(tmp_path / "mid.safetensors"), str(tmp_path / "back.safetensors")
    convert(src, mid, base=base)
    info = read_adapter_info(mid)
    assert sorted(info.modules) == sorted(
        ("unet." if k.startswith("lora_unet") else "te.") + v for k, v in BASE_KEYS.items())
    convert(mid, back, to="kohya")
    a, b = _read_all(src)[0], _read_all(back)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_names_without_base_are_underscored_and_resolve_later(tmp_path):
    src = _kohya_file(str(tmp_path / "k.safetensors"))
    info = read_adapter_info(src)
    assert "unet.down_blocks_0_resnets_0_conv1" in info.modules
    assert "te.text_model_encoder_layers_0_mlp_fc1" in info.modules
    assert info.details["names"].startswith("underscored")
    # merge's resolver still finds their base tensors by underscore matching
    base_keys = [v + ".weight" for v in BASE_KEYS.values()]
    mapping, unmatched = resolve_modules(info.modules, base_keys)
    assert not unmatched
    assert mapping["unet.down_blocks_0_resnets_0_conv1"] == "down_blocks.0.resnets.0.conv1"


def test_delta_matches_sd_scripts_forward(tmp_path):
    src = _kohya_file(str(tmp_path / "k.safetensors"), dtype=torch.float32)
    base = _base(str(tmp_path / "base.safetensors"))
    adapter = load_adapter(src, base=base)
    tensors = _read_all(src)[0]
    W = _read_all(base)[0]
    g = torch.Generator().manual_seed(1)
    for kname, (cin, cout, k, r, alpha) in MODULES.items():
        module = ("unet." if kname.startswith("lora_unet") else "te.") + BASE_KEYS[kname]
        m = adapter.modules[module]
        assert m.alpha == alpha and m.rank == r
        down = tensors[kname + ".lora_down.weight"].double()
        up = tensors[kname + ".lora_up.weight"].double()
        w = W[BASE_KEYS[kname] + ".weight"].double()
        merged = w + m.delta(torch.float64)
        scale = alpha / r
        if k is None:
            x = torch.randn(3, cin, generator=g, dtype=torch.float64)
            want = F.linear(x, w) + F.linear(F.linear(x, down), up) * scale
            got = F.linear(x, merged)
        else:
            x = torch.randn(2, cin, 6, 6, generator=g, dtype=torch.float64)
            pad = k // 2
            want = F.conv2d(x, w, padding=pad) + F.conv2d(F.conv2d(x, down, padding=pad),
                                                          up) * scale
            got = F.conv2d(x, merged, padding=pad)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=kname)


def test_file_without_alpha_means_alpha_is_rank(tmp_path):
    src = _kohya_file(str(tmp_path / "k.safetensors"), with_alpha=False)
    info = read_adapter_info(src)
    assert all(m.alpha == m.rank and m.scale == 1.0 for m in info.modules.values())
    assert "missing_alpha" in info.details
    back = str(tmp_path / "back.safetensors")
    convert(src, back, to="kohya")
    a, b = _read_all(src)[0], _read_all(back)[0]
    # every tensor kept exactly; the writer adds the alpha (= rank) that sd-scripts writes
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(b) - set(a) == {f"{n}.alpha" for n in MODULES}
    assert all(float(b[f"{n}.alpha"]) == MODULES[n][3] for n in MODULES)


def test_lycoris_tensors_are_unknown_to_the_kohya_reader(tmp_path):
    extra = {"lora_unet_x_proj.hada_w1_a": torch.zeros(2, 4),
             "lora_unet_x_proj.hada_w1_b": torch.zeros(4, 2),
             "lora_unet_x_proj.alpha": torch.tensor(1.0)}
    src = _kohya_file(str(tmp_path / "k.safetensors"), extra=extra)
    # detected as LyCORIS (tests/test_lycoris_io.py), whose reader names the broken LoHa
    with pytest.raises(LoraToolError) as e:
        load_adapter(src)
    assert e.value.code == "LT232" and e.value.module == "lora_unet_x_proj"
    # read as kohya, the LoHa tensors are unknown
    with pytest.raises(LoraToolError) as e:
        load_adapter(src, source_format="kohya")
    assert e.value.code == "LT303" and "LoHa" in e.value.message
    report = convert(src, str(tmp_path / "o.safetensors"), allow_unknown=True,
                     source_format="kohya")
    assert report.unknown_tensors == sorted(extra)
    assert read_adapter_info(str(tmp_path / "o.safetensors")).modules.keys() == \
        read_adapter_info(src, allow_unknown=True, source_format="kohya").modules.keys()


def test_writer_refuses_what_kohya_cannot_hold(tmp_path):
    g = torch.Generator().manual_seed(2)
    emb = LoraModule("model.embed_tokens", "embedding", "in_out", torch.randn(2, 10, generator=g),
                     torch.randn(4, 2, generator=g), alpha=2.0)
    with pytest.raises(LoraToolError) as e:
        K.save(Adapter(modules={emb.name: emb}, alpha=2.0), str(tmp_path / "a.safetensors"), ReaderOptions())
    assert e.value.code == "LT306" and "embedding" in e.value.message
    dora = LoraModule("q", "linear", "out_in", torch.randn(2, 4, generator=g),
                      torch.randn(3, 2, generator=g), alpha=2.0, magnitude=torch.ones(3))
    with pytest.raises(LoraToolError) as e:
        K.save(Adapter(modules={"q": dora}, alpha=2.0), str(tmp_path / "a.safetensors"), ReaderOptions())
    assert e.value.code == "LT306" and "DoRA" in e.value.message
    clash = {n: LoraModule(n, "linear", "out_in", torch.randn(2, 4, generator=g),
                           torch.randn(3, 2, generator=g), alpha=2.0) for n in ("a.b_c", "a_b.c")}
    with pytest.raises(LoraToolError) as e:
        K.save(Adapter(modules=clash, alpha=2.0), str(tmp_path / "a.safetensors"), ReaderOptions())
    assert e.value.code == "LT307"
    assert not os.path.exists(tmp_path / "a.safetensors")


def test_rslora_is_written_as_equivalent_alpha(tmp_path):
    g = torch.Generator().manual_seed(3)
    m = LoraModule("model.q_proj", "linear", "out_in", torch.randn(4, 6, generator=g),
                   torch.randn(5, 4, generator=g), alpha=3.0, scaling="rslora")
    out = str(tmp_path / "k.safetensors")
    notes = K.save(Adapter(modules={m.name: m}, alpha=3.0), out, ReaderOptions())
    assert any("rsLoRA" in n for n in notes)
    back = load_adapter(out).modules["model_q_proj"]  # no model part: the name is kept verbatim
    assert back.scaling == "standard" and back.scale == m.scale == 1.5
    assert _read_all(out)[0]["lora_model_q_proj.alpha"].dtype == torch.float32


def test_from_peft_style_names_and_back(tmp_path):
    g = torch.Generator().manual_seed(4)
    mods = {n: LoraModule(n, "linear", "out_in", torch.randn(2, 6, generator=g),
                          torch.randn(6, 2, generator=g), alpha=4.0)
            for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")}
    out = str(tmp_path / "k.safetensors")
    K.save(Adapter(modules=mods, alpha=4.0), out, ReaderOptions())
    assert sorted(_read_all(out)[0]) == sorted(
        f"lora_model_layers_{i}_{p}.{s}" for i, p in ((0, "self_attn_q_proj"),
                                                       (1, "mlp_down_proj"))
        for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    base = str(tmp_path / "base.safetensors")
    save_file({n + ".weight": torch.zeros(6, 6) for n in mods}, base)
    assert sorted(load_adapter(out, base=base).modules) == sorted(mods)


def test_ambiguous_underscore_names_need_map(tmp_path):
    src = str(tmp_path / "k.safetensors")
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.ones(2, 4),
               "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 2)}, src)
    base = str(tmp_path / "base.safetensors")
    save_file({"a.b_c.weight": torch.zeros(4, 4), "a_b.c.weight": torch.zeros(4, 4)}, base)
    with pytest.raises(LoraToolError) as e:
        read_adapter_info(src, base=base)
    assert e.value.code == "LT307" and "--map" in e.value.message
    info = read_adapter_info(src, base=base, name_map={"lora_unet_a_b_c": "unet.a_b.c"})
    assert list(info.modules) == ["unet.a_b.c"]


def test_check_data_and_validate(tmp_path):
    from loratool import validate
    bad = {"lora_unet_nan_proj.lora_down.weight": torch.tensor([[float("nan"), 1.0]]),
           "lora_unet_nan_proj.lora_up.weight": torch.zeros(2, 1)}
    src = _kohya_file(str(tmp_path / "k.safetensors"), extra=bad)
    report = validate(src)
    codes = sorted(f.code for f in report.findings)
    assert report.files[0].source_format == "kohya" and codes == ["LT209", "LT210"]
    with pytest.raises(LoraToolError) as e:
        load_adapter(src)
    assert e.value.code == "LT209"


def test_kohya_pt_file(tmp_path):
    src = _kohya_file(str(tmp_path / "k.safetensors"))
    tensors = _read_all(src)[0]
    pt = str(tmp_path / "old_kohya.pt")
    torch.save(tensors, pt)
    assert detect_format(pt) == "kohya"
    a, b = load_adapter(src), load_adapter(pt)
    assert a.modules.keys() == b.modules.keys()
    assert all(torch.equal(a.modules[n].B, b.modules[n].B) and a.modules[n].scale ==
               b.modules[n].scale for n in a.modules)
