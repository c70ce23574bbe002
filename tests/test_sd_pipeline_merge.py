"""Merging kohya and LyCORIS files into a diffusers pipeline directory in one command
(``loratool.ops.merge.pipeline``): ``lora_unet_*`` goes to ``unet/``, ``lora_te_*`` to
``text_encoder/``. Oracles: diffusers 0.42's ``load_lora_weights`` path
(``lora_state_dict`` + ``load_lora_into_unet``/``load_lora_into_text_encoder``) and
``fuse_lora`` for a kohya LoRA; lycoris-lora 4.1.3's module forward for a LoHa. The pipeline
is built from configs (tiny UNet2DConditionModel + CLIPTextModel, ``save_pretrained``)."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.ops.merge import merge, unmerge

from diffusers import StableDiffusionPipeline  # noqa: E402
from test_interop_diffusers import _unet  # the tiny UNet of the diffusers tests
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

UNET_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0")
# diffusers 0.42's kohya path renames text-encoder attention LoRAs (self_attn q/k/v) to
# legacy ``to_q_lora`` keys that CLIPTextModel then ignores (UNEXPECTED): it applies the MLP
# ones, so those are the ones compared; the LoHa test covers a text-encoder k_proj
TE_TARGETS = ("mlp.fc1", "mlp.fc2")


def _text_encoder():
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16)).eval()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd") / "pipe"
    _unet().save_pretrained(root / "unet")
    _text_encoder().save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "PNDMScheduler"]}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root


def _targets(model, suffixes):
    return [n for n, m in model.named_modules() if n.endswith(suffixes)
            and isinstance(m, torch.nn.Linear)]


def _kohya(path, seed=5):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, model, suffixes in (("lora_unet_", _unet(), UNET_TARGETS),
                                    ("lora_te_", _text_encoder(), TE_TARGETS)):
        for name in _targets(model, suffixes):
            lin = model.get_submodule(name)
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(2, lin.in_features, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(lin.out_features, 2, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(sd, path)
    return path


def _diffusers_fused(path):
    unet, te = _unet(), _text_encoder()
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, network_alphas=alphas,
                                                        text_encoder=te)
    unet.fuse_lora()
    out = {}
    for comp, model in (("unet", unet), ("text_encoder", te)):
        if comp == "text_encoder":
            from peft.tuners.tuners_utils import BaseTunerLayer
            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m.merge()
        for name, mod in model.named_modules():
            if hasattr(mod, "base_layer"):
                out[f"{comp}/{name}.weight"] = mod.base_layer.weight.detach().clone()
    return out


def _weights(root, comp):
    f = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
    return load_file(os.path.join(root, comp, f))


def test_kohya_lora_into_pipeline_equals_diffusers_fuse(pipe, tmp_path):
    lora = _kohya(tmp_path / "kohya.safetensors")
    out = tmp_path / "merged"
    rep = merge(str(pipe), [str(lora)], output=str(out), device="cpu")
    n_unet, n_te = len(_targets(_unet(), UNET_TARGETS)), len(_targets(_text_encoder(),
                                                                     TE_TARGETS))
    assert (n_unet, n_te) == (16, 4)
    assert rep.output_format == "diffusers" and rep.modules_merged == n_unet + n_te
    assert {a["component"] for a in rep.adapters} == {"unet", "text_encoder"}
    assert sorted(os.listdir(out)) == sorted(os.listdir(pipe))  # every file is there
    assert (out / "scheduler" / "scheduler_config.json").read_text() == "{}"
    fused = _diffusers_fused(lora)
    assert len(fused) == n_unet + n_te
    for comp in ("unet", "text_encoder"):
        merged, base = _weights(out, comp), _weights(pipe, comp)
        changed = {k for k in base if not torch.equal(base[k], merged[k])}
        assert changed == {k.split("/", 1)[1] for k in fused if k.startswith(comp + "/")}
        for key in changed:
            want, w0 = fused[f"{comp}/{key}"], base[key]
            tol = 8 * 2.0**-24 * (w0.abs() + (want - w0).abs()) + 1e-7
            assert bool(((merged[key] - want).abs() <= tol).all()), key
    # and back
    back = tmp_path / "back"
    unmerge(str(out), [str(lora)], output=str(back), device="cpu")
    for comp in ("unet", "text_encoder"):
        b, w = _weights(back, comp), _weights(pipe, comp)
        assert all(torch.allclose(b[k], w[k], rtol=0, atol=1e-6) for k in w)


def test_loha_into_pipeline_equals_lycoris_forward(pipe, tmp_path):
    from lycoris.modules.loha import LohaModule
    unet, te = _unet(), _text_encoder()
    # sd-scripts names the text encoder's modules by transformers 4 paths
    # (``lora_te_text_model_encoder_...``); transformers 5 saves CLIPTextModel without the
    # ``text_model.`` level: the name still finds its tensor
    targets = {("lora_unet", unet, "down_blocks.0.attentions.0.proj_in"),
               ("lora_unet", unet, "down_blocks.0.resnets.0.conv1"),
               ("lora_te_text_model", te, "encoder.layers.1.self_attn.k_proj")}
    sd, ref = {}, {}
    g = torch.Generator().manual_seed(3)
    for i, (prefix, model, path) in enumerate(sorted(targets, key=lambda t: t[2])):
        orig = model.get_submodule(path)
        W, b = orig.weight.detach().clone(), orig.bias.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = LohaModule(f"{prefix}_{path.replace('.', '_')}", orig, multiplier=1.0,
                             lora_dim=2, alpha=1.0)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        mod.apply_to()
        x = (torch.randn(2, W.shape[1], 5, 5, generator=g) if W.dim() == 4
             else torch.randn(3, W.shape[1], generator=g))
        with torch.no_grad():
            ref[path] = (x, orig(x), b)
        sd.update({k: v.detach().clone().contiguous()
                   for k, v in mod.state_dict(prefix=mod.lora_name + ".").items()})
    loha = tmp_path / "loha.safetensors"
    save_file(sd, loha)
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["merge", str(pipe), str(loha), "-o", str(out),
                                  "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["modules_merged"] == 3
    for path, (x, y, b) in ref.items():
        comp = "text_encoder" if path.startswith("encoder") else "unet"
        W = _weights(out, comp)[path + ".weight"]
        got = (F.conv2d(x, W, b, padding=W.shape[-1] // 2) if W.dim() == 4
               else F.linear(x, W, b))
        assert float((got - y).norm() / y.norm()) <= 1e-5, path


def test_module_of_a_missing_part_is_refused_or_listed(pipe, tmp_path):
    lora = _kohya(tmp_path / "k.safetensors")
    sd = load_file(lora)
    sd.update({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj." + p: v
               for p, v in (("lora_down.weight", torch.ones(2, 12)),
                            ("lora_up.weight", torch.ones(12, 2)), ("alpha", torch.tensor(2.)))})
    save_file(sd, tmp_path / "te2.safetensors")
    with pytest.raises(LoraToolError) as e:
        merge(str(pipe), [str(tmp_path / "te2.safetensors")], output=str(tmp_path / "o"),
              device="cpu")
    assert e.value.code == "LT411" and "te2.text_model" in e.value.message
    rep = merge(str(pipe), [str(tmp_path / "te2.safetensors")], output=str(tmp_path / "o"),
                device="cpu", allow_missing=True)
    assert rep.modules_merged == 20
    assert any("te2.text_model" in n for n in rep.notes)


def test_output_that_is_an_adapter_is_refused_in_every_input_form(pipe, tmp_path):
    lora = _kohya(tmp_path / "k.safetensors")
    before = open(lora, "rb").read()
    for adapters in ([str(lora)], [(str(lora), 0.5)], (str(lora), 0.5)):
        with pytest.raises(LoraToolError) as e:
            merge(str(pipe), adapters, output=str(lora), overwrite=True, device="cpu")
        assert e.value.code == "LT502"
    assert open(lora, "rb").read() == before


# --- single-file (LDM) checkpoints -------------------------------------------------------------

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut":
        "skip_connection"}


def _ldm_key(key: str, lpb: int, up_attn: set) -> str:
    """The test's own diffusers -> LDM rule for a UNet with ``lpb`` layers per block (checked
    against diffusers' convert_ldm_unet_checkpoint below)."""
    p = key.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    for d, l in fixed.items():
        if key.startswith(d + "."):
            return l + key[len(d):]

    def res(rest):
        return ".".join([_RES.get(rest[0], rest[0])] + rest[1:])
    if p[0] == "mid_block":
        j = int(p[2])
        if p[1] == "attentions":
            return "middle_block.1." + ".".join(p[3:])
        return f"middle_block.{2 * j}." + res(p[3:])
    b = int(p[1])
    if p[0] == "down_blocks":
        if p[2] == "downsamplers":
            return f"input_blocks.{(lpb + 1) * (b + 1)}.0.op." + ".".join(p[5:])
        n = (lpb + 1) * b + int(p[3]) + 1
        return (f"input_blocks.{n}.0." + res(p[4:]) if p[2] == "resnets"
                else f"input_blocks.{n}.1." + ".".join(p[4:]))
    if p[2] == "upsamplers":
        return (f"output_blocks.{(lpb + 1) * b + lpb}.{2 if b in up_attn else 1}.conv."
                + ".".join(p[5:]))
    n = (lpb + 1) * b + int(p[3])
    return (f"output_blocks.{n}.0." + res(p[4:]) if p[2] == "resnets"
            else f"output_blocks.{n}.1." + ".".join(p[4:]))


@pytest.fixture(scope="module")
def ldm(pipe, tmp_path_factory):
    """An SD 1.x single-file checkpoint of the pipeline: UNet under model.diffusion_model.,
    text encoder under cond_stage_model.transformer.text_model. (transformers 4 names)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    unet = _weights(pipe, "unet")
    up_attn = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.")
               and ".attentions." in k}
    sd = {"model.diffusion_model." + _ldm_key(k, 1, up_attn): v for k, v in unet.items()}
    back = convert_ldm_unet_checkpoint(sd, dict(_unet().config))  # diffusers' own rules
    assert back.keys() == unet.keys() and all(torch.equal(back[k], unet[k]) for k in unet)
    sd.update({"cond_stage_model.transformer.text_model." + k: v
               for k, v in _weights(pipe, "text_encoder").items()})
    path = tmp_path_factory.mktemp("ldm") / "sd15.safetensors"
    save_file(sd, path)
    return path, dict([(f"unet/{k}", "model.diffusion_model." + _ldm_key(k, 1, up_attn))
                       for k in unet]
                      + [(f"text_encoder/{k}", "cond_stage_model.transformer.text_model." + k)
                         for k in _weights(pipe, "text_encoder")])


def test_single_file_merge_maps_names_as_sd_scripts(pipe, ldm, tmp_path):
    path, where = ldm
    lora = _kohya(tmp_path / "kohya.safetensors")
    loha = tmp_path / "loha.safetensors"
    g = torch.Generator().manual_seed(9)
    save_file({  # a LoHa on a resnet's time_emb_proj (emb_layers.1 in the single file) and
        # on its 3x3 conv1 (in_layers.2), factors flattened as LyCORIS stores them
        **{f"lora_unet_down_blocks_0_resnets_0_time_emb_proj.{p}": torch.randn(s, generator=g)
           for p, s in (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 32)), ("hada_w2_a", (8, 2)),
                        ("hada_w2_b", (2, 32)))},
        **{f"lora_unet_down_blocks_0_resnets_0_conv1.{p}": torch.randn(s, generator=g) * 0.3
           for p, s in (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 72)), ("hada_w2_a", (8, 2)),
                        ("hada_w2_b", (2, 72)))},
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha": torch.tensor(1.0)}, loha)
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi"
    rep = merge(str(path), [str(lora), str(loha)], output=str(single), device="cpu")
    assert rep.modules_merged == 22 and not rep.skipped
    assert any("mapped to the single-file (LDM) names" in n for n in rep.notes)
    merge(str(pipe), [str(lora), str(loha)], output=str(multi), device="cpu")
    got = load_file(single)
    changed = 0
    for comp in ("unet", "text_encoder"):
        for k, v in _weights(multi, comp).items():
            assert torch.equal(got[where[f"{comp}/{k}"]], v), k  # bit for bit
            changed += not torch.equal(v, _weights(pipe, comp)[k])
    assert changed == 22
    assert got["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"].shape == (8, 32)


def test_mapping_table_of_sd15_and_sdxl_block_layouts():
    """The block layout sd-scripts converts (library/model_util.py: input_blocks.{3*i+j+1},
    output_blocks.{3*i+j}, upsampler at .1 without attentions else .2), on the key names of
    real SD 1.5 and SDXL UNets (two resnets per down block)."""
    from loratool.ops.merge.sd_single import diffusers_to_ldm, unet_prefixes
    sd15 = ["model.diffusion_model." + k + ".weight" for k in (
        "input_blocks.1.0.in_layers.2", "input_blocks.1.1.proj_in", "input_blocks.2.1.proj_in",
        "input_blocks.3.0.op", "input_blocks.4.1.proj_in", "input_blocks.6.0.op",
        "input_blocks.9.0.op", "input_blocks.11.0.in_layers.2", "middle_block.1.proj_in",
        "output_blocks.2.1.conv", "output_blocks.3.1.proj_in", "output_blocks.5.2.conv",
        "output_blocks.11.1.proj_out")]
    pre = unet_prefixes(sd15)
    for d, l in (("down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in"),
                 ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
                 ("down_blocks.3.resnets.1.conv1", "input_blocks.11.0.in_layers.2"),
                 ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
                 ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
                 ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
                 ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
                 ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
                 ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1")):
        assert diffusers_to_ldm(d, pre) == l, d
    sdxl = ["model.diffusion_model." + k + ".weight" for k in (
        "input_blocks.3.0.op", "input_blocks.4.1.proj_in", "input_blocks.6.0.op",
        "input_blocks.8.1.proj_in", "output_blocks.2.1.proj_in", "output_blocks.2.2.conv",
        "output_blocks.5.2.conv", "output_blocks.8.0.in_layers.2")]
    pre = unet_prefixes(sdxl)
    for d, l in (("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
                 ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
                 ("up_blocks.0.attentions.2.proj_in", "output_blocks.2.1.proj_in"),
                 ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
                 ("up_blocks.2.resnets.2.conv1", "output_blocks.8.0.in_layers.2")):
        assert diffusers_to_ldm(d, pre) == l, d


def test_sdxl_layout_names_both_ways():
    """Both name tables on an SDXL-layout UNet (two resnets per block, transformer depth 2,
    no attention in the last up block) against the test's own diffusers -> LDM rule: the
    single-file index finds every diffusers path's LDM weight, and the pipeline's index
    every LDM path's diffusers weight."""
    from diffusers import UNet2DConditionModel

    from loratool.ops.merge.sd_single import _index, ldm_index_of_diffusers
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
        transformer_layers_per_block=(1, 2, 2))
    keys = [k for k in unet.state_dict() if k.endswith(".weight")]
    up_attn = {int(k.split(".")[1]) for k in keys if k.startswith("up_blocks.")
               and ".attentions." in k}
    ldm = {k[:-7]: _ldm_key(k, 2, up_attn)[:-7] for k in keys}
    single = _index(["model.diffusion_model." + v + ".weight" for v in ldm.values()])["unet"]
    pipeline = ldm_index_of_diffusers(keys)
    for d, l in ldm.items():
        assert single[d.replace(".", "_")] == "model.diffusion_model." + l, d
        assert pipeline[l.replace(".", "_")] == d, l


def test_sdxl_style_ldm_unet_names_into_pipeline(pipe, tmp_path):
    """sd-scripts' SDXL UNet keeps the LDM names (``lora_unet_input_blocks_1_1_...``): merged
    into the pipeline's unet/ exactly as the same LoRA under diffusers names."""
    lora = _kohya(tmp_path / "kohya.safetensors")
    unet = _weights(pipe, "unet")
    up_attn = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.")
               and ".attentions." in k}
    renamed = {}
    for path in _targets(_unet(), UNET_TARGETS):
        old = "lora_unet_" + path.replace(".", "_")
        new = "lora_unet_" + _ldm_key(path + ".weight", 1, up_attn)[: -len(".weight")].replace(
            ".", "_")
        renamed[old] = new
    sd = load_file(lora)
    ldm_named = {}
    for k, v in sd.items():
        mod, _, p = k.partition(".")
        ldm_named[f"{renamed.get(mod, mod)}.{p}"] = v
    assert any(k.startswith("lora_unet_output_blocks_") for k in ldm_named)
    save_file(ldm_named, tmp_path / "ldm_named.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    merge(str(pipe), [str(lora)], output=str(a), device="cpu")
    rep = merge(str(pipe), [str(tmp_path / "ldm_named.safetensors")], output=str(b),
                device="cpu")
    assert rep.modules_merged == 20
    for comp in ("unet", "text_encoder"):
        wa, wb = _weights(a, comp), _weights(b, comp)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
