"""llama.cpp itself as the client of our GGUF files (spec/gguf.md sections 4-5).

A tiny LLaMA and a tiny Qwen2 (transformers, seeded; LLaMA's q/k rows are permuted in GGUF,
Qwen2's are not) are written as F32 GGUF models (tests/_gguf_model.py)
and a PEFT adapter on each (per-module rank and alpha, rsLoRA, embedding and lm_head; random
non-zero lora_B) is turned into GGUF by ``loratool convert --to gguf`` and merged by
``loratool merge BASE.gguf ADAPTER``. llama.cpp (llama-cpp-python) computes the logits of

  A. the base GGUF with our GGUF adapter applied at runtime,
  B. our merged GGUF base,
  C. PEFT's ``merge_and_unload()`` written as GGUF,

and each is compared with the Hugging Face model's own logits with the adapter, computed in
float64 (the reference), within ``TOL`` (see ``test_llamacpp_logits``).

With the same library, gguf.quants' quantizers (what our GGUF merges write) are compared
bit for bit with ggml's C quantizers (``ggml_quantize_chunk``, as llama-quantize runs them).

The llama.cpp tests need llama-cpp-python built from source (11 to 56 minutes on 2 cores),
so they run only with ``LORATOOL_LLAMACPP=1`` and ``llama_cpp`` importable; otherwise they
are skipped with the reason. How to run them: docs/formats.md ("llama.cpp runtime test").
The writer test below always runs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _gguf_model import SPECIALS, TYPE_BYTE, TYPE_CONTROL, permute, vocab, write_llama_gguf
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 300
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "embed_tokens", "lm_head"]


def _config(arch: str = "llama"):
    from transformers import LlamaConfig, Qwen2Config
    return (LlamaConfig if arch == "llama" else Qwen2Config)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _model(cfg):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM
    torch.manual_seed(0)
    cls = LlamaForCausalLM if cfg.model_type == "llama" else Qwen2ForCausalLM
    return cls(cfg).eval()


def test_model_writer_against_gguf_reader(tmp_path):
    cfg = _config()
    model = _model(cfg)
    state = model.state_dict()
    path = str(tmp_path / "m.gguf")
    written = write_llama_gguf(path, state, cfg)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == 0  # ALL_F32
    assert (f["llama.block_count"], f["llama.embedding_length"],
            f["llama.feed_forward_length"]) == (LAYERS, HIDDEN, INTER)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == \
        (HEADS, KV_HEADS)
    assert f["llama.rope.dimension_count"] == HIDDEN // HEADS
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.model"] == "llama"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == len(f["tokenizer.ggml.scores"]) == VOCAB
    assert tokens[:3] == SPECIALS and tokens[3 + 0x0A] == "<0x0A>"
    types = f["tokenizer.ggml.token_type"]
    assert types[1] == types[2] == TYPE_CONTROL and types[3:259] == [TYPE_BYTE] * 256
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert vocab(VOCAB)[0] == tokens
    # every tensor: F32, GGUF shape = reversed numpy shape, the HF values (q/k rows in
    # llama.cpp's order: GGUF row h*d + 2i + j is HF row h*d + j*d/2 + i)
    n = {t.name: t for t in r.tensors}
    assert len(n) == 3 + LAYERS * 9  # token_embd, output_norm, output; 9 per block
    hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
          "output_norm.weight": "model.norm.weight",
          "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
          "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight"}
    for g, h in hf.items():
        t = n[g]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(state[h].shape)[::-1]
        assert np.array_equal(np.asarray(t.data).reshape(state[h].shape), state[h].numpy())
    for g, h, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight",
                         HEADS),
                        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight",
                         KV_HEADS)):
        W = state[h].numpy()
        got = np.asarray(n[g].data).reshape(W.shape)
        d = W.shape[0] // heads
        for hd in range(heads):
            for i in range(d // 2):
                for j in range(2):
                    assert np.array_equal(got[hd * d + 2 * i + j], W[hd * d + j * d // 2 + i])
        assert np.array_equal(written[g], got)
        from loratool.gguf import permute_rows  # loratool's permutation is the same one
        assert np.array_equal(permute_rows(W, heads), got)
        assert np.array_equal(permute(W, heads), got)


# ------------------------------------------------------------------ llama.cpp at runtime

def _llama_cpp():
    if os.environ.get("LORATOOL_LLAMACPP") != "1":
        pytest.skip("llama.cpp runtime test: set LORATOOL_LLAMACPP=1 with llama-cpp-python "
                    "installed (built from source; see docs/formats.md, 'llama.cpp runtime "
                    "test')")
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"LORATOOL_LLAMACPP=1 but llama_cpp is not importable ({e}); install "
                    "llama-cpp-python (docs/formats.md, 'llama.cpp runtime test')")
    return llama_cpp


# f32 everywhere (weights, adapter, KV cache: type_k/type_v = GGML_TYPE_F32 = 0, no flash
# attention), so llama.cpp and PyTorch differ only by float32 rounding in another order.
# Measured (llama-cpp-python 0.3.36, x86-64 CPU): max |logit - HF float64| = 4e-6 (A),
# 1.1e-5 (B), 8e-6 (C), 1.0e-5 for PyTorch's own float32, with logits up to 5.6 (LLaMA;
# Qwen2: 4e-6, 4e-6, 4e-6, 5e-6, logits up to 6.4) (float32
# rounding of a 2-layer model: a few ulps of the largest activations). TOL is 4x PyTorch's
# own float32 error bound asserted below, and 1/100 of the adapter's effect (5.5), so a
# wrong scale, permutation or missing module cannot pass.
TOL = 2e-4
TOKENS = [5, 77, 123, 9, 250, 31, 299, 64, 12, 180, 3, 42]


def _run_llama(llama_cpp, model_path: str, lora: str | None = None, scale: float = 1.0
               ) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=model_path, lora_path=lora, lora_scale=scale,
                          n_ctx=32, n_batch=32,
                          n_ubatch=32, logits_all=True, n_threads=2, n_threads_batch=2,
                          type_k=0, type_v=0, flash_attn=False, verbose=False, seed=0)
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        llm.close()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, tmp_path_factory):
    # LLaMA (q/k rows permuted by the GGUF layout) and Qwen2 (not permuted; q/k/v biases)
    llama_cpp = _llama_cpp()
    import copy

    from loratool.cli import main
    from peft import LoraConfig, get_peft_model
    arch = request.param
    d = tmp_path_factory.mktemp(f"llamacpp-{arch}")
    cfg = _config(arch)
    cfg.save_pretrained(d / "base")
    base_model = _model(cfg)
    write_llama_gguf(str(d / "base.gguf"), base_model.state_dict(), cfg, arch)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"k_proj": 8},
                      alpha_pattern={"v_proj": 3, "down_proj": 16}, use_rslora=True)
    peft_model = get_peft_model(copy.deepcopy(base_model), lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # lora_B random and non-zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    peft_model.save_pretrained(d / "peft", save_embedding_layers=False)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        hf32 = peft_model(ids).logits[0].double().numpy()
        hf64 = copy.deepcopy(peft_model).double()(ids).logits[0].numpy()
        base64 = copy.deepcopy(base_model).double()(ids).logits[0].numpy()
    merged = peft_model.merge_and_unload()
    write_llama_gguf(str(d / "peft-merged.gguf"), merged.state_dict(), cfg, arch)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(d / "peft"), "-o", str(d / "adapter.gguf"),
                             "--to", "gguf", "--base", str(d / "base" / "config.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["merge", str(d / "base.gguf"), str(d / "peft"), "-o",
                             str(d / "merged.gguf")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["merge", str(d / "base.gguf"), f"{d / 'peft'}:0.5", "-o",
                             str(d / "merged-half.gguf")])
    assert r.exit_code == 0, r.output
    return {
        "arch": arch, "hf32": hf32, "hf64": hf64, "base64": base64,
        "base": _run_llama(llama_cpp, str(d / "base.gguf")),
        "A": _run_llama(llama_cpp, str(d / "base.gguf"), str(d / "adapter.gguf")),
        "B": _run_llama(llama_cpp, str(d / "merged.gguf")),
        "C": _run_llama(llama_cpp, str(d / "peft-merged.gguf")),
        "A_half": _run_llama(llama_cpp, str(d / "base.gguf"), str(d / "adapter.gguf"), 0.5),
        "B_half": _run_llama(llama_cpp, str(d / "merged-half.gguf")),
    }


@pytest.mark.slow
def test_llamacpp_logits(built):
    ref = built["hf64"]
    err = {k: float(np.abs(built[k] - ref).max()) for k in ("A", "B", "C", "hf32")}
    base_err = float(np.abs(built["base"] - built["base64"]).max())
    effect = float(np.abs(ref - built["base64"]).max())
    print(f"{built['arch']}: max |logit - HF float64|: {err}; base vs HF base {base_err:.2e}; "
          f"adapter effect {effect:.3f}; max |logit| {np.abs(ref).max():.3f}")
    # PyTorch's own float32 logits are within TOL / 4 of float64, llama.cpp's base within
    # TOL of HF's base, and the adapter moves the logits by more than 100 TOL
    assert err["hf32"] < TOL / 4
    assert base_err < TOL
    assert effect > 100 * TOL
    for k in ("A", "B", "C"):
        assert err[k] < TOL, (k, err)


@pytest.mark.slow
def test_llamacpp_runtime_scale_equals_merge_scale(built):
    # llama.cpp's user scale 0.5 on our adapter == our merge of the adapter at scale 0.5
    # (the scale multiplies alpha / rank, which our alpha-0 file makes 1)
    half = float(np.abs(built["A_half"] - built["B_half"]).max())
    moved = float(np.abs(built["A_half"] - built["A"]).max())
    assert half < TOL and moved > 100 * TOL, (half, moved)


def _quant_rows(rng) -> np.ndarray:
    """float32 rows of 512 over many magnitudes, with zero rows, one-outlier rows, exact
    ties (multiples of 1/8 hit the x.5 cases of the rounding) and float16-subnormal scales."""
    rows = [rng.standard_normal(512) * 10.0 ** e for e in range(-7, 4)]
    rows += [np.zeros(512), rng.integers(-64, 65, 512) / 8.0, rng.integers(-9, 10, 512) / 2.0]
    spike = rng.standard_normal(512) * 1e-3
    spike[::37] = 50.0
    rows += [spike, np.full(512, -3.25), rng.uniform(-1, 1, 512) * 6e-6]
    rows += list(rng.standard_normal((48, 512)) * np.exp(rng.uniform(-12, 6, (48, 1))))
    return np.stack(rows).astype(np.float32)


@pytest.mark.slow
def test_gguf_quantizers_equal_ggml_bit_for_bit():
    # gguf.quants (what loratool's GGUF merges write) against ggml's own C quantizers, the
    # ones llama-quantize runs (ggml_quantize_chunk in llama-cpp-python's libggml-base)
    llama_cpp = _llama_cpp()
    import ctypes
    import pathlib

    from loratool.gguf import writable_types
    lib = ctypes.CDLL(str(pathlib.Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    q = lib.ggml_quantize_chunk
    q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    q.restype = ctypes.c_size_t
    rng = np.random.default_rng(5)
    x = np.ascontiguousarray(_quant_rows(rng))
    checked = []
    for name in writable_types():
        t = gguf.GGMLQuantizationType[name]
        if name == "F32":
            continue
        ours = np.ascontiguousarray(gguf.quants.quantize(x, t)).view(np.uint8).reshape(-1)
        theirs = np.zeros(ours.size, np.uint8)
        n = q(int(t), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == ours.size, name
        same = np.array_equal(ours, theirs)
        checked.append((name, same))
    print("gguf.quants == ggml:", checked)
    assert {"Q8_0", "Q4_0"} <= {n for n, _ in checked}
    assert all(same for _, same in checked), checked
