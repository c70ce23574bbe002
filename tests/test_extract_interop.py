"""extract's output formats (spec/extract.md section 3): the PEFT directory loads in PEFT and
computes what loratool's merge of the same adapter computes; kohya holds what it can and
refuses, by name, what it cannot.

Oracles: ``PeftModel.from_pretrained`` on a tiny LLaMA built from a config, and the tuned
model itself (within the reported error)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratool
from loratool import cli
from loratool.errors import LoraToolError
from loratool.model import Adapter, LoraModule
from loratool.ops.extract import extract

from _peft_extras_helpers import llama_config, save_base


def _tuned_llama(tmp_path):
    """(base path, tuned path, config): a tiny LLaMA with biases, and the same model with a
    rank-2 delta merged into every projection, one norm, one bias and one embedding row
    changed."""
    from transformers import LlamaForCausalLM
    cfg = llama_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    bpath = str(tmp_path / "base.safetensors")
    base = save_base(model, bpath)
    g = torch.Generator().manual_seed(3)
    mods = {}
    for name, w in base.items():
        if name.endswith("_proj.weight"):
            mod = name.removesuffix(".weight")
            A = torch.randn(2, w.shape[1], generator=g) * 0.3
            B = torch.randn(w.shape[0], 2, generator=g) * 0.3
            mods[mod] = LoraModule(mod, "linear", "out_in", A, B, 2.0)
    merged = str(tmp_path / "merged.safetensors")
    loratool.merge(bpath, [(Adapter(modules=mods, alpha=2.0), 1.0)], output=merged)
    tuned = load_file(merged)
    tuned["model.layers.1.post_attention_layernorm.weight"] *= 1.5
    tuned["model.layers.0.self_attn.q_proj.bias"] += 0.5
    tuned["model.embed_tokens.weight"][5] += 0.75
    tpath = str(tmp_path / "tuned.safetensors")
    save_file(tuned, tpath)
    return bpath, tpath, cfg


def _model(cfg, state):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.slow
def test_peft_output_loads_in_peft_and_computes_our_merge(tmp_path):
    from peft import PeftModel
    bpath, tpath, cfg = _tuned_llama(tmp_path)
    result = extract(bpath, tpath, rank=2)
    assert {o["name"]: o["action"] for o in result.report["others"]} == {
        "model.layers.1.post_attention_layernorm.weight": "replaced",
        "model.layers.0.self_attn.q_proj.bias": "replaced",
        "model.embed_tokens.weight": "replaced_rows"}
    out = tmp_path / "peft"
    result.save(out, to="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    keys = set(load_file(out / "adapter_model.safetensors"))
    # a bias delta is never a lora_B.bias without lora_bias: the bias is a replaced tensor
    assert config["lora_bias"] is False and not any("lora_B.bias" in k for k in keys)
    assert config["modules_to_save"] == ["model.layers.1.post_attention_layernorm"]
    assert config["trainable_token_indices"] == {"model.embed_tokens": [5]}
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    ours = str(tmp_path / "ours.safetensors")
    loratool.merge(bpath, [(result.adapter, 1.0)], output=ours)
    ids = torch.tensor([[1, 5, 7, 5, 30, 2]])
    want = _logits(_model(cfg, load_file(ours)), ids)
    peft_model = PeftModel.from_pretrained(_model(cfg, load_file(bpath)), str(out)).eval()
    got = _logits(peft_model, ids)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    # merged by PEFT, the weights are ours (fp32: both round the same float64-exact delta)
    merged = peft_model.merge_and_unload().state_dict()
    for name, w in load_file(ours).items():
        assert torch.allclose(merged[name], w, rtol=0, atol=1e-6), name
    # and the tuned model within the certified error (rank 2 recovers the delta)
    tuned = _logits(_model(cfg, load_file(tpath)), ids)
    assert float((got - tuned).abs().max()) <= 1e-4 * scale


def test_kohya_output_holds_lora_modules_and_refuses_the_rest_by_name(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {"unet.up.proj.weight": torch.randn(12, 10, generator=g),
            "unet.up.proj.bias": torch.zeros(12), "unet.norm.weight": torch.ones(12)}
    tuned = dict(base)
    tuned["unet.up.proj.weight"] = base["unet.up.proj.weight"] + torch.randn(
        12, 2, generator=g) @ torch.randn(2, 10, generator=g)
    tuned["unet.norm.weight"] = base["unet.norm.weight"] * 2
    save_file(base, tmp_path / "b.safetensors")
    save_file(tuned, tmp_path / "t.safetensors")
    result = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=2)
    with pytest.raises(LoraToolError) as e:
        result.save(tmp_path / "k.safetensors", to="kohya")
    assert e.value.code == "LT306" and "unet.norm.weight" in e.value.message
    assert "--skip-others" in e.value.message and not (tmp_path / "k.safetensors").exists()
    result = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=2,
                     others="skip")
    result.save(tmp_path / "k.safetensors", to="kohya")
    keys = set(load_file(tmp_path / "k.safetensors"))
    assert keys == {"lora_unet_up_proj.lora_down.weight", "lora_unet_up_proj.lora_up.weight",
                    "lora_unet_up_proj.alpha"}
    back = loratool.load_adapter(tmp_path / "k.safetensors")
    (name, m), = back.modules.items()
    want = tuned["unet.up.proj.weight"].double() - base["unet.up.proj.weight"].double()
    assert float((m.delta(torch.float64) - want).norm() / want.norm()) <= 1e-6


def test_kohya_refusal_comes_before_any_svd(tmp_path, monkeypatch):
    # a changed norm (a replacement entry) and a changed embedding extracted as a LoRA
    # module: kohya holds neither, and extract(output=, to="kohya") says so after the first
    # pass over the tensors, before any spectrum is computed
    from loratool.ops.extract import build, engine
    g = torch.Generator().manual_seed(6)
    base = {"m.proj.weight": torch.randn(12, 10, generator=g), "m.norm.weight": torch.ones(12),
            "m.embed_tokens.weight": torch.randn(20, 6, generator=g)}
    tuned = dict(base)
    tuned["m.proj.weight"] = base["m.proj.weight"] + torch.randn(12, 2, generator=g) @ \
        torch.randn(2, 10, generator=g)
    tuned["m.norm.weight"] = base["m.norm.weight"] * 2
    tuned["m.embed_tokens.weight"] = base["m.embed_tokens.weight"].clone()
    tuned["m.embed_tokens.weight"][3] += 1.0
    b, t, out = tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "k.safetensors"
    save_file(base, b)
    save_file(tuned, t)

    def no_svd(*args, **kw):
        raise AssertionError("a spectrum was computed before the refusal")
    monkeypatch.setattr(build, "spectrum_for", no_svd)
    monkeypatch.setattr(engine, "exact", no_svd)
    monkeypatch.setattr(engine.Sketch, "grow", no_svd)
    with pytest.raises(LoraToolError) as e:
        extract(b, t, rank=2, output=out, to="kohya")
    assert e.value.code == "LT306" and "2 replaced tensor(s)" in e.value.message
    assert "m.embed_tokens.weight, m.norm.weight" in e.value.message
    with pytest.raises(LoraToolError) as e:
        extract(b, t, rank=2, others="skip", embeddings="lora", output=out, to="kohya")
    assert e.value.code == "LT306" and "replaced" not in e.value.message
    assert "1 module(s) of a kind it has no place for: m.embed_tokens" in e.value.message
    assert not out.exists()
    # an unchanged embedding makes no module, hence no refusal: the extraction runs
    monkeypatch.undo()
    tuned["m.embed_tokens.weight"] = base["m.embed_tokens.weight"]
    save_file(tuned, t)
    rep = extract(b, t, rank=2, others="skip", embeddings="lora", output=out, to="kohya")
    assert [r["name"] for r in rep.report["modules"]] == ["m.proj"]
    assert set(load_file(out)) == {"lora_m_proj.lora_down.weight", "lora_m_proj.lora_up.weight",
                                   "lora_m_proj.alpha"}


def test_cli_to_peft_and_kohya(tmp_path):
    g = torch.Generator().manual_seed(5)
    base = {"l.q_proj.weight": torch.randn(8, 6, generator=g), "l.norm.weight": torch.ones(8)}
    tuned = {"l.q_proj.weight": base["l.q_proj.weight"] + 1.0, "l.norm.weight": torch.ones(8)}
    save_file(base, tmp_path / "b.safetensors")
    save_file(tuned, tmp_path / "t.safetensors")
    b, t = str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")

    def run(*args):
        return CliRunner().invoke(cli.main, ["extract", b, t, "--rank", "1", "-q", *args])
    r = run("--to", "peft", "-o", str(tmp_path / "p"), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["format"] == "peft" and "tensor_hash" not in report
    assert loratool.load_adapter(tmp_path / "p").modules["l.q_proj"].rank == 1
    r = run("--to", "kohya", "-o", str(tmp_path / "k.safetensors"))
    assert r.exit_code == 0, r.output
    assert set(load_file(tmp_path / "k.safetensors")) == {
        "lora_l_q_proj.lora_down.weight", "lora_l_q_proj.lora_up.weight", "lora_l_q_proj.alpha"}
