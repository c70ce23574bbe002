"""loratool.gguf: GGUF LoRA adapters and merges into GGUF bases.

Oracles: PEFT (deltas of tiny LLaMA/Qwen2 models built from configs), gguf's own
GGUFReader/GGUFWriter/quants, torch float64 arithmetic and loratool.tensors.round_once for
the output rounding. spec/gguf.md states the tolerances tested here.
"""

from __future__ import annotations

import os
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.errors import LoraToolError
from loratool.gguf import (ArchInfo, LoraFactors, arch_from_gguf, gguf_to_hf_names,
                           hf_to_gguf_names, merge_gguf, read_gguf, read_gguf_adapter,
                           read_gguf_adapter_info, refuse_unsupported, write_gguf_adapter)
from loratool.tensors import round_once

HIDDEN, VOCAB, HEADS, KV_HEADS = 64, 96, 4, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "embed_tokens", "lm_head"]


# ---------------------------------------------------------------- tiny models and PEFT

def _tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
              max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()


def _peft(arch: str, variant: str):
    from peft import LoraConfig, get_peft_model
    if variant == "uniform":  # one alpha, one rank: a global alpha is exact
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"k_proj": 8},
                         alpha_pattern={"v_proj": 3}, use_rslora=variant == "rslora")
    model = get_peft_model(_tiny(arch), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _factors_and_deltas(model):
    """Our factors (canonical layout) and PEFT's own delta per module, in float64."""
    from peft.tuners.lora import LoraLayer
    factors, deltas = [], {}
    for name, mod in model.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        s = float(mod.scaling["default"])
        if "default" in mod.lora_embedding_A:
            A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
            kind = "embedding"
        else:
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            kind = "linear"
        factors.append(LoraFactors(name, A.detach().numpy(), B.detach().numpy(), s, kind))
        deltas[name] = mod.get_delta_weight("default").detach().double().numpy()
    return factors, deltas


def _unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves: GGUF row h*d + 2j + p holds HF row
    h*d + p*d/2 + j. Undone with explicit indices (independent of the reshape formula)."""
    d = x.shape[0] // n_head
    out = np.empty_like(x)
    for h in range(n_head):
        for j in range(d // 2):
            for p in range(2):
                out[h * d + p * d // 2 + j] = x[h * d + 2 * j + p]
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request):
    return request.param


@pytest.mark.parametrize("variant", ["uniform", "patterns", "rslora"])
def test_adapter_matches_peft_delta(tmp_path, arch, variant):
    model = _peft(arch, variant)
    factors, deltas = _factors_and_deltas(model)
    info = ArchInfo(arch, HEADS, KV_HEADS)
    out = tmp_path / "a.gguf"
    rep = write_gguf_adapter(out, factors, info)
    assert rep.scale_encoding == ("global_alpha" if variant == "uniform" else "baked")

    r = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == arch
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    alpha = kv["adapter.lora.alpha"]
    assert alpha == (8.0 if variant == "uniform" else 0.0)
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 * len(factors)
    names = {f.name: f for f in factors}
    q = names["model.layers.0.self_attn.q_proj"]
    assert [int(v) for v in t["blk.0.attn_q.weight.lora_a"].shape] == [HIDDEN, q.rank]
    assert [int(v) for v in t["blk.0.attn_q.weight.lora_b"].shape] == [q.rank, HIDDEN]
    k_rank = 4 if variant == "uniform" else 8
    assert [int(v) for v in t["blk.1.attn_k.weight.lora_b"].shape] == [k_rank, 32]
    assert [int(v) for v in t["token_embd.weight.lora_a"].shape] == [4, VOCAB]  # transposed
    assert [int(v) for v in t["token_embd.weight.lora_b"].shape] == [4, HIDDEN]
    assert "output.weight.lora_a" in t and "blk.1.ffn_down.weight.lora_b" in t

    gnames = hf_to_gguf_names(names, arch)
    for name, f in names.items():
        g = gnames[name]
        A = np.array(t[g + ".lora_a"].data, dtype=np.float64)
        B = np.array(t[g + ".lora_b"].data, dtype=np.float64)
        if arch == "llama" and g.endswith((".attn_q.weight", ".attn_k.weight")):
            B = _unpermute_rows(B, HEADS if ".attn_q." in g else KV_HEADS)
        scale = alpha / B.shape[1] if alpha else 1.0
        if alpha:  # B stored bit for bit
            assert np.array_equal(B, f.B.astype(np.float64))
        else:  # the scale baked into B, rounded once to float32
            assert np.array_equal(B, (f.B.astype(np.float64) * f.scale).astype(np.float32))
        if f.kind == "embedding":
            delta = scale * (B @ A.T).T   # A stored (num, r)
        else:
            delta = scale * (B @ A)
        np.testing.assert_allclose(delta, deltas[name], rtol=2e-6, atol=1e-6)


def test_permutation_is_only_on_llama_q_k(tmp_path):
    for arch_name, permuted in (("llama", True), ("qwen2", False)):
        info = ArchInfo(arch_name, HEADS, KV_HEADS)
        assert info.permutes is permuted
        rng = np.random.default_rng(0)
        B = rng.standard_normal((HIDDEN, 4)).astype(np.float32)
        A = rng.standard_normal((4, HIDDEN)).astype(np.float32)
        f = LoraFactors("model.layers.0.self_attn.q_proj", A, B, 2.0)
        write_gguf_adapter(tmp_path / f"{arch_name}.gguf", [f], info)
        r = gguf.GGUFReader(tmp_path / f"{arch_name}.gguf")
        stored = {x.name: np.array(x.data) for x in r.tensors}
        got = stored["blk.0.attn_q.weight.lora_b"]
        assert np.array_equal(_unpermute_rows(got, HEADS) if permuted else got, B)
        assert np.array_equal(stored["blk.0.attn_q.weight.lora_a"], A)  # A never moves


def test_unknown_permutation_and_missing_heads_are_refused(tmp_path):
    f = LoraFactors("model.layers.0.self_attn.k_proj", np.ones((2, 8), np.float32),
                    np.ones((8, 2), np.float32), 1.0)
    with pytest.raises(LoraToolError) as e:
        write_gguf_adapter(tmp_path / "x.gguf", [f], ArchInfo("deci"))
    assert e.value.code == "LT327" and "permute_qk" in e.value.message
    with pytest.raises(LoraToolError) as e:
        write_gguf_adapter(tmp_path / "x.gguf", [f], ArchInfo("llama"))
    assert e.value.code == "LT327" and "head counts" in e.value.message
    write_gguf_adapter(tmp_path / "x.gguf", [f], ArchInfo("deci", permute_qk=False))
    assert not os.path.exists(tmp_path / "x.gguf.part")


def test_names_both_ways():
    fwd = hf_to_gguf_names(["base_model.model.model.layers.1.self_attn.o_proj",
                            "model.layers.0.mlp.gate_proj", "model.embed_tokens", "lm_head"],
                           "qwen2")
    assert fwd == {"base_model.model.model.layers.1.self_attn.o_proj": "blk.1.attn_output.weight",
                   "model.layers.0.mlp.gate_proj": "blk.0.ffn_gate.weight",
                   "model.embed_tokens": "token_embd.weight", "lm_head": "output.weight"}
    back = gguf_to_hf_names(["blk.1.attn_output.weight", "token_embd.weight"], "llama")
    assert back == {"blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj",
                    "token_embd.weight": "model.embed_tokens"}
    with pytest.raises(LoraToolError) as e:
        hf_to_gguf_names(["model.layers.0.mystery"], "llama")
    assert e.value.code == "LT328"


# ---------------------------------------------------------------- round trips

def test_round_trip_peft_llama_bit_exact(tmp_path):
    factors, _ = _factors_and_deltas(_peft("llama", "uniform"))
    info = ArchInfo("llama", HEADS, KV_HEADS)
    write_gguf_adapter(tmp_path / "a.gguf", factors, info)
    meta, back = read_gguf_adapter(tmp_path / "a.gguf", arch=info)
    assert meta.alpha == 8.0 and len(back) == len(factors)
    by = {f.name: f for f in back}
    for f in factors:
        g = by[f.name]
        assert g.kind == f.kind and g.scale == f.scale
        assert g.A.dtype == np.float32 and np.array_equal(g.A, f.A)
        assert np.array_equal(g.B, f.B)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.integers(1, 6), n_head=st.sampled_from([1, 2, 4]), out_mult=st.integers(1, 3),
       n_in=st.integers(1, 40), scale=st.sampled_from([0.5, 2.0, 0.3, 1 / 3, 7.25]),
       seed=st.integers(0, 2**16), module=st.sampled_from(["q_proj", "k_proj", "v_proj"]))
def test_round_trip_property(tmp_path, r, n_head, out_mult, n_in, scale, seed, module):
    rng = np.random.default_rng(seed)
    out = 2 * n_head * out_mult
    f = LoraFactors(f"model.layers.0.self_attn.{module}",
                    rng.standard_normal((r, n_in)).astype(np.float32),
                    rng.standard_normal((out, r)).astype(np.float32), scale)
    info = ArchInfo("llama", n_head, n_head)
    path = tmp_path / f"p{seed}_{r}_{module}.gguf"
    rep = write_gguf_adapter(path, [f], info, overwrite=True)
    _, (g,) = read_gguf_adapter(path, arch=info)
    assert np.array_equal(g.A, f.A)
    if rep.scale_encoding == "global_alpha":
        assert g.scale == scale and np.array_equal(g.B, f.B)
    else:
        assert g.scale == 1.0
        assert np.array_equal(g.B, (f.B.astype(np.float64) * scale).astype(np.float32))


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_output_types_round_once(tmp_path, out_type):
    rng = np.random.default_rng(3)
    f = LoraFactors("model.layers.0.mlp.up_proj", rng.standard_normal((8, 64)),
                    rng.standard_normal((96, 8)), 0.3)
    rep = write_gguf_adapter(tmp_path / "a.gguf", [f], ArchInfo("qwen2"), out_type=out_type)
    t = {x.name: x for x in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    a = t["blk.0.ffn_up.weight.lora_a"]
    b = t["blk.0.ffn_up.weight.lora_b"]
    exp_b = round_once(torch.from_numpy(f.B * 0.3), torch.float16 if out_type != "bf16"
                       else torch.bfloat16).float().numpy()
    if out_type == "q8_0":
        # rows of 8 (the rank) do not fit a 32-block: B falls back to F16, listed
        assert a.tensor_type == Q.Q8_0 and b.tensor_type == Q.F16
        assert rep.fallbacks == ["blk.0.ffn_up.weight.lora_b"]
        exp_a = gguf.quants.quantize(f.A.astype(np.float32), Q.Q8_0)
        assert np.array_equal(np.array(a.data), exp_a)
    got_b = gguf.quants.dequantize(np.array(b.data), b.tensor_type)
    assert np.array_equal(got_b, exp_b)


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(LoraToolError) as e:
        refuse_unsupported(["base_model.model.x.lora_A.weight",
                            "base_model.model.x.lora_magnitude_vector",
                            "base_model.model.x.lora_B.bias", "base_model.model.lm_head.weight"])
    assert e.value.code == "LT329"
    assert "DoRA" in e.value.message and "bias" in e.value.message
    assert "full tensor" in e.value.message
    refuse_unsupported(["m.lora_A.weight", "m.lora_B.weight", "e.lora_embedding_A"])
    conv = LoraFactors("model.layers.0.mlp.up_proj", np.ones((2, 4)), np.ones((4, 2)), 1.0,
                       "conv")
    with pytest.raises(LoraToolError) as e:
        write_gguf_adapter(tmp_path / "c.gguf", [conv], ArchInfo("qwen2"))
    assert e.value.code == "LT329"
    with pytest.raises(LoraToolError) as e:
        write_gguf_adapter(tmp_path / "c.gguf", [conv], ArchInfo("qwen2"), out_type="q4_k")
    assert e.value.code == "LT330"
    assert not os.listdir(tmp_path)


def test_missing_gguf_package_names_the_extra(monkeypatch):
    import sys

    from loratool.gguf._dep import require_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(LoraToolError) as e:
        require_gguf()
    assert e.value.code == "LT320" and "loratool[gguf]" in e.value.message


# ---------------------------------------------------------------- merges into GGUF bases

def _dyadic(rng, shape, bits=6):
    """Small integers / 2**bits: products and sums of a few of them are exact in float64,
    so any summation order (numpy's or torch's) gives the same delta."""
    return rng.integers(-8, 9, size=shape).astype(np.float64) / 2**bits


BASE_SHAPES = {"token_embd.weight": (VOCAB, HIDDEN), "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
               "blk.0.attn_k.weight": (32, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, 96),
               "blk.0.attn_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}


def _write_base(path, qt, *, split=0, extra=None):
    """A tiny LLaMA-shaped GGUF base; 1-D norms stay F32 as in real files."""
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    w.add_uint32("general.file_type", 7)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(VOCAB)])
    tensors = {}
    for name, shape in BASE_SHAPES.items():
        x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        t = Q.F32 if len(shape) == 1 else qt
        data = gguf.quants.quantize(x, t)
        w.add_tensor(name, data, raw_dtype=None if t in (Q.F32, Q.F16) else t)
        tensors[name] = (data, t)
    for name, (data, t) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=t)
        tensors[name] = (data, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _merge_factors(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda name, out, n_in, s, kind="linear": LoraFactors(  # noqa: E731
        name, _dyadic(rng, (4, n_in)), _dyadic(rng, (out, 4)), s, kind)
    return [f("model.layers.0.self_attn.q_proj", HIDDEN, HIDDEN, 0.37),
            f("model.layers.0.self_attn.k_proj", 32, HIDDEN, 1 / 3),
            f("model.layers.0.mlp.down_proj", HIDDEN, 96, 0.5),
            f("model.layers.0.mlp.down_proj", HIDDEN, 96, 0.25),  # a second adapter, summed
            f("model.embed_tokens", HIDDEN, VOCAB, 0.7, "embedding")]


def _oracle(base_data, qt, factors, n_heads):
    """dequantize + exact float64 merge (torch) + the stated rounding, per GGUF tensor."""
    W = torch.from_numpy(gguf.quants.dequantize(base_data, qt).astype(np.float64))
    for f in factors:
        B = torch.from_numpy(f.B)
        if n_heads:  # llama q/k: permute rows HF -> GGUF with explicit indices
            d = B.shape[0] // n_heads
            idx = [h * d + p * d // 2 + j for h in range(n_heads) for j in range(d // 2)
                   for p in range(2)]
            B = B[idx]
        m = (B @ torch.from_numpy(f.A)) * f.scale
        W = W + (m.T if f.kind == "embedding" else m)
    if qt == Q.F32:
        return W.to(torch.float32).numpy()
    if qt in (Q.F16, Q.BF16):
        r = round_once(W, torch.float16 if qt == Q.F16 else torch.bfloat16)
        return r.numpy() if qt == Q.F16 else r.view(torch.uint8).numpy()
    return gguf.quants.quantize(W.to(torch.float32).numpy(), qt)


@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0], ids=lambda t: t.name)
def test_merge_bit_exact(tmp_path, qt):
    base = tmp_path / "base.gguf"
    tensors = _write_base(base, qt)
    factors = _merge_factors()
    rep = merge_gguf(base, tmp_path / "out.gguf", factors)
    r0, r1 = gguf.GGUFReader(base), gguf.GGUFReader(tmp_path / "out.gguf")
    f0 = {k: f.contents() for k, f in r0.fields.items() if not k.startswith("GGUF.")}
    f1 = {k: f.contents() for k, f in r1.fields.items() if not k.startswith("GGUF.")}
    assert f0 == f1 and list(f0) == list(f1)  # every key, in order
    assert [t.name for t in r0.tensors] == [t.name for t in r1.tensors]
    out = {t.name: t for t in r1.tensors}
    per = {}
    for f in factors:
        per.setdefault(hf_to_gguf_names([f.name], "llama")[f.name], []).append(f)
    for name, (data, t) in tensors.items():
        o = out[name]
        assert o.tensor_type == t
        got = np.array(o.data)
        if name not in per:
            assert np.array_equal(got.view(np.uint8), np.asarray(data).view(np.uint8))
            continue
        heads = {"blk.0.attn_q.weight": HEADS, "blk.0.attn_k.weight": KV_HEADS}.get(name)
        exp = _oracle(np.asarray(data), t, per[name], heads)
        assert np.array_equal(got.view(np.uint8), exp.view(np.uint8)), name
    assert {s.name for s in rep.tensors} == set(per) and rep.copied == 2
    # retained delta: recomputed from the files
    q = next(s for s in rep.tensors if s.name == "blk.0.ffn_down.weight")
    W0 = gguf.quants.dequantize(np.asarray(tensors[q.name][0]), qt).astype(np.float64)
    W1 = gguf.quants.dequantize(np.array(out[q.name].data), qt).astype(np.float64)
    d = sum(f.scale * f.B @ f.A for f in per[q.name])
    assert q.retained == pytest.approx(np.linalg.norm(W1 - W0) / np.linalg.norm(d), rel=1e-12)
    assert q.kept == pytest.approx(np.vdot(W1 - W0, d) / np.vdot(d, d), rel=1e-12)
    if qt == Q.F32:
        assert rep.rel_error < 1e-5 and rep.kept == pytest.approx(1, abs=1e-5)


def test_merge_keep_refuses_k_quants_and_names_writable_types(tmp_path):
    base = tmp_path / "base.gguf"
    q4k = np.zeros((HIDDEN, 256 // 256 * 144), np.uint8)  # a (64, 256) Q4_K tensor of zeros
    _write_base(base, Q.F16, extra={"blk.0.ffn_up.weight": (q4k, Q.Q4_K)})
    f = LoraFactors("model.layers.0.mlp.up_proj", np.full((2, 256), 0.5),
                    np.full((HIDDEN, 2), 0.25), 1.0)
    with pytest.raises(LoraToolError) as e:
        merge_gguf(base, tmp_path / "out.gguf", [f])
    assert e.value.code == "LT330" and "q8_0" in e.value.message and "Q4_K" in e.value.message
    assert not os.path.exists(tmp_path / "out.gguf")
    rep = merge_gguf(base, tmp_path / "out.gguf", [f], out_type="q8_0")
    t = {x.name: x for x in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    assert t["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0
    got = gguf.quants.dequantize(np.array(t["blk.0.ffn_up.weight"].data), Q.Q8_0)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(
        gguf.quants.quantize(np.full((HIDDEN, 256), 0.25, np.float32), Q.Q8_0), Q.Q8_0))
    assert rep.tensors[0].base_type == "Q4_K" and rep.tensors[0].out_type == "Q8_0"


def test_merge_split_base_equals_single(tmp_path):
    _write_base(tmp_path / "one.gguf", Q.Q8_0)
    _write_base(tmp_path / "m.gguf", Q.Q8_0, split=2)
    parts = sorted(p for p in os.listdir(tmp_path) if p.startswith("m-"))
    assert parts[0] == "m-00001-of-00003.gguf" and len(parts) == 3
    assert len(read_gguf(tmp_path / parts[1]).tensors) == len(BASE_SHAPES)
    merge_gguf(tmp_path / "one.gguf", tmp_path / "a.gguf", _merge_factors())
    merge_gguf(tmp_path / parts[0], tmp_path / "b.gguf", _merge_factors())
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(np.array(x.data), np.array(y.data))
    assert not any(k.startswith("split.") for k in b.fields)
    os.remove(tmp_path / parts[2])
    with pytest.raises(LoraToolError) as e:
        read_gguf(tmp_path / parts[0])
    assert e.value.code == "LT332"


def test_merge_mismatch_and_gguf_names(tmp_path):
    base = tmp_path / "base.gguf"
    _write_base(base, Q.F32)
    assert arch_from_gguf(read_gguf(base)) == ArchInfo("llama", HEADS, KV_HEADS)
    bad = LoraFactors("model.layers.0.self_attn.v_proj", np.ones((2, 64)), np.ones((32, 2)),
                      1.0)
    with pytest.raises(LoraToolError) as e:
        merge_gguf(base, tmp_path / "o.gguf", [bad])
    assert e.value.code == "LT331" and "blk.0.attn_v.weight" in e.value.message
    with pytest.raises(LoraToolError) as e:
        merge_gguf(base, base, _merge_factors(), overwrite=True)
    assert e.value.code == "LT502"
    # a GGUF adapter merged by GGUF names (no unpermute/permute round) equals the HF route
    info = ArchInfo("llama", HEADS, KV_HEADS)
    fs = [f for f in _merge_factors() if "down_proj" not in f.name]
    write_gguf_adapter(tmp_path / "a.gguf", fs, info)
    _, gf = read_gguf_adapter(tmp_path / "a.gguf", hf_names=False)
    merge_gguf(base, tmp_path / "x.gguf", gf, names="gguf")
    merge_gguf(base, tmp_path / "y.gguf", fs)
    x, y = gguf.GGUFReader(tmp_path / "x.gguf"), gguf.GGUFReader(tmp_path / "y.gguf")
    for s, t in zip(x.tensors, y.tensors):
        np.testing.assert_allclose(np.array(s.data), np.array(t.data), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- hostile files

@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    p = tmp_path_factory.mktemp("ga") / "a.gguf"
    rng = np.random.default_rng(0)
    write_gguf_adapter(p, [LoraFactors("model.layers.0.self_attn.v_proj",
                                       rng.standard_normal((2, 8)).astype(np.float32),
                                       rng.standard_normal((8, 2)).astype(np.float32), 0.3)],
                       ArchInfo("qwen2"))
    return p.read_bytes()


def _code(tmp_path, data: bytes) -> str | None:
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    try:
        read_gguf_adapter(p)
        read_gguf_adapter_info(p)
    except LoraToolError as e:
        return e.code
    return None


def test_header_info_is_read(good_adapter, tmp_path):
    (tmp_path / "a.gguf").write_bytes(good_adapter)
    info = read_gguf_adapter_info(tmp_path / "a.gguf")
    assert info.architecture == "qwen2" and info.alpha == 0.0
    m = info.modules["blk.0.attn_v.weight"]
    assert (m.rank, m.in_features, m.out_features, m.a_type) == (2, 8, 8, "F32")


def test_malformed_files_give_codes(good_adapter, tmp_path):
    g = good_adapter
    assert _code(tmp_path, g) is None
    assert _code(tmp_path, b"") == "LT321"
    assert _code(tmp_path, b"GGML" + g[4:]) == "LT321"
    assert _code(tmp_path, g[:4] + struct.pack("<I", 1) + g[8:]) == "LT321"
    assert _code(tmp_path, g[:4] + struct.pack(">I", 3) + g[8:]) == "LT321"  # big-endian
    assert _code(tmp_path, g[:16] + struct.pack("<Q", 2**40) + g[24:]) == "LT322"  # n_kv
    assert _code(tmp_path, g[:8] + struct.pack("<Q", 2**40) + g[16:]) == "LT322"  # n_tensors
    assert _code(tmp_path, g[:24] + struct.pack("<Q", 2**50) + g[32:]) == "LT322"  # key len
    for cut in (30, 60, len(g) // 2, len(g) - 1):
        assert _code(tmp_path, g[:cut]) in ("LT321", "LT322")
    # first key "general.architecture": its value type sits after 8 + 20 bytes
    vt = 24 + 8 + len("general.architecture")
    assert _code(tmp_path, g[:vt] + struct.pack("<I", 99) + g[vt + 4:]) == "LT323"
    i = g.index(b"blk.0.attn_v.weight.lora_a") + len("blk.0.attn_v.weight.lora_a")
    # n_dims, 2 dims, type, offset
    assert _code(tmp_path, g[:i] + struct.pack("<I", 7) + g[i + 4:]) == "LT324"
    assert _code(tmp_path, g[:i + 20] + struct.pack("<I", 999) + g[i + 24:]) == "LT324"
    assert _code(tmp_path, g[:i + 24] + struct.pack("<Q", 3) + g[i + 32:]) == "LT324"  # unaligned
    assert _code(tmp_path, g[:i + 24] + struct.pack("<Q", 2**41) + g[i + 32:]) == "LT322"
    renamed = g.replace(b"weight.lora_b", b"weight.lora_c")
    assert _code(tmp_path, renamed) == "LT326"
    assert _code(tmp_path, g.replace(b"\x07" + bytes(7) + b"adapter", b"\x07" + bytes(7) + b"adaptor")) == "LT325"


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_never_crash(good_adapter, tmp_path, data):
    g = bytearray(good_adapter)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(g) - 1))
        g[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(g)))
    code = _code(tmp_path, bytes(g[:cut]))
    assert code is None or code.startswith("LT3")


def test_spec_lists_every_gguf_code():
    from loratool.gguf.codes import RULES
    spec = os.path.join(os.path.dirname(os.path.dirname(__file__)), "spec", "gguf.md")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    for code, (level, summary) in RULES.items():
        assert f"| {code} | {level} | {summary} |" in text, code
