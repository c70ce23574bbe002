"""PEFT ``target_parameters`` adapters (LoRA on MoE expert parameters) against PEFT itself.

Tiny GptOss (experts stored [E, in, out], ``is_transposed``) and Mixtral ([E, out, in]) models
built from configs: ``merge`` of the PEFT directory equals PEFT's ``merge_and_unload()`` within
float32 rounding, ``unmerge`` gives the base back, ``inspect`` shows the per-expert modules, and
what cannot hold them (convert targets, resize) refuses by name.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loratool import inspect  # noqa: E402
from loratool.errors import LoraToolError  # noqa: E402
from loratool.ops.convert import convert  # noqa: E402
from loratool.ops.merge import merge, unmerge  # noqa: E402
from loratool.ops.resize import resize  # noqa: E402


def _gpt_oss(hidden=16, inter=12):
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=8, num_local_experts=3, num_experts_per_tok=2,
                       max_position_embeddings=32, layer_types=["full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(cfg)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=32)
    return MixtralForCausalLM(cfg)


CASES = {
    # name: (factory, LoraConfig kwargs)
    "gptoss": (_gpt_oss, dict(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"], rank_pattern={"gate_up_proj": 3},
        alpha_pattern={"down_proj": 5})),
    "mixtral-rslora": (_mixtral, dict(r=3, lora_alpha=4, use_rslora=True, target_modules=[],
                                      target_parameters=["mlp.experts.down_proj"])),
}


def _rank_alpha(name: str, in_features: int) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives a parameter of the case: by its patterns (gate_up_proj has
    in = hidden = 16 in both tiny models, down_proj in = intermediate = 12)."""
    cfg = CASES[name][1]
    param = "gate_up_proj" if in_features == 16 else "down_proj"
    return (cfg.get("rank_pattern", {}).get(param, cfg["r"]),
            cfg.get("alpha_pattern", {}).get(param, cfg["lora_alpha"]))


def _build(factory, kwargs, tmp):
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # expert parameters are created empty: give every weight values
        for p in model.parameters():
            p.normal_(0, 0.5)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(tmp / "base.safetensors"))
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp / "peft"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    return dict(base=base, want={k: v.detach().clone() for k, v in merged.items()},
                base_path=str(tmp / "base.safetensors"), peft=str(tmp / "peft"), tmp=tmp)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    factory, kwargs = CASES[request.param]
    return dict(_build(factory, kwargs, tmp_path_factory.mktemp(request.param)),
                name=request.param)


def _close(got: dict, want: dict, base: dict) -> int:
    changed = 0
    for key, w in want.items():
        if torch.equal(w, base[key]):
            assert torch.equal(got[key], base[key]), key  # untouched: byte-identical
            continue
        tol = 8 * 2.0**-24 * (base[key].abs() + (w - base[key]).abs()) + 1e-7
        assert bool(((got[key] - w).abs() <= tol).all()), (key, float((got[key] - w).abs().max()))
        changed += 1
    return changed


def test_merge_equals_peft_and_unmerge_inverts(case):
    out = str(case["tmp"] / "merged.safetensors")
    report = merge(case["base_path"], [(case["peft"], 1.0)], output=out, device="cpu",
                   overwrite=True)
    merged = load_file(out)
    changed = _close(merged, case["want"], case["base"])
    experts = [k for k in case["want"] if k.endswith(("gate_up_proj", "down_proj"))
               and not torch.equal(case["want"][k], case["base"][k])]
    assert experts and changed == report.modules_merged  # every expert parameter changed
    back = load_file(unmerge(out, [(case["peft"], 1.0)], output=str(case["tmp"] / "u.st"),
                             device="cpu", output_format="safetensors").output)
    for key, w in case["base"].items():
        tol = 8 * 2.0**-24 * (w.abs() + (merged[key] - w).abs())
        assert bool(((back[key] - w).abs() <= tol).all()), key


def test_inspect_shows_expert_modules(case):
    rows = {r["name"]: r for r in inspect(case["peft"])["modules"]}
    experts = {n: r for n, r in rows.items() if r["kind"] == "experts"}
    # without a base the shapes and the config's patterns still tell the parameters apart
    # here (gptoss: rank 3 only divides gate_up_proj's lora_A rows); the orientation not
    want = {"model.layers.0.mlp.experts." + t.rpartition(".")[2]
            for t in CASES[case["name"]][1]["target_parameters"]}
    assert set(experts) == want
    assert {r["layout"] for r in experts.values()} == {"unknown"}
    assert {r["parameter"] for r in experts.values()} == {n.rpartition(".")[2] for n in want}
    for r in experts.values():
        assert r["experts"] == 3 and r["rank"] == _rank_alpha(case["name"], r["in"])[0]
        assert r["parameters"] == 3 * r["rank"] * (r["in"] + r["out"])
    # --stats: the Frobenius norm of all the experts' deltas, from the stored tensors
    stored = load_file(case["peft"] + "/adapter_model.safetensors")
    norms = {m["name"]: m["stats"]["norm"] for m in inspect(case["peft"], stats=True)["modules"]}
    for name, row in experts.items():
        depth = len(experts) - 1 - ["gate_up_proj", "down_proj"].index(row["parameter"]) \
            if len(experts) > 1 else 0
        key = "base_model.model.model.layers.0.mlp.experts" + ".base_layer" * depth
        A, B = stored[key + ".lora_A.weight"].double(), stored[key + ".lora_B.weight"].double()
        r, s = row["rank"], row["scale"]
        want = sum(float((s * B[:, e::3] @ A[e * r:(e + 1) * r]).square().sum())
                   for e in range(3)) ** 0.5
        assert abs(norms[name] - want) <= 1e-12 * want


def test_read_against_base_names_and_orients(case):
    from loratool.adapter import load_adapter
    ad = load_adapter(case["peft"], base=case["base_path"])
    experts = {n: m for n, m in ad.modules.items() if m.kind == "experts"}
    stored = load_file(case["peft"] + "/adapter_model.safetensors")
    cfg = CASES[case["name"]][1]
    want_names = {"model.layers.0.mlp.experts." + t.rpartition(".")[2]
                  for t in cfg["target_parameters"]}
    assert set(experts) == want_names
    for name, m in experts.items():
        param = case["base"][name]
        assert m.parameter == name.rpartition(".")[2]
        assert m.layout == ("in_out" if case["name"] == "gptoss" else "out_in")
        # PEFT nests wrappers in the module's parameter order: the first targeted parameter
        # (gate_up_proj in GptOss) innermost, its keys with the most ".base_layer" parts
        depth = len(want_names) - 1 - ["gate_up_proj", "down_proj"].index(m.parameter) \
            if len(want_names) > 1 else 0
        key = "base_model.model.model.layers.0.mlp.experts" + ".base_layer" * depth
        A, B = stored[key + ".lora_A.weight"].double(), stored[key + ".lora_B.weight"].double()
        E, (r, alpha) = param.shape[0], _rank_alpha(case["name"], m.info.in_features)
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        assert m.rank == r and m.scale == scale
        delta = m.delta()
        assert tuple(delta.shape) == tuple(param.shape)
        for e in range(E):  # expert e: lora_A rows e*r.., lora_B columns e, e+E, ...
            d = scale * B[:, e::E] @ A[e * r:(e + 1) * r]
            d = d.T if m.layout == "in_out" else d
            torch.testing.assert_close(delta[e], d, rtol=1e-12, atol=1e-12)


def test_convert_and_resize_refuse_by_name(case, tmp_path):
    with pytest.raises(LoraToolError) as e:
        convert(case["peft"], str(tmp_path / "a.safetensors"), base=case["base_path"])
    assert e.value.code == "LT306" and "target_parameters" in str(e.value)
    assert "mlp.experts" in str(e.value)
    with pytest.raises(LoraToolError) as e:
        resize(case["peft"], rank=1)
    assert e.value.code == "LT531" and "target_parameters" in str(e.value)


def test_square_experts_need_the_orientation(tmp_path):
    """GptOss with hidden == 2 * intermediate: gate_up_proj [E, 16, 16] fits either way, so the
    reader refuses (LT309) until told; told, the merge equals PEFT's."""
    c = _build(lambda: _gpt_oss(hidden=16, inter=8), dict(
        r=2, lora_alpha=4, target_modules=[], target_parameters=[
            "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), tmp_path)
    # one rank for both parameters: without a base the wrappers keep their key paths
    assert {r["name"]: r["experts"] for r in inspect(c["peft"])["modules"]} == {
        "model.layers.0.mlp.experts": 3, "model.layers.0.mlp.experts.base_layer": 3}
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(LoraToolError) as e:
        merge(c["base_path"], [(c["peft"], 1.0)], output=out, device="cpu")
    assert e.value.code == "LT309" and "gate_up_proj" in str(e.value)
    assert "--fan-in-fan-out" in str(e.value)
    merge(c["base_path"], [(c["peft"], 1.0)], output=out, device="cpu",
          adapter_options={"fan_in_fan_out": True})
    assert _close(load_file(out), c["want"], c["base"]) == 2
    # the base's config.json says gpt_oss, whose experts transformers marks is_transposed
    _gpt_oss(hidden=16, inter=8).config.to_json_file(str(tmp_path / "config.json"))
    merge(c["base_path"], [(c["peft"], 1.0)], output=out, device="cpu", overwrite=True)
    assert _close(load_file(out), c["want"], c["base"]) == 2


def test_a_parameter_that_does_not_fit_is_listed(case, tmp_path):
    """A base whose down_proj has another shape: merge lists that module (LT411) and, with
    --allow-missing, merges the others (gate_up_proj still equal to PEFT's)."""
    key = "model.layers.0.mlp.experts.down_proj"
    base = dict(case["base"])
    base[key] = torch.zeros(base[key].shape[0], base[key].shape[1] + 1, base[key].shape[2])
    bad = str(tmp_path / "bad.safetensors")
    save_file(base, bad)
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(LoraToolError) as e:
        merge(bad, [(case["peft"], 1.0)], output=out, device="cpu")
    assert e.value.code == "LT411" and f"`{key}`" in str(e.value)
    assert "gate_up_proj" not in str(e.value)
    report = merge(bad, [(case["peft"], 1.0)], output=out, device="cpu", allow_missing=True,
                   allow_no_change=True)
    assert [s["module"] for s in report.skipped] == [key]
    want = {k: v for k, v in case["want"].items() if k != key}
    _close({k: v for k, v in load_file(out).items() if k != key}, want, base)
