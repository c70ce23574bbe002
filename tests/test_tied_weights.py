"""Tied weights in a base checkpoint (issue 10, item 6): a ``.bin``/``.pt`` state dict keeps
GPT-2's ``lm_head.weight`` and ``transformer.wte.weight`` (LLaMA with
``tie_word_embeddings``: ``lm_head``/``model.embed_tokens``) in one storage; a
``save_pretrained`` safetensors file drops the copy. After a merge, loading the model gives
the merged embedding AND head, both ways."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from loratool.adapter import save_adapter
from loratool.checkpoint import load_pickle_state_dict
from loratool.model import Adapter, LoraModule
from loratool.ops.merge import merge, unmerge


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(3)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), "transformer.wte"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), "model.embed_tokens"


def _embedding_adapter(name: str, vocab: int, dim: int, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(5)
    m = LoraModule(name, "embedding", "in_out", torch.randn(rank, vocab, generator=g),
                   torch.randn(dim, rank, generator=g) * 0.3, 8.0)
    return Adapter(modules={name: m}, alpha=8.0)


def _expected(model, emb: str, ad: Adapter, scale: float) -> torch.Tensor:
    W = dict(model.named_parameters())[emb + ".weight"].detach()
    delta = ad.modules[emb].delta(torch.float64)
    return (W.double() + scale * delta).float()


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama-tied"])
@pytest.mark.parametrize("out_name", ["merged.pt", "merged.safetensors"])
def test_bin_base_with_shared_storage(tmp_path, build, out_name):
    model, emb = build()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state[emb + ".weight"].data_ptr()
    base = str(tmp_path / "pytorch_model.bin")
    torch.save(state, base)
    ad = _embedding_adapter(emb, model.config.vocab_size, 32)
    ap = str(tmp_path / "a.safetensors")
    save_adapter(ad, ap)
    out = str(tmp_path / out_name)
    rep = merge(base, [(ap, 0.7)], output=out)
    assert any("tied weights" in n and "lm_head.weight" in n for n in rep.notes), rep.notes
    merged = (load_pickle_state_dict(out) if out.endswith(".pt") else load_file(out))
    if out.endswith(".pt"):  # tied storage stays tied
        assert merged["lm_head.weight"].data_ptr() == merged[emb + ".weight"].data_ptr()
    fresh, _ = build()
    fresh.load_state_dict(merged)
    expected = _expected(model, emb, ad, 0.7)
    params = dict(fresh.named_parameters())
    torch.testing.assert_close(params[emb + ".weight"], expected, rtol=2**-23, atol=1e-7)
    torch.testing.assert_close(fresh.lm_head.weight, expected, rtol=2**-23, atol=1e-7)
    # and unmerge gives the original back, both names
    back = str(tmp_path / ("back" + os.path.splitext(out_name)[1]))
    unmerge(out, [(ap, 0.7)], output=back)
    restored = load_pickle_state_dict(back) if back.endswith(".pt") else load_file(back)
    for name in ("lm_head.weight", emb + ".weight"):
        torch.testing.assert_close(restored[name], state[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama-tied"])
def test_save_pretrained_base_drops_the_copy(tmp_path, build):
    """transformers writes one model.safetensors without the tied head; the merged file,
    loaded with from_pretrained, ties the merged embedding to the head."""
    model, emb = build()
    src = tmp_path / "model"
    model.save_pretrained(str(src))
    assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))
    ad = _embedding_adapter(emb, model.config.vocab_size, 32)
    ap = str(tmp_path / "a.safetensors")
    save_adapter(ad, ap)
    dst = tmp_path / "merged"
    dst.mkdir()
    merge(str(src), [(ap, 1.0)], output=str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(json.loads((src / "config.json").read_text())))
    loaded = type(model).from_pretrained(str(dst)).eval()
    expected = _expected(model, emb, ad, 1.0)
    torch.testing.assert_close(dict(loaded.named_parameters())[emb + ".weight"], expected,
                               rtol=2**-23, atol=1e-7)
    torch.testing.assert_close(loaded.lm_head.weight, expected, rtol=2**-23, atol=1e-7)
