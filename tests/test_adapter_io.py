"""Adapter save/load (loratool/adapter.py) and the delta formula of every kind (model.py).

Golden bytes, hypothesis round trips over kinds, layouts, dtypes, ranks, alphas and scaling,
the metadata rules of rewriting (other tools' keys kept, unknown loratool.* keys dropped,
mixed scaling folded), and ``delta()`` against plain-torch LoRA forward passes.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.adapter import load_adapter, read_adapter_info, save_adapter
from loratool.errors import LoraToolError
from loratool.model import Adapter, LoraModule
from loratool.stfile import read_header

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def exact(*shape, offset: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Multiples of 1/8 in [-3/4, 3/4], exact in every float dtype and on every machine."""
    i = torch.arange(math.prod(shape), dtype=torch.int64)
    return (((i * 7 + offset) % 13 - 6).to(torch.float64) / 8).reshape(shape).to(dtype)


def golden_adapter() -> Adapter:
    mods = [
        LoraModule("model.layers.0.self_attn.q_proj", "linear", "out_in", exact(4, 12),
                   exact(10, 4, offset=1), 8.0),
        LoraModule("transformer.h.0.attn.c_attn", "linear", "in_out",
                   exact(4, 12, offset=2, dtype=torch.float16),
                   exact(36, 4, offset=3, dtype=torch.float16), 16.0),
        LoraModule("unet.conv_in", "conv", "out_in", exact(2, 3, 3, 3, offset=4,
                                                           dtype=torch.bfloat16),
                   exact(6, 2, 1, 1, offset=5, dtype=torch.bfloat16), 8.0,
                   magnitude=exact(6, offset=6, dtype=torch.bfloat16).abs() + 1),
        LoraModule("model.embed_tokens", "embedding", "in_out",
                   exact(2, 20, offset=7, dtype=torch.float64),
                   exact(8, 2, offset=8, dtype=torch.float64), 0.5,
                   bias=exact(8, offset=9, dtype=torch.float64)),
    ]
    return Adapter(modules={m.name: m for m in mods}, alpha=8.0,
                   base_model="meta-llama/Llama-2-7b-hf", provenance="golden bytes test",
                   extra_metadata={"ss_network_dim": "4", "modelspec.title": "golden"})


# sha256 of the bytes save_adapter writes for golden_adapter(): any change to the byte
# layout, the metadata spelling or the tensor hash shows here first. A deliberate format
# change updates this constant and spec/adapter-format.md together.
GOLDEN_SHA256 = "d618357a323cdd87f71528fbfaa9642c7e9f8e493f5165f9647c535d1678e1d7"


def test_golden_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    digest_a = save_adapter(golden_adapter(), a)
    digest_b = save_adapter(golden_adapter(), b)
    assert digest_a == digest_b
    assert a.read_bytes() == b.read_bytes()
    assert hashlib.sha256(a.read_bytes()).hexdigest() == GOLDEN_SHA256
    assert read_header(a).metadata["loratool.tensor_hash"] == digest_a


def test_saving_a_loaded_adapter_gives_the_same_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_adapter(golden_adapter(), a)
    save_adapter(load_adapter(a), b)
    assert a.read_bytes() == b.read_bytes()


# --- round trips ---------------------------------------------------------------------------

alphas = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != 0)
names = st.from_regex(r"[A-Za-z0-9_\-]{1,6}(\.[A-Za-z0-9_\-]{1,6}){0,3}", fullmatch=True)
other_keys = st.text(min_size=1, max_size=12).filter(lambda k: not k.startswith("loratool."))


@st.composite
def lora_modules(draw, name: str, scaling: str) -> LoraModule:
    kind = draw(st.sampled_from(["linear", "linear_t", "conv", "embedding"]))
    r, out, inp = (draw(st.integers(1, 5)) for _ in range(3))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if kind == "conv":
        k = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        A, B = rnd(r, inp, *k), rnd(out, r, *[1] * len(k))
    else:
        A, B = rnd(r, inp), rnd(out, r)
    layout = "in_out" if kind in ("linear_t", "embedding") else "out_in"
    alpha = draw(alphas)
    return LoraModule(name, "linear" if kind == "linear_t" else kind, layout, A, B, alpha,
                      scaling, magnitude=rnd(out).abs() + 1 if draw(st.booleans()) else None,
                      bias=rnd(out) if draw(st.booleans()) else None)


@st.composite
def adapters(draw) -> Adapter:
    scaling = draw(st.sampled_from(["standard", "rslora"]))
    module_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    default = draw(alphas)
    mods = {}
    for n in module_names:
        m = draw(lora_modules(n, scaling))
        if draw(st.booleans()):
            m.alpha = default  # most modules use the file's default alpha
        mods[n] = m
    return Adapter(modules=mods, alpha=default,
                   base_model=draw(st.none() | st.text(max_size=20)),
                   provenance=draw(st.none() | st.text(max_size=20)),
                   extra_metadata=draw(st.dictionaries(other_keys, st.text(max_size=10),
                                                       max_size=3)))


def _same(t1, t2) -> bool:
    if t1 is None or t2 is None:
        return t1 is t2
    return t1.dtype == t2.dtype and t1.shape == t2.shape and torch.equal(t1, t2)


@settings(max_examples=int(os.environ.get("LORATOOL_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_round_trip(adapter):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        save_adapter(adapter, path)
        loaded = load_adapter(path)
        assert loaded.alpha == float(adapter.alpha)
        assert loaded.scaling == adapter.scaling
        assert (loaded.base_model, loaded.provenance) == (adapter.base_model,
                                                          adapter.provenance)
        assert loaded.extra_metadata == adapter.extra_metadata
        assert list(loaded.modules) == sorted(adapter.modules)
        for name, m in adapter.modules.items():
            got = loaded.modules[name]
            assert (got.kind, got.layout, got.scaling) == (m.kind, m.layout, m.scaling)
            assert got.alpha == float(m.alpha)  # repr of a float64 reads back exactly
            for role in ("A", "B", "magnitude", "bias"):
                assert _same(getattr(got, role), getattr(m, role)), (name, role)
        info = read_adapter_info(path)
        assert {n: i.rank for n, i in info.modules.items()} == {
            n: m.rank for n, m in adapter.modules.items()}
        again = os.path.join(d, "b.safetensors")
        save_adapter(loaded, again)
        with open(path, "rb") as f1, open(again, "rb") as f2:
            assert f1.read() == f2.read()


# --- metadata on rewrite -------------------------------------------------------------------

def test_other_tools_keys_are_kept_and_unknown_loratool_keys_dropped(tmp_path):
    ad = golden_adapter()
    ad.extra_metadata = {"ss_network_dim": "4", "format": "pt", "loratool.future": "x"}
    path = tmp_path / "a.safetensors"
    save_adapter(ad, path)
    meta = read_header(path).metadata
    assert meta["ss_network_dim"] == "4" and meta["format"] == "pt"
    assert "loratool.future" not in meta
    assert load_adapter(path).extra_metadata == {"ss_network_dim": "4", "format": "pt"}


def test_metadata_spelling(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(golden_adapter(), path)
    meta = read_header(path).metadata
    assert meta["loratool.alpha"] == "8.0"
    assert meta["loratool.target_modules"] == (
        '["model.embed_tokens","model.layers.0.self_attn.q_proj",'
        '"transformer.h.0.attn.c_attn","unet.conv_in"]')
    assert meta["loratool.modules"] == (
        '{"model.embed_tokens":{"alpha":0.5,"kind":"embedding","layout":"in_out"},'
        '"model.layers.0.self_attn.q_proj":{"kind":"linear","layout":"out_in"},'
        '"transformer.h.0.attn.c_attn":{"alpha":16.0,"kind":"linear","layout":"in_out"},'
        '"unet.conv_in":{"kind":"conv","layout":"out_in"}}')


def test_mixed_scaling_is_folded_to_standard_with_equal_scales(tmp_path):
    std = LoraModule("a", "linear", "out_in", exact(2, 6), exact(4, 2, offset=1), 8.0)
    rs2 = LoraModule("b", "linear", "out_in", exact(2, 6, offset=2), exact(4, 2, offset=3),
                     4.0, "rslora")
    rs3 = LoraModule("c", "linear", "out_in", exact(3, 6, offset=4), exact(4, 3, offset=5),
                     5.0, "rslora")
    ad = Adapter(modules={"a": std, "b": rs2, "c": rs3}, alpha=8.0)
    assert ad.scaling == "mixed"
    path = tmp_path / "a.safetensors"
    save_adapter(ad, path)
    assert read_header(path).metadata["loratool.scaling"] == "standard"
    loaded = load_adapter(path)
    assert loaded.scaling == "standard"
    assert loaded.modules["a"].scale == std.scale == 4.0
    assert loaded.modules["b"].scale == rs2.scale == 4.0 / math.sqrt(2)
    assert loaded.modules["c"].scale == pytest.approx(rs3.scale, rel=1e-15)
    assert loaded.modules["c"].alpha == pytest.approx(5.0 * math.sqrt(3), rel=1e-15)
    for n in "abc":
        torch.testing.assert_close(loaded.modules[n].delta(), ad.modules[n].delta(),
                                   rtol=1e-15, atol=0)


def test_save_refuses_bad_alpha_and_existing_output(tmp_path):
    ad = golden_adapter()
    path = tmp_path / "a.safetensors"
    for bad in (0.0, float("nan"), float("inf")):
        ad.alpha = bad
        with pytest.raises(LoraToolError) as e:
            save_adapter(ad, path)
        assert e.value.code == "LT105"
    assert not path.exists()
    ad.alpha = 8.0
    save_adapter(ad, path)
    with pytest.raises(LoraToolError) as e:
        save_adapter(ad, path)
    assert e.value.code == "LT503"
    save_adapter(ad, path, overwrite=True)


# --- the delta formula against plain-torch LoRA forward passes -----------------------------

def _module(kind, layout, a_shape, b_shape, alpha=6.0, scaling="standard"):
    g = torch.Generator().manual_seed(sum(a_shape) * 31 + sum(b_shape))
    A = torch.randn(*a_shape, generator=g, dtype=torch.float64)
    B = torch.randn(*b_shape, generator=g, dtype=torch.float64)
    return LoraModule("m", kind, layout, A, B, alpha, scaling)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_delta_linear_out_in(scaling):
    m = _module("linear", "out_in", (3, 7), (5, 3), scaling=scaling)
    s = 6.0 / 3 if scaling == "standard" else 6.0 / math.sqrt(3)
    x = torch.randn(4, 7, dtype=torch.float64)
    d = m.delta()
    assert d.shape == (5, 7)
    # nn.Linear computes x @ W.T; LoRA adds s * B(A(x)).
    torch.testing.assert_close(F.linear(x, d), s * F.linear(F.linear(x, m.A), m.B))


def test_delta_linear_in_out_conv1d():
    m = _module("linear", "in_out", (3, 7), (5, 3))
    x = torch.randn(4, 7, dtype=torch.float64)
    d = m.delta()
    assert d.shape == (7, 5)  # GPT-2 Conv1D weight [in, out]: y = x @ W
    torch.testing.assert_close(x @ d, 2.0 * F.linear(F.linear(x, m.A), m.B))


def test_delta_embedding():
    m = _module("embedding", "in_out", (3, 11), (5, 3))
    ids = torch.tensor([[0, 4, 10, 4]])
    d = m.delta()
    assert d.shape == (11, 5)  # nn.Embedding weight [num_embeddings, dim]
    # PEFT's embedding LoRA: embed ids with A.T, then multiply by B.T.
    torch.testing.assert_close(F.embedding(ids, d), 2.0 * F.embedding(ids, m.A.T) @ m.B.T)


@pytest.mark.parametrize("conv, k", [(F.conv1d, (3,)), (F.conv2d, (1, 1)), (F.conv2d, (3, 3)),
                                     (F.conv2d, (3, 1)), (F.conv3d, (2, 2, 2))])
def test_delta_conv(conv, k):
    m = _module("conv", "out_in", (3, 4, *k), (5, 3, *[1] * len(k)))
    x = torch.randn(2, 4, *[6] * len(k), dtype=torch.float64)
    d = m.delta()
    assert d.shape == (5, 4, *k)
    # LoRA conv: A is a conv with the base kernel, B a 1x1 conv on its r channels.
    torch.testing.assert_close(conv(x, d), 2.0 * conv(conv(x, m.A), m.B))


def test_delta_is_computed_in_float64_from_low_precision_factors():
    m = LoraModule("m", "linear", "out_in", exact(2, 5, dtype=torch.bfloat16),
                   exact(3, 2, offset=1, dtype=torch.bfloat16), 3.0)
    d = m.delta()
    assert d.dtype == torch.float64
    ref = 1.5 * exact(3, 2, offset=1, dtype=torch.float64) @ exact(2, 5, dtype=torch.float64)
    assert torch.equal(d, ref)
    assert m.delta(torch.float32).dtype == torch.float32
