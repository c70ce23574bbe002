"""GGUF from the CLI and the library entry points: `convert --to gguf` and back, `inspect`
and `validate` of GGUF adapters, `merge`/`unmerge` with GGUF bases.

Oracles: PEFT (a tiny LLaMA built from a config, its own get_delta_weight), gguf's
GGUFReader/GGUFWriter/quants, and loratool.gguf.merge_gguf called directly with factors
taken from the PEFT model (the CLI's merge must write the same bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.gguf import LoraFactors, merge_gguf

HIDDEN, VOCAB, HEADS, KV_HEADS, INTER = 64, 96, 4, 2, 96
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LLaMA config.json and a PEFT adapter on it with per-module alpha and rank
    (no single alpha is exact, so the scales are baked into lora_b), and PEFT's deltas."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=2, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False)
    cfg.save_pretrained(d / "base")
    lcfg = LoraConfig(r=4, lora_alpha=8, rank_pattern={"k_proj": 8}, alpha_pattern={"v_proj": 3},
                      target_modules=["q_proj", "k_proj", "v_proj", "down_proj",
                                      "embed_tokens"])
    model = get_peft_model(LlamaForCausalLM(cfg).eval(), lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(d / "peft", save_embedding_layers=False)
    deltas, factors = {}, []
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            deltas[name] = mod.get_delta_weight("default").detach().double().numpy()
            emb = "default" in mod.lora_embedding_A
            A = (mod.lora_embedding_A if emb else {"default": mod.lora_A["default"].weight}
                 )["default"]
            B = (mod.lora_embedding_B if emb else {"default": mod.lora_B["default"].weight}
                 )["default"]
            factors.append(LoraFactors(name, A.detach().double().numpy(),
                                       B.detach().double().numpy(),
                                       float(mod.scaling["default"]),
                                       "embedding" if emb else "linear"))
    return {"dir": d, "config": d / "base" / "config.json", "peft": d / "peft",
            "deltas": deltas, "factors": factors}


def _write_base(path, qt):
    """A GGUF base with the tiny LLaMA's tensor names and shapes (1-D norms F32)."""
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN)}
    for b in range(2):
        shapes.update({f"blk.{b}.attn_norm.weight": (HIDDEN,),
                       f"blk.{b}.attn_q.weight": (HIDDEN, HIDDEN),
                       f"blk.{b}.attn_k.weight": (32, HIDDEN),
                       f"blk.{b}.attn_v.weight": (32, HIDDEN),
                       f"blk.{b}.ffn_down.weight": (HIDDEN, INTER)})
    for name, shape in shapes.items():
        t = Q.F32 if len(shape) == 1 else qt
        x = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, t),
                     raw_dtype=None if t in (Q.F32, Q.F16) else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- convert ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("gtype", ["f32", "f16"])
def test_convert_peft_to_gguf_and_back(llama, tmp_path, gtype):
    out = tmp_path / "a.gguf"
    r = _run("convert", llama["peft"], "-o", out, "--to", "gguf", "--base", llama["config"],
             "--gguf-type", gtype, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["target_format"] == "gguf" and rep["modules"] == len(llama["factors"])
    assert any("adapter.lora.alpha = 0" in n for n in rep["notes"])

    reader = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == "llama" and kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == 0.0
    t = {x.name: x for x in reader.tensors}
    assert len(t) == 2 * len(llama["factors"])
    shape = lambda n: [int(v) for v in t[n].shape]  # noqa: E731 (GGUF ne order)
    assert shape("blk.0.attn_q.weight.lora_a") == [HIDDEN, 4]
    assert shape("blk.0.attn_q.weight.lora_b") == [4, HIDDEN]
    assert shape("blk.1.attn_k.weight.lora_b") == [8, 32]
    assert shape("blk.0.ffn_down.weight.lora_a") == [INTER, 4]
    assert shape("token_embd.weight.lora_a") == [4, VOCAB]  # A transposed
    assert shape("token_embd.weight.lora_b") == [4, HIDDEN]
    want = Q.F32 if gtype == "f32" else Q.F16
    assert {x.tensor_type for x in reader.tensors} == {want}

    back = tmp_path / "back"
    r = _run("convert", out, "-o", back, "--to", "peft", "--base", llama["config"])
    assert r.exit_code == 0, r.output
    from loratool import load_adapter
    adapter = load_adapter(back)
    assert set(adapter.modules) == set(llama["deltas"])
    # f32: one rounding of scale * B (2^-24 relative); f16: each stored value rounded once
    # to f16 (2^-11 relative on A and on scale * B)
    rtol, atol = (2e-6, 1e-7) if gtype == "f32" else (2e-3, 2e-5)
    for name, m in adapter.modules.items():
        got = m.delta_matrix().numpy()
        exp = llama["deltas"][name]
        if m.kind == "embedding":
            exp = exp.T  # PEFT's embedding delta is (num, dim); ours (dim, num)
        np.testing.assert_allclose(got, exp, rtol=rtol, atol=atol, err_msg=name)


def test_convert_gguf_needs_base_and_refuses_dora(llama, tmp_path):
    r = _run("convert", llama["peft"], "-o", tmp_path / "a.gguf", "--to", "gguf")
    assert r.exit_code == 1 and "[LT327]" in r.stderr and "--base" in r.stderr
    r = _run("convert", llama["peft"], "-o", tmp_path / "a.gguf", "--to", "gguf", "--base",
             llama["config"])
    assert r.exit_code == 0, r.output
    r = _run("convert", tmp_path / "a.gguf", "-o", tmp_path / "p", "--to", "peft")
    assert r.exit_code == 1 and "[LT327]" in r.stderr and "--base" in r.stderr
    assert not os.path.exists(tmp_path / "p")
    # a GGUF base gives the head counts as well as a config.json does
    base = _write_base(tmp_path / "base.gguf", Q.F32)
    r = _run("convert", tmp_path / "a.gguf", "-o", tmp_path / "p", "--to", "peft", "--base",
             base)
    assert r.exit_code == 0, r.output

    from loratool.interop import get_format
    from loratool.interop.base import ReaderOptions
    from loratool import load_adapter
    adapter = load_adapter(llama["peft"])
    name = next(iter(adapter.modules))
    m = adapter.modules[name]
    adapter.modules[name] = m.with_tensors(magnitude=torch.ones(m.B.shape[0]),
                                           bias=torch.zeros(m.B.shape[0]))
    with pytest.raises(LoraToolError) as e:
        get_format("gguf").save(adapter, str(tmp_path / "d.gguf"),
                                ReaderOptions(base=str(llama["config"])))
    assert e.value.code == "LT329"
    assert "DoRA magnitude" in e.value.message and "bias" in e.value.message
    assert name in e.value.message and not os.path.exists(tmp_path / "d.gguf")


# --- inspect / validate ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_adapter(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ga") / "a.gguf"
    r = _run("convert", llama["peft"], "-o", out, "--to", "gguf", "--base", llama["config"])
    assert r.exit_code == 0, r.output
    return out


def test_inspect_and_validate_gguf_adapter(gguf_adapter, llama):
    r = _run("inspect", gguf_adapter, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["source_format"] == "gguf" and rep["details"]["architecture"] == "llama"
    rows = {m["name"]: m for m in rep["modules"]}
    assert set(rows) == set(llama["deltas"])
    q = rows["model.layers.1.self_attn.k_proj"]
    assert (q["rank"], q["in"], q["out"], q["scale"]) == (8, HIDDEN, 32, 1.0)
    e = rows["model.embed_tokens"]
    assert (e["kind"], e["in"], e["out"]) == ("embedding", VOCAB, HIDDEN)
    r = _run("validate", gguf_adapter)
    assert r.exit_code == 0 and "(gguf)" in r.stdout, r.output


def test_inspect_validate_of_gguf_do_not_import_torch(gguf_adapter):
    code = ("import sys\nfrom loratool.cli import main\n"
            "for args in (['inspect', {p!r}], ['validate', {p!r}]):\n"
            "    try:\n        main(args, prog_name='loratool')\n"
            "    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n"
            "print('ok')\n").format(p=str(gguf_adapter))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0 and res.stdout.endswith("ok\n"), res.stderr[-2000:]


def test_malformed_gguf_exits_1_with_its_code(gguf_adapter, tmp_path):
    data = gguf_adapter.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:200])  # inside the tensor infos
    r = _run("validate", bad, "--json")
    assert r.exit_code == 1
    codes = {f["code"] for f in json.loads(r.stdout)["files"][0]["findings"]}
    assert codes == {"LT322"}
    r = _run("inspect", bad)
    assert r.exit_code == 1 and r.stderr.startswith("Error: [LT322]"), r.stderr
    nan = tmp_path / "nan.gguf"
    a = gguf.GGUFReader(gguf_adapter).tensors[0]
    raw = bytearray(data)
    raw[a.data_offset:a.data_offset + 4] = np.float32("nan").tobytes()
    nan.write_bytes(bytes(raw))
    r = _run("validate", nan)
    assert r.exit_code == 1 and "LT333" in r.stdout and "NaN" in r.stdout
    r = _run("validate", nan, "--header-only")
    assert r.exit_code == 0, r.output


# --- merge / unmerge -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.Q8_0], ids=lambda t: t.name)
def test_merge_cli_equals_library_bit_for_bit(llama, tmp_path, qt):
    base = _write_base(tmp_path / "base.gguf", qt)
    r = _run("merge", base, f"{llama['peft']}:0.5", "-o", tmp_path / "cli.gguf", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    factors = [LoraFactors(f.name, f.A, f.B, f.scale * 0.5, f.kind) for f in llama["factors"]]
    lib = merge_gguf(base, tmp_path / "lib.gguf", factors)
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "lib.gguf").read_bytes()
    assert rep["output_format"] == "gguf" and rep["output_type"] == "keep"
    assert rep["tensors_merged"] == len(lib.tensors) == len(factors)
    assert rep["tensors_copied"] == lib.copied == 2
    for key in ("retained", "kept", "rel_error"):
        assert rep[key] == getattr(lib, key)
    rows = {t["name"]: t for t in rep["tensors"]}
    for t in lib.tensors:
        assert rows[t.name]["retained"] == t.retained and rows[t.name]["kept"] == t.kept
        assert rows[t.name]["base_type"] == rows[t.name]["out_type"] == qt.name
    out = {x.name: x.tensor_type for x in gguf.GGUFReader(tmp_path / "cli.gguf").tensors}
    assert out["blk.0.attn_q.weight"] == qt
    r = _run("merge", base, llama["peft"], "-o", tmp_path / "t.gguf")
    assert r.exit_code == 0 and "retained" in r.stdout and "blk.0.attn_q.weight" in r.stdout


@pytest.mark.slow
def test_merge_gguf_adapter_output_type_and_unmerge(llama, gguf_adapter, tmp_path):
    q8 = _write_base(tmp_path / "q8.gguf", Q.Q8_0)
    from loratool import merge, unmerge
    rep = merge(q8, [(gguf_adapter, 1.0)], output=tmp_path / "m16.gguf", gguf_type="f16")
    assert rep.output_type == "f16" and {t["out_type"] for t in rep.tensors} == {"F16"}
    r = _run("unmerge", tmp_path / "m16.gguf", gguf_adapter, "-o", tmp_path / "u.gguf")
    assert r.exit_code == 0, r.output
    from loratool.gguf import read_gguf_adapter
    _, fs = read_gguf_adapter(gguf_adapter, hf_names=False)
    neg = [LoraFactors(f.name, f.A, f.B, -f.scale, f.kind) for f in fs]
    merge_gguf(tmp_path / "m16.gguf", tmp_path / "lib.gguf", neg, names="gguf")
    assert (tmp_path / "u.gguf").read_bytes() == (tmp_path / "lib.gguf").read_bytes()
    merge(q8, [gguf_adapter], output=tmp_path / "mq.gguf")
    r = _run("unmerge", tmp_path / "mq.gguf", gguf_adapter)
    assert r.exit_code == 1 and r.stderr.startswith("Error: [LT335]"), r.stderr
    assert "Q8_0" in r.stderr
    r = _run("merge", q8, gguf_adapter, "--dtype", "fp16", "--gguf-type", "q8_0")
    assert r.exit_code == 1 and "[LT522]" in r.stderr


def test_gguf_type_needs_a_gguf_base(tmp_path):
    r = _run("merge", os.path.join(REPO, "examples", "base.safetensors"),
             os.path.join(REPO, "examples", "adapter.safetensors"), "-o",
             tmp_path / "o.safetensors", "--gguf-type", "q8_0")
    assert r.exit_code == 1 and "[LT522]" in r.stderr and "GGUF" in r.stderr


def test_merge_allow_missing_lists_what_it_skipped(llama, tmp_path):
    from loratool import load_adapter, merge
    base = _write_base(tmp_path / "base.gguf", Q.F32)
    adapter = load_adapter(llama["peft"])
    m = adapter.modules["model.layers.0.mlp.down_proj"]
    adapter.modules["model.layers.0.mlp.up_proj"] = m.with_tensors(
        name="model.layers.0.mlp.up_proj", A=torch.ones(4, HIDDEN), B=torch.ones(INTER, 4))
    with pytest.raises(LoraToolError) as e:
        merge(base, [adapter], output=tmp_path / "o.gguf")
    assert e.value.code == "LT331" and "blk.0.ffn_up.weight" in e.value.message
    assert not os.path.exists(tmp_path / "o.gguf")
    rep = merge(base, [adapter], output=tmp_path / "o.gguf", allow_missing=True)
    assert rep.skipped == [{"adapter": "<in memory>", "module": "model.layers.0.mlp.up_proj",
                            "reason": "blk.0.ffn_up.weight not in the base"}]
    assert rep.tensors_merged == len(llama["factors"])


def test_non_permuting_gguf_adapter_reads_without_base(tmp_path):
    from loratool import load_adapter
    from loratool.gguf import ArchInfo, write_gguf_adapter
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((2, 16)), rng.standard_normal((16, 2))
    write_gguf_adapter(tmp_path / "q.gguf", [LoraFactors(
        "model.layers.0.self_attn.q_proj", A, B, 0.3)], ArchInfo("qwen2"))
    m = load_adapter(tmp_path / "q.gguf").modules["model.layers.0.self_attn.q_proj"]
    np.testing.assert_array_equal(m.A.numpy(), A.astype(np.float32))
    # no float32 alpha gives 0.3 exactly: alpha 0, 0.3 * B rounded once to float32, scale 1
    np.testing.assert_array_equal(m.B.numpy(), (0.3 * B).astype(np.float32))
    assert m.scale == 1.0
