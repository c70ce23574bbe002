"""PEFT extras (issue 10 item 1, item 7): modules_to_save, trained biases, trainable tokens and
saved embedding layers are replacement entries (spec adapter-format.md 4.1); merge applies
them as PEFT's ``merge_and_unload()`` does; convert keeps them or refuses by name; unmerge
refuses them; dropped tensors are listed; a merge that changes nothing is refused.

Oracle: PEFT 0.21 ``PeftModel.from_pretrained(base, dir).merge_and_unload()`` on tiny models
built from transformers configs. Replaced tensors (and untouched ones) are compared bit for
bit. Tensors with a low-rank update differ by PEFT's float32 arithmetic (``W + (B @ A) * s`` in
float32, rounded twice) from ours (float64, rounded once): at most 2 ulp, checked as
``rtol=1e-6, atol=1e-6``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from _peft_extras_helpers import llama_config, make_case, peft_merge
from loratool import LoraToolError
from loratool.adapter import load_adapter, read_adapter_info, save_adapter
from loratool.cli import main
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge, unmerge

QV = ["q_proj", "v_proj"]
CASES = {
    # name: (model class, LoraConfig keywords, make_case keywords, replaced base tensors)
    "modules_to_save": (LlamaForSequenceClassification,
                        dict(modules_to_save=["score"], target_modules=QV), {},
                        ["score.weight"]),
    "bias_all": (LlamaForCausalLM, dict(bias="all", target_modules=QV), {},
                 [f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1)
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj")]),
    "bias_lora_only": (LlamaForCausalLM, dict(bias="lora_only", target_modules=["q_proj"]), {},
                       ["model.layers.0.self_attn.q_proj.bias",
                        "model.layers.1.self_attn.q_proj.bias"]),
    "trainable_tokens": (LlamaForCausalLM,
                         dict(trainable_token_indices=[3, 5, 1], target_modules=["q_proj"]),
                         {}, ["model.embed_tokens.weight"]),
    "embedding_layers": (LlamaForCausalLM, dict(target_modules=["q_proj", "embed_tokens"]),
                         dict(save_embedding_layers=True, perturb_embedding=True),
                         ["model.embed_tokens.weight"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    cls, lora_kw, extra, replaced = CASES[request.param]
    tmp = str(tmp_path_factory.mktemp(request.param))
    base, adapter_dir, oracle = make_case(tmp, cls, llama_config(), lora_kw, **extra)
    return dict(name=request.param, cls=cls, tmp=tmp, base=base, adapter=adapter_dir,
                oracle=oracle, replaced=replaced)


def _compare(ours: dict, oracle: dict, exact: set[str]) -> None:
    assert set(ours) == set(oracle)
    base_changed = set()
    for k, want in oracle.items():
        got = ours[k]
        assert got.dtype == want.dtype, k
        if k in exact:
            assert torch.equal(got, want), k
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=k)
        base_changed.add(k)


def test_merge_equals_peft_merge_and_unload(case):
    out = os.path.join(case["tmp"], "merged.safetensors")
    report = merge(case["base"], [case["adapter"]], output=out)
    assert report.replacements_merged == len(case["replaced"])
    ours = load_file(out)
    lowrank = {k for k in ours if any(f".{t}.weight" in k for t in ("q_proj", "v_proj"))}
    if case["name"] == "embedding_layers":
        lowrank.add("model.embed_tokens.weight")  # replaced, then its LoRA delta added
    # Everything without a low-rank update (the replaced tensors included) is bit-exact.
    _compare(ours, case["oracle"], set(ours) - lowrank)
    base = load_file(case["base"])
    for t in case["replaced"]:
        assert not torch.equal(base[t], ours[t]), f"{t} was not replaced"


def test_replacements_are_read_and_inspected(case):
    info = read_adapter_info(case["adapter"])
    assert sorted(info.replacements) == sorted(case["replaced"])
    report = inspect(case["adapter"])
    assert report["totals"]["replacements"] == len(case["replaced"])
    assert [r["target"] for r in report["replacements"]] == sorted(case["replaced"])
    if case["name"] == "trainable_tokens":
        assert report["replacements"][0]["kind"] == "rows"
        assert report["replacements"][0]["rows"] == 3
    res = CliRunner().invoke(main, ["inspect", case["adapter"]])
    assert res.exit_code == 0, res.output
    assert f"replaced tensors ({len(case['replaced'])})" in res.output
    assert case["replaced"][0] in res.output


def test_convert_round_trip_is_bit_exact_and_loads_in_peft(case):
    tmp = case["tmp"]
    lt = os.path.join(tmp, "rt.safetensors")
    back = os.path.join(tmp, "rt_peft")
    report = convert(case["adapter"], lt, overwrite=True)
    assert sorted(report.replacements) == sorted(case["replaced"])
    assert read_adapter_info(lt).format_version == "1.1"
    convert(lt, back, to="peft", overwrite=True)
    want = load_file(os.path.join(case["adapter"], "adapter_model.safetensors"))
    got = load_file(os.path.join(back, "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # PEFT loads the written adapter and merges it into exactly what it merged from its own.
    fresh = case["cls"](llama_config())
    fresh.load_state_dict(load_file(case["base"]))
    merged = peft_merge(fresh, back)
    for k, v in case["oracle"].items():
        assert torch.equal(merged[k], v), k


def test_loratool_file_merges_like_the_peft_dir(case):
    lt = os.path.join(case["tmp"], "as_loratool.safetensors")
    convert(case["adapter"], lt, overwrite=True)
    a = os.path.join(case["tmp"], "a.safetensors")
    b = os.path.join(case["tmp"], "b.safetensors")
    merge(case["base"], [case["adapter"]], output=a, overwrite=True)
    merge(case["base"], [lt], output=b, overwrite=True)
    ta, tb = load_file(a), load_file(b)  # the headers' merge records name the sources
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("target", ["kohya", "loralib"])
def test_convert_refuses_targets_without_replacements(case, target):
    dst = os.path.join(case["tmp"], f"x.{target}.safetensors")
    with pytest.raises(LoraToolError) as e:
        convert(case["adapter"], dst, to=target, alpha=4.0)
    assert e.value.code == "LT306"
    assert case["replaced"][0] in str(e.value)
    assert not os.path.exists(dst)


def test_unmerge_of_replacements_is_refused(case):
    out = os.path.join(case["tmp"], "m2.safetensors")
    merge(case["base"], [case["adapter"]], output=out, overwrite=True)
    for force in (False, True):
        with pytest.raises(LoraToolError) as e:
            unmerge(out, [case["adapter"]], force=force)
        assert e.value.code == "LT430"
        assert case["replaced"][0] in str(e.value)


def test_bf16_base_replacements_round_once_like_peft(tmp_path):
    """The replaced tensor is rounded once (to nearest even) from the adapter's float32 to
    the bf16 base: what PEFT's load into a bf16 model holds."""
    base, adapter_dir, oracle = make_case(
        str(tmp_path), LlamaForSequenceClassification, llama_config(),
        dict(modules_to_save=["score"], target_modules=["q_proj"]), base_dtype=torch.bfloat16)
    out = str(tmp_path / "m.safetensors")
    merge(base, [adapter_dir], output=out)
    ours = load_file(out)
    assert ours["score.weight"].dtype == torch.bfloat16
    assert torch.equal(ours["score.weight"], oracle["score.weight"])
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert torch.equal(ours["score.weight"],
                       saved["base_model.model.score.weight"].to(torch.bfloat16))


def test_row_replacement_outside_the_base_is_listed(tmp_path):
    """trainable tokens for a larger vocabulary: LT411 naming the row, not a crash."""
    base, adapter_dir, _ = make_case(
        str(tmp_path), LlamaForCausalLM, llama_config(),
        dict(trainable_token_indices=[3, 30], target_modules=["q_proj"]))
    small = LlamaForCausalLM(llama_config(vocab_size=24))
    small_path = str(tmp_path / "small.safetensors")
    sd = load_file(base)
    sd["model.embed_tokens.weight"] = small.state_dict()["model.embed_tokens.weight"]
    sd["lm_head.weight"] = small.state_dict()["lm_head.weight"]
    save_file(sd, small_path)
    with pytest.raises(LoraToolError) as e:
        merge(small_path, [adapter_dir], output=str(tmp_path / "o.safetensors"))
    assert e.value.code == "LT411" and "replaces row 30" in str(e.value)


# --- never silently: dropped tensors, merges that change nothing ---------------------------

def _with_extra_tensor(adapter_dir: str, name: str) -> None:
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    sd = load_file(path)
    sd[name] = torch.ones(3)
    save_file(sd, path, metadata={"format": "pt"})


def test_allow_unknown_lists_every_dropped_tensor(tmp_path):
    base, adapter_dir, _ = make_case(str(tmp_path), LlamaForCausalLM, llama_config(),
                                     dict(target_modules=["q_proj"]))
    odd = "base_model.model.model.norm.running_stat"
    _with_extra_tensor(adapter_dir, odd)
    with pytest.raises(LoraToolError) as e:
        merge(base, [adapter_dir], output=str(tmp_path / "x.safetensors"))
    assert e.value.code == "LT303" and odd in str(e.value)
    report = merge(base, [adapter_dir], output=str(tmp_path / "m.safetensors"),
                   adapter_options={"allow_unknown": True})
    assert report.dropped == [{"adapter": adapter_dir, "tensor": odd}]
    assert any(odd in n for n in report.notes)
    res = CliRunner().invoke(main, ["merge", base, adapter_dir, "--allow-unknown", "--json",
                                    "-o", str(tmp_path / "c.safetensors")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["dropped"] == [{"adapter": adapter_dir, "tensor": odd}]
    assert "1 tensor(s) dropped" in res.stderr and odd in res.stderr
    res = CliRunner().invoke(main, ["convert", adapter_dir, "-o", str(tmp_path / "c2.safetensors"),
                                    "--allow-unknown", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["unknown_tensors"] == [odd]
    assert odd in res.stderr


def test_merge_that_changes_nothing_is_refused(tmp_path):
    """--allow-missing with an adapter for another model, and --allow-unknown on a file whose
    tensors are all unknown: LT431 unless --allow-no-change."""
    (tmp_path / "a").mkdir()
    base, adapter_dir, _ = make_case(str(tmp_path / "a"), LlamaForCausalLM, llama_config(),
                                     dict(target_modules=["q_proj"]))
    other = torch.nn.Linear(3, 3)
    other_base = str(tmp_path / "other.safetensors")
    save_file({"encoder.proj.weight": other.weight.detach().clone()}, other_base)
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(LoraToolError) as e:
        merge(other_base, [adapter_dir], output=out, allow_missing=True)
    assert e.value.code == "LT431" and "--allow-no-change" in str(e.value)
    assert not os.path.exists(out)
    res = CliRunner().invoke(main, ["merge", other_base, adapter_dir, "--allow-missing",
                                    "-o", out])
    assert res.exit_code == 1 and "[LT431]" in res.output
    report = merge(other_base, [adapter_dir], output=out, allow_missing=True,
                   allow_no_change=True)
    assert report.tensors_merged == 0 and os.path.exists(out)

    only_unknown = tmp_path / "unknown"
    only_unknown.mkdir()
    save_file({"base_model.model.model.layers.0.hada_w1_a": torch.ones(2, 2)},
              str(only_unknown / "adapter_model.safetensors"), metadata={"format": "pt"})
    (only_unknown / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(LoraToolError) as e:
        merge(base, [str(only_unknown)], output=str(tmp_path / "u.safetensors"),
              adapter_options={"allow_unknown": True})
    assert e.value.code == "LT431" and "1 tensor(s) dropped" in str(e.value)


def test_compose_refuses_and_resize_keeps_replacements(tmp_path):
    from loratool import compose, resize
    _, adapter_dir, _ = make_case(str(tmp_path), LlamaForSequenceClassification,
                                  llama_config(), dict(modules_to_save=["score"],
                                                       target_modules=["q_proj"]))
    adapter = load_adapter(adapter_dir)
    with pytest.raises(LoraToolError) as e:
        compose([(adapter, 0.5), (adapter, 0.5)])
    assert e.value.code == "LT538" and "score.weight" in str(e.value)
    again, _ = resize(adapter, rank=1)
    assert torch.equal(again.replacements["score.weight"].value,
                       adapter.replacements["score.weight"].value)


def test_save_adapter_writes_1_0_without_replacements_and_1_1_with(tmp_path):
    _, adapter_dir, _ = make_case(str(tmp_path), LlamaForCausalLM, llama_config(),
                                  dict(trainable_token_indices=[2, 4], target_modules=["q_proj"]))
    adapter = load_adapter(adapter_dir)
    p1 = str(tmp_path / "with.safetensors")
    save_adapter(adapter, p1)
    assert read_adapter_info(p1).format_version == "1.1"
    again = load_adapter(p1)
    rep = again.replacements["model.embed_tokens.weight"]
    assert rep.index.tolist() == [2, 4] and rep.index.dtype == torch.int64
    adapter.replacements = {}
    p2 = str(tmp_path / "without.safetensors")
    save_adapter(adapter, p2)
    assert read_adapter_info(p2).format_version == "1.0"


def test_two_adapters_replacing_one_tensor_are_refused(case):
    with pytest.raises(LoraToolError) as e:
        merge(case["base"], [case["adapter"], case["adapter"]],
              output=os.path.join(case["tmp"], "twice.safetensors"))
    assert e.value.code == "LT433"


@pytest.mark.parametrize("vector, code", [("replace_index_duplicate", "LT215"),
                                          ("replace_index_negative", "LT215"),
                                          ("replace_in_version_1_0", "LT216"),
                                          ("replace_index_count", "LT214")])
def test_loading_refuses_bad_replacement_vectors(vector, code):
    path = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors", "invalid",
                        vector + ".safetensors")
    with pytest.raises(LoraToolError) as e:
        load_adapter(path)
    assert e.value.code == code
