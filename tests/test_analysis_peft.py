"""The LoRA paper's analyses on real PEFT adapters (tiny transformers models from configs).

PEFT's own layers are the oracle for what A, B, the scale, the layout (GPT-2's Conv1D with
fan_in_fan_out) and the base weight are; the formulas are then evaluated densely in float64.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from _interop_helpers import delta_modules, randomize_lora, save_state_dict, tiny_gpt2, tiny_llama
from test_analysis import (TOL, amplification_oracle, assert_grid, assert_rel, phi_oracle,
                           right_vectors)
from loratool.ops.compose import compare
from loratool.ops.inspect import inspect

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


class _Dense:
    """A module seen through PEFT's layer: name, dense float64 delta [out, in]."""

    def __init__(self, name, layer, fan_in_fan_out):
        A = layer.lora_A["default"].weight.detach().to(torch.float64)
        B = layer.lora_B["default"].weight.detach().to(torch.float64)
        self.name = name
        self.A = A
        self.D = layer.scaling["default"] * (B @ A)
        # PEFT's own delta (float32, in the base weight's layout) agrees with ours:
        peft_delta = layer.get_delta_weight("default").detach().to(torch.float64)
        assert torch.allclose(peft_delta.T if fan_in_fan_out else peft_delta, self.D,
                              rtol=1e-5, atol=1e-7)
        W = layer.get_base_layer().weight.detach().to(torch.float64)
        self.W2 = W.T if fan_in_fan_out else W  # [out, in]


def _peft_adapter(tmp_path, case, *, r, seed, tag):
    factory, kwargs = CASES[case]
    base_model = factory()
    base = save_state_dict(base_model, str(tmp_path / "base.safetensors"))
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    pm = get_peft_model(base_model, LoraConfig(r=r, lora_alpha=2 * r, **kwargs))
    randomize_lora(pm, seed)
    out = str(tmp_path / f"peft-{tag}")
    pm.save_pretrained(out)
    fan = bool(kwargs.get("fan_in_fan_out"))
    return out, base, {n: _Dense(n, layer, fan) for n, layer in delta_modules(pm).items()}


def _by_base_path(name: str, dense: dict):
    """The PEFT module a loratool module name stands for (names may differ by a prefix)."""
    hits = [d for n, d in dense.items() if n == name or n.endswith("." + name)
            or name.endswith("." + n)]
    assert len(hits) == 1, (name, list(dense))
    return hits[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_amplification_of_a_peft_adapter(tmp_path, case):
    path, base, dense = _peft_adapter(tmp_path, case, r=4, seed=11, tag="a")
    report = inspect(path, base=base, seed=2)
    assert len(report["modules"]) == len(dense) > 0
    for row in report["modules"]:
        got = row["amplification"]
        d = dense[got["base_tensor"][: -len(".weight")]]
        ref = amplification_oracle(row["name"], d.D, d.W2, seed=2)
        assert got["rank"] == ref["rank"] == 4
        for key in ("delta_norm", "base_norm", "projection_norm", "amplification",
                    "top_projection_norm", "random_projection_norm"):
            assert_rel(got[key], ref[key])


@pytest.mark.parametrize("case", sorted(CASES))
def test_subspace_similarity_of_two_peft_runs(tmp_path, case):
    # Two "runs" (seeds) at ranks 4 and 8, as in the paper's Figure 3.
    p4, _, d4 = _peft_adapter(tmp_path, case, r=4, seed=21, tag="r4")
    p8, _, d8 = _peft_adapter(tmp_path, case, r=8, seed=22, tag="r8")
    for on in ("a", "delta"):
        report = compare(p4, p8, subspace=True, on=on)
        assert report["subspace"]["modules"] == len(d4) > 0
        for row in report["modules"]:
            a, b = _by_base_path(row["name"], d4), _by_base_path(row["name"], d8)
            if on == "a":
                ref = phi_oracle(right_vectors(a.A), right_vectors(b.A))
            else:
                ref = phi_oracle(right_vectors(a.D)[:, :4], right_vectors(b.D)[:, :8])
            assert_grid(row["subspace_similarity"], ref, TOL)
            assert row["subspace"]["dims"] == [4, 8]
