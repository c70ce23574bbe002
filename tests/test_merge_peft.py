"""PEFT as the oracle for merge: tiny transformers models built from configs (no downloads).

For each model: the weights loratool merges into the base checkpoint equal PEFT's
``merge_and_unload()`` weights within float32 rounding, and the model loaded with loratool's
merged checkpoint computes what the unmerged PEFT model computes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loratool.adapter import save_adapter  # noqa: E402
from loratool.model import Adapter, LoraModule  # noqa: E402
from loratool.ops.merge import merge  # noqa: E402


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


CASES = {
    # name: (model factory, part PEFT adapts, LoraConfig kwargs, rsLoRA)
    "llama": (_llama, None, dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "embed_tokens"])),
    "llama-dora": (_llama, None, dict(r=4, lora_alpha=8, use_dora=True,
                                      target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-conv1d-rslora": (_gpt2, None, dict(r=4, lora_alpha=6, use_rslora=True,
                                             fan_in_fan_out=True,
                                             target_modules=["c_attn", "c_proj", "c_fc"])),
    # PEFT adapts the inner BertModel (module paths "encoder.layer..."), the base checkpoint
    # is the whole classifier (keys "bert.encoder.layer..."): merge resolves the prefix.
    "bert-prefix-bias": (_bert, "bert", dict(r=4, lora_alpha=8, lora_bias=True,
                                             target_modules=["query", "value", "dense"])),
}


def _randomize(peft_model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def _to_loratool(peft_model) -> Adapter:
    """The loratool adapter equivalent to a PEFT model, read off its layers (independent of
    loratool's PEFT reader)."""
    mods = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        r, alpha = mod.r["default"], float(mod.lora_alpha["default"])
        scaling = "rslora" if math.isclose(mod.scaling["default"], alpha / math.sqrt(r)) \
            and not math.isclose(mod.scaling["default"], alpha / r) else "standard"
        if "default" in getattr(mod, "lora_embedding_A", {}):
            A = mod.lora_embedding_A["default"].detach().clone()
            B = mod.lora_embedding_B["default"].detach().clone()
            kind, layout, bias = "embedding", "in_out", None
        else:
            A = mod.lora_A["default"].weight.detach().clone()
            B = mod.lora_B["default"].weight.detach().clone()
            kind = "linear"
            layout = "in_out" if getattr(mod, "fan_in_fan_out", False) else "out_in"
            b = mod.lora_B["default"].bias
            bias = None if b is None else b.detach().clone()
        mag = None
        if "default" in getattr(mod, "lora_magnitude_vector", {}):
            mag = mod.lora_magnitude_vector["default"].weight.detach().clone().reshape(-1)
        mods[name] = LoraModule(name, kind, layout, A, B, alpha, scaling, mag, bias)
    return Adapter(modules=mods, alpha=8.0)


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    factory, part, kwargs = CASES[request.param]
    model = factory()
    base_state = _state(model)
    target = getattr(model, part) if part else model
    peft_model = get_peft_model(copy.deepcopy(target), LoraConfig(**kwargs))
    _randomize(peft_model, 3)
    peft_model.eval()
    tmp = tmp_path_factory.mktemp(request.param)
    base_path = str(tmp / "base.safetensors")
    save_file(base_state, base_path)
    adapter = _to_loratool(peft_model)
    adapter_path = str(tmp / "adapter.safetensors")
    save_adapter(adapter, adapter_path)
    peft_dir = str(tmp / "peft")
    peft_model.save_pretrained(peft_dir, save_embedding_layers=False)
    merged_peft = copy.deepcopy(peft_model).merge_and_unload()
    return dict(name=request.param, factory=factory, part=part, model=model,
                peft_model=peft_model, merged_peft=_state(merged_peft), base=base_path,
                adapter=adapter_path, peft_dir=peft_dir, tmp=tmp, base_state=base_state)


def _inputs(name: str):
    g = torch.Generator().manual_seed(9)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


def _check(case, out_path: str) -> None:
    merged = load_file(out_path)
    prefix = case["part"] + "." if case["part"] else ""
    # 1. weights equal PEFT's merge_and_unload() within float32 rounding
    checked = 0
    for key, w in case["merged_peft"].items():
        ours = merged[prefix + key]
        base = case["base_state"][prefix + key]
        if torch.equal(w, base):
            assert torch.equal(ours, base), key  # untouched stays byte-identical
            continue
        tol = 8 * 2.0**-24 * (base.abs() + (w - base).abs()) + 1e-7
        if "lora_magnitude" in key or case["name"] == "llama-dora":
            tol = tol + 2e-6 * w.abs()  # PEFT's float32 column norm
        assert bool(((ours - w).abs() <= tol).all()), (key, float((ours - w).abs().max()))
        checked += 1
    assert checked >= 3
    # 2. the merged model computes what the unmerged PEFT model computes
    fresh = case["factory"]()
    fresh.load_state_dict(merged, strict=True)
    fresh.eval()
    module = getattr(fresh, case["part"]) if case["part"] else fresh
    with torch.no_grad():
        want = case["peft_model"](**_inputs(case["name"]))
        got = module(**_inputs(case["name"]))
    key = "logits" if hasattr(want, "logits") and want.logits is not None else \
        "last_hidden_state"
    w, g = getattr(want, key), getattr(got, key)
    assert torch.allclose(g, w, atol=2e-5, rtol=1e-5), float((g - w).abs().max())
    # and the adapter really changes the model (the check has teeth)
    base_model = case["factory"]()
    base_model.eval()
    with torch.no_grad():
        plain = getattr(base_model, case["part"])(**_inputs(case["name"])) if case["part"] \
            else base_model(**_inputs(case["name"]))
    assert not torch.allclose(getattr(plain, key), w, atol=1e-3)


def test_merge_equals_peft_merge_and_unload(case):
    report = merge(case["base"], [(case["adapter"], 1.0)], device="cpu",
                   output=str(case["tmp"] / "merged.safetensors"), overwrite=True)
    assert report.skipped == []
    _check(case, report.output)


@pytest.mark.slow
def test_merge_peft_directory_directly(case):
    """The PEFT directory itself, read by loratool's PEFT reader against the base."""
    pytest.importorskip("loratool.interop.peft")
    report = merge(case["base"], [(case["peft_dir"], 1.0)], device="cpu",
                   output=str(case["tmp"] / "merged-peft.safetensors"), overwrite=True)
    assert report.adapters[0]["source_format"] == "peft"
    _check(case, report.output)
