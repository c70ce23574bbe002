"""PEFT as the oracle: adapters saved by PEFT itself, converted PEFT -> loratool -> PEFT and
loaded back into PEFT give identical outputs; loratool's delta equals PEFT's get_delta_weight
for every module; loratool's reading of a DoRA magnitude reproduces PEFT's own merge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from loratool import convert, load_adapter, read_adapter_info  # noqa: E402
from loratool.errors import LoraToolError  # noqa: E402
from loratool.interop import detect_format  # noqa: E402
from loratool.interop import peft as P  # noqa: E402
from loratool.interop.base import ReaderOptions  # noqa: E402
from loratool.model import to_base_layout  # noqa: E402

from _interop_helpers import (ConvNet, delta_modules, dora_merge_reference, fresh,  # noqa: E402
                               from_base_layout,
                               randomize_lora, save_state_dict, tiny_gpt2, tiny_llama)


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gpt2": tiny_gpt2(), "conv": ConvNet().eval()}


def _inputs(kind):
    g = torch.Generator().manual_seed(7)
    if kind == "conv":
        return torch.randn(2, 3, 6, 6, generator=g)
    return torch.randint(0, 64, (2, 9), generator=g)


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


LLAMA_ATTN = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ATTN,
                                     rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                                     alpha_pattern={"q_proj": 5, "layers.0.mlp.down_proj": 3})),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=6, target_modules=LLAMA_ATTN,
                                   use_rslora=True)),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8,
                                      target_modules=["embed_tokens", "q_proj"])),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["embed_tokens", "q_proj", "down_proj"])),
    "llama-lora-bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"],
                                      lora_bias=True)),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj",
                                                                      "c_fc"],
                                 fan_in_fan_out=True, rank_pattern={"c_fc": 2})),
    "gpt2-dora": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                               fan_in_fan_out=True, use_dora=True)),
    "gpt2-lora-bias": ("gpt2", dict(r=3, lora_alpha=4, target_modules=["c_attn"],
                                    fan_in_fan_out=True, lora_bias=True)),
    "conv": ("conv", dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "lin"],
                          alpha_pattern={"c1": 7})),
    "conv-dora": ("conv", dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "lin"],
                               use_dora=True)),
}


def _make(models, case, tmp_path, **save_kwargs):
    which, kwargs = CASES[case]
    base = models[which]
    pm = get_peft_model(fresh(base), LoraConfig(**kwargs))
    randomize_lora(pm, seed=len(case))
    pm.eval()
    src = str(tmp_path / "peft_src")
    pm.save_pretrained(src, **save_kwargs)
    return base, pm, src


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_through_loratool_is_exact_in_peft(models, case, tmp_path):
    base, pm, src = _make(models, case, tmp_path, save_embedding_layers=False)
    mid = str(tmp_path / "adapter.safetensors")
    back = str(tmp_path / "peft_back")
    report = convert(src, mid)
    assert report.source_format == "peft" and report.target_format == "loratool"
    assert report.modules == len(delta_modules(pm))
    convert(mid, back, to="peft")
    x = _inputs(CASES[case][0])
    reloaded = PeftModel.from_pretrained(fresh(base), back).eval()
    assert torch.equal(_out(pm, x), _out(reloaded, x))
    # The tensors PEFT saved come back bit for bit, under the same names.
    from safetensors.torch import load_file
    a = load_file(os.path.join(src, "adapter_model.safetensors"))
    b = load_file(os.path.join(back, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_delta_equals_peft_get_delta_weight(models, case, tmp_path):
    base, pm, src = _make(models, case, tmp_path, save_embedding_layers=False)
    adapter = load_adapter(src)
    layers = delta_modules(pm)
    assert sorted(layers) == sorted(adapter.modules)
    for name, layer in layers.items():
        m = adapter.modules[name]
        if m.magnitude is not None:
            continue  # DoRA has no additive delta; checked against PEFT's merge below
        want = layer.get_delta_weight("default").double()
        got = m.delta(torch.float64)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("case", ["llama-dora", "gpt2-dora", "conv-dora"])
def test_dora_magnitude_reproduces_peft_merge(models, case, tmp_path):
    base, pm, src = _make(models, case, tmp_path, save_embedding_layers=False)
    adapter = load_adapter(src)
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    merged = fresh(pm).merge_and_unload().state_dict()
    checked = 0
    for name, m in adapter.modules.items():
        assert m.magnitude is not None and m.magnitude.shape == (m.B.shape[0],)
        W = before[name + ".weight"]
        want = merged[name + ".weight"].double()
        got = dora_merge_reference(W, m, (from_base_layout, to_base_layout))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(delta_modules(pm))


def test_lora_bias_is_read(models, tmp_path):
    base, pm, src = _make(models, "llama-lora-bias", tmp_path)
    adapter = load_adapter(src)
    for name, layer in delta_modules(pm).items():
        torch.testing.assert_close(adapter.modules[name].bias, layer.lora_B["default"].bias)


def test_patterns_resolve_like_peft(models, tmp_path):
    from peft.utils.other import get_pattern_key
    keys = ["v_proj", r"layers\.1\.mlp\.down_proj", "q", r"model\..*\.k_proj"]
    for name in ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.0.self_attn.q", "x.k_proj", "model.layers.0.self_attn.k_proj",
                 "q", "qq", "v_proj"]:
        assert P.get_pattern_key(keys, name) == get_pattern_key(keys, name)
    _, pm, src = _make(models, "llama-patterns", tmp_path)
    info = read_adapter_info(src)
    for name, layer in delta_modules(pm).items():
        m = info.modules[name]
        assert m.rank == layer.r["default"] and m.scale == layer.scaling["default"], name


def test_writer_patterns_survive_suffix_capture():
    # "q" would also capture "a.q" under PEFT's first-match rule; each keeps its own value.
    from loratool.interop._peft_save import _patterns
    pattern = _patterns({"a.q": 4, "q": 8, "b.k": 4}, 4)
    assert P.get_pattern_key(pattern, "a.q") != "q"
    resolve = lambda n: pattern.get(P.get_pattern_key(pattern, n), 4)  # noqa: E731
    assert (resolve("a.q"), resolve("q"), resolve("b.k")) == (4, 8, 4)


def test_saved_embedding_layer_is_a_replacement(models, tmp_path):
    """PEFT saves the base embedding beside its LoRA factors: read as a replacement of
    ``model.embed_tokens.weight`` (format 1.1), kept by convert, never dropped."""
    _, pm, src = _make(models, "llama-embedding", tmp_path)
    adapter = load_adapter(src)
    saved = pm.state_dict()["base_model.model.model.embed_tokens.base_layer.weight"]
    assert torch.equal(adapter.replacements["model.embed_tokens.weight"].value, saved)
    report = convert(src, str(tmp_path / "a.safetensors"))
    assert report.unknown_tensors == [] and report.replacements == ["model.embed_tokens.weight"]
    info = read_adapter_info(src)
    assert "unknown_tensors" not in info.details
    assert list(info.replacements) == ["model.embed_tokens.weight"]


def test_adapter_model_bin_reads_like_safetensors(models, tmp_path):
    _, pm, src = _make(models, "gpt2-conv1d", tmp_path)
    binary = str(tmp_path / "bin")
    pm.save_pretrained(binary, safe_serialization=False)
    assert os.path.exists(os.path.join(binary, "adapter_model.bin"))
    assert detect_format(binary) == "peft"
    assert detect_format(os.path.join(binary, "adapter_model.bin")) == "peft"
    a, b = load_adapter(src), load_adapter(binary)
    assert a.modules.keys() == b.modules.keys()
    for n in a.modules:
        assert torch.equal(a.modules[n].A, b.modules[n].A)
        assert a.modules[n].scale == b.modules[n].scale
        assert a.modules[n].layout == b.modules[n].layout == "in_out"


def test_layout_comes_from_base_when_config_is_wrong(models, tmp_path):
    base, pm, src = _make(models, "gpt2-conv1d", tmp_path)
    cfg_path = os.path.join(src, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["fan_in_fan_out"] = False  # wrong for GPT-2's Conv1D
    json.dump(cfg, open(cfg_path, "w"))
    # without a base, a flag that disagrees with Conv1D names is not trusted: refused (LT309)
    with pytest.raises(LoraToolError) as e:
        read_adapter_info(src)
    assert e.value.code == "LT309" and "--fan-in-fan-out" in e.value.message
    ckpt = save_state_dict(base, str(tmp_path / "base.safetensors"))
    # c_attn [32 -> 96] and c_fc [32 -> 128] are not square: the base tells; the square
    # c_proj needs the base's config.json (model_type gpt2)
    with pytest.raises(LoraToolError) as e:
        read_adapter_info(src, base=ckpt)
    assert e.value.code == "LT309" and "c_proj" in e.value.message
    base.config.to_json_file(str(tmp_path / "config.json"))
    info = read_adapter_info(src, base=ckpt)
    assert {m.layout for m in info.modules.values()} == {"in_out"}
    notes = P.load_report(src, ReaderOptions(base=ckpt)).notes
    assert any("fan_in_fan_out=false corrected" in n and "Conv1D" in n for n in notes)


def test_config_less_safetensors_needs_alpha(models, tmp_path):
    _, pm, src = _make(models, "conv", tmp_path)
    lone = str(tmp_path / "lone.safetensors")
    os.rename(os.path.join(src, "adapter_model.safetensors"), lone)
    assert detect_format(lone) == "peft"
    with pytest.raises(LoraToolError) as e:
        load_adapter(lone)
    assert e.value.code == "LT304" and "--alpha" in e.value.message
    adapter = load_adapter(lone, alpha=4)
    assert adapter.modules["lin"].scale == 2.0


def test_unsupported_config_is_refused(models, tmp_path):
    _, pm, src = _make(models, "conv", tmp_path)
    cfg_path = os.path.join(src, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    for key, value, code in (("peft_type", "LOHA", "LT302"),
                             ("layer_replication", [[0, 1]], "LT308")):
        json.dump({**cfg, key: value}, open(cfg_path, "w"))
        with pytest.raises(LoraToolError) as e:
            read_adapter_info(src)
        assert e.value.code == code
    json.dump({**cfg, "r": 3}, open(cfg_path, "w"))  # shapes say rank 2
    with pytest.raises(LoraToolError) as e:
        load_adapter(src)
    assert e.value.code == "LT305" and "rank" in e.value.message


def test_writer_refusals(models, tmp_path):
    _, pm, src = _make(models, "conv-dora", tmp_path)
    adapter = load_adapter(src)
    with pytest.raises(LoraToolError) as e:
        P.save(adapter, str(tmp_path / "x.safetensors"), ReaderOptions())
    assert e.value.code == "LT306"
    adapter.modules["lin"].magnitude = None  # now some modules are DoRA and some are not
    with pytest.raises(LoraToolError) as e:
        P.save(adapter, str(tmp_path / "out"), ReaderOptions())
    assert e.value.code == "LT306" and "DoRA" in e.value.message
    assert not os.path.exists(tmp_path / "out")


def test_mixed_scaling_is_folded_into_alpha_pattern(models, tmp_path):
    base, pm, src = _make(models, "llama-rslora", tmp_path)
    adapter = load_adapter(src)
    x = _inputs("llama")
    first = sorted(adapter.modules)[0]
    adapter.modules[first].scaling = "standard"
    adapter.modules[first].alpha = adapter.modules[first].alpha * 2  # alpha/sqrt(4) == 2alpha/4
    out = str(tmp_path / "mixed")
    notes = P.save(adapter, out, ReaderOptions())
    assert any("rsLoRA" in n for n in notes)
    reloaded = PeftModel.from_pretrained(fresh(base), out).eval()
    torch.testing.assert_close(_out(reloaded, x), _out(pm, x), rtol=1e-5, atol=1e-6)


def test_validate_reports_nan(models, tmp_path):
    from safetensors.torch import load_file, save_file

    from loratool import validate
    _, pm, src = _make(models, "conv", tmp_path)
    assert validate(src).ok
    path = os.path.join(src, "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.model.lin.lora_A.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    report = validate(src)
    assert not report.ok and [f.code for f in report.findings] == ["LT209"]
    with pytest.raises(LoraToolError) as e:
        load_adapter(src)
    assert e.value.code == "LT209"


def test_read_info_imports_no_torch(models, tmp_path):
    _, pm, src = _make(models, "conv", tmp_path)
    code = ("import sys; from loratool import read_adapter_info, validate; "
            f"i = read_adapter_info({src!r}); assert i.source_format == 'peft'; "
            f"assert validate({src!r}).ok; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))


def test_target_modules_and_details(models, tmp_path):
    _, pm, src = _make(models, "gpt2-dora", tmp_path)
    info = read_adapter_info(src)
    assert info.source_format == "peft"
    assert info.details["use_dora"] is True and info.details["fan_in_fan_out"] is True
    assert re.search("c_attn", info.details["target_modules"])
    assert all(m.magnitude for m in info.modules.values())
