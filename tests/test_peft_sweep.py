"""A sweep over PEFT ``LoraConfig`` options on tiny models (issue 10, "Done when"): for every
combination, ``loratool merge`` of the saved adapter equals PEFT's ``merge_and_unload()`` of
it, or refuses with a LoraToolError code; it never exits 0 with a different model.

Models: LLaMA (sequence classification: nn.Linear, Embedding, a ``score`` head), GPT-2
(Conv1D, biases everywhere) and a small Conv2d network. Options drawn: bias, modules_to_save,
rank/alpha patterns, rsLoRA, DoRA, layers_to_transform, trainable_token_indices, LoRA on the
embedding (with the embedding layer saved). Tolerance: tensors PEFT leaves alone or replaces
are bit-exact; tensors with a low-rank update within rtol 1e-5, atol 1e-5 (PEFT's float32
DoRA arithmetic; plain LoRA stays within 1e-6).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from _peft_extras_helpers import llama_config, peft_merge, save_base
from loratool import LoraToolError
from loratool.ops.merge import merge


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.conv2 = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv2(self.conv(x)).mean((2, 3)))


def _model(kind: str):
    if kind == "llama":
        from transformers import LlamaForSequenceClassification
        return LlamaForSequenceClassification(llama_config())
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32,
                                          n_positions=16, tie_word_embeddings=False))
    return ConvNet()


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
           "conv": ["conv", "conv2"]}
SAVE = {"llama": ["score"], "gpt2": ["ln_f"], "conv": ["head"]}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte"}
LAYERED = {"llama", "gpt2"}

options = st.fixed_dictionaries({
    "model": st.sampled_from(["llama", "gpt2", "conv"]),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "modules_to_save": st.booleans(),
    "patterns": st.booleans(),
    "rslora": st.booleans(),
    "dora": st.booleans(),
    "layers": st.booleans(),
    "tokens": st.booleans(),
    "embedding": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def _config(o: dict) -> dict | None:
    kind = o["model"]
    targets = list(TARGETS[kind])
    kw = {"r": 2, "lora_alpha": 4, "init_lora_weights": False, "bias": o["bias"],
          "use_rslora": o["rslora"], "use_dora": o["dora"]}
    if kind == "gpt2":
        kw["fan_in_fan_out"] = True
    if o["modules_to_save"]:
        kw["modules_to_save"] = SAVE[kind]
    if o["patterns"]:
        kw["rank_pattern"] = {targets[0]: 3}
        kw["alpha_pattern"] = {targets[-1]: 7}
    if o["layers"] and kind in LAYERED:
        kw["layers_to_transform"] = [1]
    if o["tokens"] and kind in EMBEDDING:
        kw["trainable_token_indices"] = [1, 4]
    elif o["embedding"] and kind in EMBEDDING and not o["layers"]:
        targets.append(EMBEDDING[kind])
    kw["target_modules"] = targets
    return kw


def _check(o: dict) -> str:
    """'equal' or the refusal code."""
    from peft import LoraConfig, get_peft_model
    kind = o["model"]
    kw = _config(o)
    torch.manual_seed(o["seed"])
    model = _model(kind)
    with tempfile.TemporaryDirectory() as tmp:
        base_path = os.path.join(tmp, "base.safetensors")
        base_sd = save_base(model, base_path)
        try:
            peft_model = get_peft_model(model, LoraConfig(**kw))
        except (ValueError, TypeError, NotImplementedError):
            return "peft-refuses"  # a combination PEFT itself does not build
        g = torch.Generator().manual_seed(o["seed"] + 1)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.25)
        adapter_dir = os.path.join(tmp, "adapter")
        save_embedding = any(EMBEDDING.get(kind) == t for t in kw["target_modules"])
        peft_model.save_pretrained(adapter_dir, save_embedding_layers=save_embedding)
        fresh = _model(kind)
        fresh.load_state_dict(base_sd)
        oracle = peft_merge(fresh, adapter_dir)
        out = os.path.join(tmp, "merged.safetensors")
        try:
            merge(base_path, [adapter_dir], output=out)
        except LoraToolError as e:
            assert e.code and str(e), "a refusal names its reason"
            return e.code
        ours = load_file(out)
        assert set(ours) == set(oracle)
        for k, want in oracle.items():
            got = ours[k]
            if torch.equal(want, base_sd[k]):
                assert torch.equal(got, want), f"{k} changed but PEFT leaves it"
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=k)
        return "equal"


@pytest.mark.slow
@settings(max_examples=24, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(options)
def test_merge_equals_peft_or_refuses(o):
    outcome = _check(o)
    assert outcome in ("equal", "peft-refuses") or outcome.startswith("LT")


@pytest.mark.slow
@pytest.mark.parametrize("o", [
    # Every extra at once, one per model: must be equal, not refused.
    dict(model="llama", bias="all", modules_to_save=True, patterns=True, rslora=True,
         dora=False, layers=False, tokens=True, embedding=False, seed=1),
    dict(model="llama", bias="lora_only", modules_to_save=True, patterns=False, rslora=False,
         dora=True, layers=True, tokens=False, embedding=False, seed=2),
    dict(model="llama", bias="none", modules_to_save=False, patterns=False, rslora=False,
         dora=False, layers=False, tokens=False, embedding=True, seed=3),
    dict(model="gpt2", bias="all", modules_to_save=True, patterns=True, rslora=False,
         dora=False, layers=True, tokens=True, embedding=False, seed=4),
    dict(model="conv", bias="all", modules_to_save=True, patterns=True, rslora=True,
         dora=False, layers=False, tokens=False, embedding=False, seed=5),
], ids=["llama-all", "llama-dora", "llama-embedding", "gpt2-all", "conv-all"])
def test_known_combinations_merge_equal(o):
    assert _check(o) == "equal"
