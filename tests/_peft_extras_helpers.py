"""Tiny transformers models with PEFT adapters that save more than LoRA factors
(modules_to_save, biases, trainable tokens, embedding layers), and PEFT's own
``merge_and_unload()`` of them: the oracle of tests/test_peft_extras.py."""

from __future__ import annotations

import os

import torch


def llama_config(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0,
                attention_bias=True, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def save_base(model, path: str, dtype=None) -> dict:
    """Write the model's state dict as a safetensors base; returns it (cloned)."""
    from safetensors.torch import save_file
    sd = {k: v.detach().clone().to(dtype or v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, path)
    return sd


def make_case(tmp, cls, cfg, lora_kw: dict, *, save_embedding_layers=False, seed=0,
              base_dtype=None, perturb_embedding=False):
    """(base path, adapter dir, oracle state dict): a trained-looking adapter (every trainable
    tensor moved off its initial value) and PEFT's merge of it into a fresh copy of the base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(seed)
    model = cls(cfg)
    base_path = os.path.join(tmp, "base.safetensors")
    base_sd = save_base(model, base_path, base_dtype)
    lora_kw = {"r": 2, "lora_alpha": 4, "init_lora_weights": False, **lora_kw}
    peft_model = get_peft_model(model, LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.25)
        if perturb_embedding:  # new token rows, as after resize_token_embeddings + training
            emb = peft_model.get_input_embeddings()
            w = emb.base_layer.weight if hasattr(emb, "base_layer") else emb.weight
            w[-4:] = torch.randn(w[-4:].shape, generator=g)
    adapter_dir = os.path.join(tmp, "adapter")
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=save_embedding_layers)
    fresh = cls(cfg)
    if base_dtype is not None:
        fresh = fresh.to(base_dtype)
    fresh.load_state_dict(base_sd)
    oracle = peft_merge(fresh, adapter_dir)
    return base_path, adapter_dir, oracle


def peft_merge(model, adapter_dir: str) -> dict:
    from peft import PeftModel
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
