"""Tiny models and adapters for the interop tests (PEFT, kohya, loralib as oracles).

Models are built from configs with random weights (no downloads) and are small enough that a
whole PEFT save / convert / reload cycle takes a fraction of a second.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """A 3x3 conv, a 1x1 conv and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 1)
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


def randomize_lora(peft_model, seed: int = 0, *, magnitude: bool = True) -> None:
    """Make every LoRA tensor non-trivial: B (and embedding B, lora_B.bias) random, DoRA
    magnitudes perturbed, so that no check passes because something is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name and magnitude:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def save_state_dict(model: nn.Module, path: str) -> str:
    """The model's weights as a safetensors base checkpoint (tied weights cloned)."""
    from safetensors.torch import save_file
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


def fresh(model):
    return copy.deepcopy(model)


def delta_modules(peft_model):
    """name (relative to the base model) -> PEFT LoRA layer, for every adapted module."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            out[name] = mod
    return out


def from_base_layout(w, info):
    """The base tensor as a 2-D [out, in*k] matrix (a view): the inverse of
    ``loratool.model.to_base_layout``, written independently for the DoRA reference."""
    if info.kind == "conv":
        return w.reshape(info.out_features, -1)
    if info.kind == "embedding" or info.layout == "in_out":
        return w.T
    return w


def dora_merge_reference(W, module, base_layout_fns):
    """Our reading of PEFT's DoRA merge: with W2 = W as [out, in*k] and V = W2 + delta,
    W2' = magnitude / ||V||_row * V. ``base_layout_fns`` = (from_base_layout, to_base_layout)."""
    from_base, to_base = base_layout_fns
    info = module.info
    W2 = from_base(W.double(), info)
    V = W2 + module.delta_matrix(torch.float64)
    norm = V.norm(dim=1, keepdim=True)
    return to_base(module.magnitude.double().reshape(-1, 1) / norm * V, info)


def listdir(path):
    return sorted(os.listdir(path))
