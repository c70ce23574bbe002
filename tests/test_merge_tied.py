"""Tied embeddings (issue 10, item 11) against PEFT: a LoRA on ``embed_tokens`` or on
``lm_head`` of a ``tie_word_embeddings`` model changes the one shared tensor, both in PEFT's
merge_and_unload and in ours, and the report says so."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from loratool.ops.merge import merge


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tied")
    model = _tied_llama()
    # a tied checkpoint stores the shared tensor once, as transformers' save_pretrained does
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"))
    model.config.to_json_file(str(tmp / "config.json"))
    return dict(tmp=tmp, model=model, base=str(tmp / "model.safetensors"), state=state)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_lora_merges_like_peft(tied, target):
    pm = get_peft_model(copy.deepcopy(tied["model"]), LoraConfig(
        r=2, lora_alpha=4, target_modules=[target], init_lora_weights=False))
    pm.eval()
    adapter = str(tied["tmp"] / f"peft_{target}")
    pm.save_pretrained(adapter, save_embedding_layers=False)
    merged_peft = copy.deepcopy(pm).merge_and_unload()
    emb = merged_peft.model.embed_tokens.weight.detach()
    assert torch.equal(merged_peft.lm_head.weight, emb)  # PEFT: both changed, one tensor
    out = str(tied["tmp"] / f"m_{target}.safetensors")
    report = merge(tied["base"], [(adapter, 1.0)], output=out, device="cpu")
    note = " ".join(report.notes)
    assert "tie_word_embeddings" in note and ("head changes too" in note
                                              or "input embedding changes too" in note)
    merged = load_file(out)
    w0 = tied["state"]["model.embed_tokens.weight"]
    assert not torch.equal(emb, w0)
    tol = 8 * 2.0**-24 * (w0.abs() + (emb - w0).abs()) + 1e-7
    assert bool(((merged["model.embed_tokens.weight"] - emb).abs() <= tol).all())
    # transformers re-ties the head at load: the merged model computes what PEFT's computes
    fresh = _tied_llama()
    fresh.load_state_dict(merged, strict=False)
    fresh.tie_weights()
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, merged_peft(ids).logits, atol=1e-5)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
@pytest.mark.parametrize("out_ext", ["pt", "safetensors"])
def test_tied_bin_base_with_config_applies_delta_once(tied, tmp_path, target, out_ext):
    """A ``.bin`` base whose ``lm_head.weight`` and ``embed_tokens.weight`` share storage, with
    ``tie_word_embeddings: true`` beside it: the config-based tie (``lm_head`` merged into the
    embedding) and the storage-based one (a tied group gets every update of its members)
    both apply; the delta must still be added exactly once, equal to merge_and_unload()."""
    model = tied["model"]
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save(state, str(tmp_path / "pytorch_model.bin"))  # keeps the shared storage
    model.config.to_json_file(str(tmp_path / "config.json"))
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=[target], init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=False)
    want = copy.deepcopy(pm).merge_and_unload().model.embed_tokens.weight.detach()
    out = str(tmp_path / f"merged.{out_ext}")
    report = merge(str(tmp_path / "pytorch_model.bin"), [(str(tmp_path / "peft"), 1.0)],
                   output=out, device="cpu")
    assert report.modules_merged == 1
    notes = " ".join(report.notes)
    assert "tie_word_embeddings" in notes and "share one storage" in notes
    merged = (torch.load(out, weights_only=True) if out_ext == "pt" else load_file(out))
    w0 = state["model.embed_tokens.weight"]
    delta = want.double() - w0.double()
    assert float(delta.abs().max()) > 1e-3
    tol = 8 * 2.0**-24 * (w0.abs() + delta.abs().float()) + 1e-7
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        # once: twice would be off by the whole delta
        assert bool(((merged[key] - want).abs() <= tol).all()), key
    if out_ext == "pt":  # still one storage
        assert merged["lm_head.weight"].data_ptr() == merged["model.embed_tokens.weight"].data_ptr()
