"""loratool.lycoris against lycoris-lora 4.1.3 (the oracle): parsing, deltas, DoRA merges and
the exact plain-LoRA conversion (spec/lycoris.md).

Every case builds a LyCORIS module on a small Linear or Conv2d, randomizes all its parameters
(so no factor is the zero of LyCORIS's init), saves its state dict as LyCORIS does (kohya
names, safetensors) and compares our float64 numbers with the module's own forward pass.

Tolerances (spec/lycoris.md, "Tolerances"):
* float64 module, no DoRA: our delta vs LyCORIS's forward difference <= 1e-12 relative
  (Frobenius over a batch of outputs);
* DoRA: LyCORIS computes the renormalization in float32 whatever the weights' dtype, so
  <= 1e-5 relative;
* float32 module: <= 1e-5 relative (LyCORIS rounds in float32, we compute in float64);
* plain-LoRA conversion vs our delta: <= 1e-12 relative, float64.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loratool import lycoris as ly
from loratool.lycoris import codes

from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.full import FullModule
from lycoris.modules.glora import GLoRAModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris.modules.norms import NormModule

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
NAME = "lora_unet_down_blocks_0_attn_proj"
TOL64 = 1e-12
TOL32 = 1e-5
TOL_DORA = 1e-5


@pytest.fixture
def dtype64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _base(kind: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(64, 48, dtype=dtype)
    if kind == "linear_tall":  # out 256 = 2 * 128, in 8 = 2 * 4 with factor 2
        return nn.Linear(8, 256, dtype=dtype)
    if kind == "conv3":
        return nn.Conv2d(32, 24, 3, padding=1, dtype=dtype)
    if kind == "conv1":
        return nn.Conv2d(32, 24, 1, dtype=dtype)
    raise ValueError(kind)


def _input(base: nn.Module, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(base, nn.Linear):
        return torch.randn(7, base.in_features, generator=g, dtype=dtype)
    return torch.randn(2, base.in_channels, 6, 6, generator=g, dtype=dtype)


def _op(base: nn.Module, x, W, b=None):
    if isinstance(base, nn.Linear):
        return F.linear(x, W, b)
    return F.conv2d(x, W, b, padding=base.padding)


def _randomize(mod: nn.Module, seed: int = 3) -> None:
    # every parameter, so no factor keeps LyCORIS's zero init (the base is not registered)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in mod.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(p * (1 + 0.1 * noise) if k.endswith("dora_scale") else 0.3 * noise)


def _saved(mod: nn.Module, name: str = NAME) -> dict[str, torch.Tensor]:
    """The module's tensors as a LyCORIS file holds them: kohya names through safetensors."""
    sd = {k: v.detach().clone().contiguous() for k, v in mod.state_dict(prefix=f"{name}.").items()}
    return st_load(st_save(sd))


def _lycoris(cls, kind, dtype=torch.float64, multiplier=1.0, **kw):
    """(module applied to its base, base, W, b, x, y_lycoris, y_base)."""
    base = _base(kind, dtype)
    W = base.weight.detach().clone()
    b = None if base.bias is None else base.bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = cls(NAME, base, multiplier=multiplier, **kw)
    _randomize(mod)
    mod.apply_to()
    x = _input(base, dtype)
    with torch.no_grad():
        y = base(x)  # apply_to routes the base's forward through the LyCORIS module
    return mod, base, W, b, x, y, _op(base, x, W, b)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# (id, class, base kind, kwargs, expected family, expected LoRA rank or None if DoRA)
CASES = [
    ("locon-linear", LoConModule, "linear", dict(lora_dim=4, alpha=2.0), "locon", 4),
    ("locon-conv3", LoConModule, "conv3", dict(lora_dim=4, alpha=2.0), "locon", 4),
    ("locon-conv3-tucker", LoConModule, "conv3", dict(lora_dim=4, alpha=2.0, use_tucker=True),
     "locon", 4),
    ("locon-conv1", LoConModule, "conv1", dict(lora_dim=4, alpha=2.0, use_tucker=True),
     "locon", 4),
    ("locon-rslora", LoConModule, "linear", dict(lora_dim=4, alpha=2.0, rs_lora=True),
     "locon", 4),
    ("loha-linear", LohaModule, "linear", dict(lora_dim=4, alpha=2.0), "loha", 16),
    ("loha-conv3", LohaModule, "conv3", dict(lora_dim=3, alpha=2.0), "loha", 9),
    ("loha-conv3-tucker", LohaModule, "conv3", dict(lora_dim=3, alpha=2.0, use_tucker=True),
     "loha", 9),
    ("loha-conv1", LohaModule, "conv1", dict(lora_dim=3, alpha=1.0), "loha", 9),
    ("loha-rslora", LohaModule, "linear", dict(lora_dim=4, alpha=3.0, rs_lora=True), "loha", 16),
    # LoKr on (48, 64): w1 (6, 8), w2 (8, 8); r < 4 keeps w2 factored
    ("lokr-linear", LokrModule, "linear", dict(lora_dim=2, alpha=1.0), "lokr", 6 * 2),
    ("lokr-decompose-both", LokrModule, "linear",
     dict(lora_dim=2, alpha=1.0, decompose_both=True), "lokr", 2 * 2),
    ("lokr-full-matrix", LokrModule, "linear", dict(lora_dim=2, alpha=1.0, full_matrix=True),
     "lokr", 6 * 8),
    ("lokr-factor4", LokrModule, "linear", dict(lora_dim=2, alpha=1.0, factor=4), "lokr", 4 * 2),
    ("lokr-rslora", LokrModule, "linear", dict(lora_dim=2, alpha=1.5, rs_lora=True), "lokr",
     6 * 2),
    # w1 factored (128, 4)(4, 2), so rank(w1) = 2, w2 full (2, 4): rank 2 * 2
    ("lokr-w1-factored-w2-full", LokrModule, "linear_tall",
     dict(lora_dim=4, alpha=2.0, decompose_both=True, factor=2, unbalanced_factorization=True),
     "lokr", 2 * 2),
    # w1 (128, 2)(2, 2) keeps its factors, w2 full (2, 4): rank 2 * 2 again, no SVD of w1
    ("lokr-w1-factored-r-fits", LokrModule, "linear_tall",
     dict(lora_dim=2, alpha=2.0, decompose_both=True, factor=2, unbalanced_factorization=True),
     "lokr", 2 * 2),
    # conv (24, 32, 3, 3): w1 (4, 4), w2 (6, 8, 3, 3) as (6, 2)(2, 72)
    ("lokr-conv3", LokrModule, "conv3", dict(lora_dim=2, alpha=1.0), "lokr", 4 * 2),
    ("lokr-conv3-tucker", LokrModule, "conv3", dict(lora_dim=2, alpha=1.0, use_tucker=True),
     "lokr", 4 * 2),
    ("lokr-conv3-full", LokrModule, "conv3", dict(lora_dim=2, alpha=1.0, full_matrix=True),
     "lokr", 4 * 6),
    ("lokr-conv1", LokrModule, "conv1", dict(lora_dim=2, alpha=1.0), "lokr", 4 * 2),
    # DoRA on each family, both axes
    ("locon-dora-out", LoConModule, "linear",
     dict(lora_dim=4, alpha=2.0, weight_decompose=True), "locon", None),
    ("locon-dora-in-conv3", LoConModule, "conv3",
     dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False), "locon", None),
    ("loha-dora-out-conv3", LohaModule, "conv3",
     dict(lora_dim=3, alpha=2.0, weight_decompose=True), "loha", None),
    ("loha-dora-in", LohaModule, "linear",
     dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False), "loha", None),
    ("loha-dora-tucker", LohaModule, "conv3",
     dict(lora_dim=3, alpha=2.0, weight_decompose=True, use_tucker=True), "loha", None),
    ("lokr-dora-out", LokrModule, "linear",
     dict(lora_dim=2, alpha=1.0, weight_decompose=True), "lokr", None),
    ("lokr-dora-in-conv3", LokrModule, "conv3",
     dict(lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=False), "lokr", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_delta_equals_lycoris_forward(case, dtype64):
    _, cls, kind, kw, family, _ = case
    mod, base, W, b, x, y, y0 = _lycoris(cls, kind, **kw)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME], shape=W.shape)
    assert rec.family.value == family
    assert rec.shape == tuple(W.shape)
    assert rec.scale == pytest.approx(mod.scale, rel=1e-15)
    W2 = ly.merged_weight(rec, W)
    if rec.dora is None:
        dW = ly.delta(rec)
        assert dW.shape == W.shape and dW.dtype == torch.float64
        assert _rel(_op(base, x, dW), y - y0) <= TOL64
        assert _rel(_op(base, x, W2, b), y) <= TOL64
    else:
        assert rec.dora.axis.value == ("out" if kw.get("wd_on_out", True) else "in")
        assert _rel(_op(base, x, W2 - W), y - y0) <= TOL_DORA


@pytest.mark.parametrize("case", [c for c in CASES if c[5] is not None],
                         ids=[c[0] for c in CASES if c[5] is not None])
def test_plain_lora_conversion_is_exact(case, dtype64):
    _, cls, kind, kw, _, want_rank = case
    mod, base, W, b, x, y, y0 = _lycoris(cls, kind, **kw)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME], shape=W.shape)
    f = ly.to_lora(rec)
    dW = ly.delta(rec)
    assert f.rank == want_rank == ly.lora_rank(rec)
    assert f.exact and f.residual == 0.0 and f.retained == 1.0
    assert _rel(f.delta(), dW) <= TOL64
    # generically the closed-form rank is the true rank, unless it exceeds the matrix
    assert int(torch.linalg.matrix_rank(dW.reshape(W.shape[0], -1))) == min(
        want_rank, W.shape[0], W[0].numel())
    # independent check of the plain-LoRA layout: a LyCORIS LoCon module of that rank with
    # our up/down and alpha gives LyCORIS's original output
    assert f.up().shape == (W.shape[0], f.rank, *[1] * (W.dim() - 2))
    assert f.down().shape == (f.rank, *W.shape[1:])
    base2 = _base(kind)
    with torch.no_grad():
        base2.weight.copy_(W)
        locon = LoConModule("lora_unet_plain", base2, lora_dim=f.rank, alpha=f.alpha)
        locon.lora_up.weight.copy_(f.up())
        locon.lora_down.weight.copy_(f.down())
        locon.apply_to()
        assert _rel(base2(x) - y0, y - y0) <= TOL64


@pytest.mark.parametrize("kind,kw", [
    ("linear", dict(lora_dim=2, alpha=1.0)),
    ("conv3", dict(lora_dim=3, alpha=2.0)),
])
@pytest.mark.parametrize("cls", [LoConModule, LohaModule, LokrModule])
def test_float32_modules_within_float32_tolerance(cls, kind, kw):
    mod, base, W, b, x, y, y0 = _lycoris(cls, kind, dtype=torch.float32, **kw)
    saved = _saved(mod)
    assert all(v.dtype == torch.float32 for v in saved.values())
    rec = ly.parse_module(NAME, ly.split_state_dict(saved)[NAME], shape=W.shape)
    dW = ly.delta(rec)
    assert dW.dtype == torch.float64
    assert _rel(_op(base, x.double(), dW), (y - y0).double()) <= TOL32


@pytest.mark.parametrize("cls,kw", [
    (LoConModule, dict(lora_dim=4, alpha=2.0)),
    (LohaModule, dict(lora_dim=4, alpha=2.0, weight_decompose=True)),
    (LokrModule, dict(lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=False)),
])
def test_multiplier(cls, kw, dtype64):
    mod, base, W, b, x, y, y0 = _lycoris(cls, "linear", multiplier=0.4, **kw)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    W2 = ly.merged_weight(rec, W, multiplier=0.4)
    tol = TOL64 if rec.dora is None else TOL_DORA
    assert _rel(_op(base, x, W2 - W), y - y0) <= tol


def test_full_diff_and_bias(dtype64):
    mod, base, W, b, x, y, y0 = _lycoris(FullModule, "conv3")
    saved = ly.split_state_dict(_saved(mod))[NAME]
    assert set(saved) == {"diff", "diff_b"}
    rec = ly.parse_module(NAME, saved)
    assert isinstance(rec, ly.Full) and rec.scale == 1.0
    got = _op(base, x, ly.merged_weight(rec, W), b + ly.bias_delta(rec))
    assert _rel(got, y) <= TOL64
    with pytest.raises(ly.LycorisError) as e:
        ly.to_lora(rec)
    assert e.value.code == "LT243"
    f = ly.to_lora(rec, dense_svd=True)
    assert not f.exact and f.rank == min(W.shape[0], W[0].numel())
    assert f.residual <= 1e-15 and _rel(f.delta(), ly.delta(rec)) <= TOL64


def test_dora_has_no_lora_form(dtype64):
    mod, *_ = _lycoris(LohaModule, "linear", lora_dim=2, alpha=1.0, weight_decompose=True)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    with pytest.raises(ly.LycorisError) as e:
        ly.to_lora(rec)
    assert e.value.code == "LT243" and "dora_scale" in str(e.value)


def test_lokr_both_full_ignores_stored_alpha(dtype64):
    # LyCORIS saves alpha = lora_dim when w1 and w2 are both full; the scale is 1 whatever it is
    mod, base, W, b, x, y, y0 = _lycoris(LokrModule, "linear", lora_dim=10000, alpha=3.0,
                                         full_matrix=True)
    tensors = ly.split_state_dict(_saved(mod))[NAME]
    assert float(tensors["alpha"]) == 10000.0
    rec = ly.parse_module(NAME, tensors)
    assert rec.rank is None and rec.scale == 1.0
    assert _rel(_op(base, x, ly.delta(rec)), y - y0) <= TOL64


def test_lokr_both_full_with_rslora_is_not_expressible(dtype64):
    # LyCORIS 4.1.3 quirk: both full + rs_lora makes its forward scale sqrt(r) (alpha := r,
    # then divided by sqrt(r)) while the file, like every consumer, says scale 1. The file
    # holds no r, so the reader follows the file; this test pins the discrepancy down.
    r = 4
    mod, base, W, b, x, y, y0 = _lycoris(LokrModule, "linear", lora_dim=r, alpha=1.0,
                                         full_matrix=True, rs_lora=True)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    assert rec.scale == 1.0 and mod.scale == math.sqrt(r)
    assert _rel(_op(base, x, math.sqrt(r) * ly.delta(rec)), y - y0) <= TOL64


def test_lycoris_merge_to_applies_scale_twice(dtype64):
    # why the delta follows the forward pass: LyCORIS's own merge_to bakes (alpha/r)^2 for LoHa
    mod, base, W, b, x, y, y0 = _lycoris(LohaModule, "linear", lora_dim=4, alpha=2.0)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    mod.restore()
    with torch.no_grad():
        mod.merge_to(1.0)
    merged = base.weight.detach() - W
    assert _rel(merged, rec.scale * ly.delta(rec)) <= TOL64


def test_flattened_conv_needs_base_shape(dtype64):
    mod, base, W, *_ = _lycoris(LohaModule, "conv3", lora_dim=2, alpha=1.0)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    assert not rec.shape_known and rec.shape == (24, 32 * 9)
    assert ly.delta(rec).shape == (24, 288)  # the 2-D form
    assert ly.delta(rec, W.shape).shape == W.shape
    f = ly.to_lora(rec, W.shape)
    assert f.down().shape == (4, 32, 3, 3)
    with pytest.raises(ly.LycorisError) as e:
        ly.delta(rec, (24, 32, 2, 2))
    assert e.value.code == "LT241"
    # with DoRA the 4-D dora_scale tells it is a conv: the 2-D form is refused
    mod, base, W, *_ = _lycoris(LohaModule, "conv3", lora_dim=2, alpha=1.0,
                                weight_decompose=True)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    with pytest.raises(ly.LycorisError) as e:
        ly.delta(rec)
    assert e.value.code == "LT242"


def test_lokr_flattened_conv_kernel_must_divide(dtype64):
    mod, base, W, *_ = _lycoris(LokrModule, "conv3", lora_dim=2, alpha=1.0)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME])
    # w1 (4, 4) and w2 (6, 72) flattened: a base (24, in, *k) fits when c = 4 divides in and
    # prod(k) divides 72 (then w2 is (6, in / 4, *k)); (24, 6, 48) has the size, not the form
    assert ly.delta(rec, W.shape).shape == W.shape
    assert ly.delta(rec, (24, 96, 3)).shape == (24, 96, 3)
    with pytest.raises(ly.LycorisError) as e:
        ly.delta(rec, (24, 6, 48))
    assert e.value.code == "LT237"


@pytest.mark.parametrize("rule", [dict(rank=5), dict(fro=0.9), dict(sv_ratio=2.0)])
def test_truncation_uses_the_factored_svd(rule, dtype64):
    mod, base, W, *_ = _lycoris(LohaModule, "conv3", lora_dim=4, alpha=2.0)
    rec = ly.parse_module(NAME, ly.split_state_dict(_saved(mod))[NAME], shape=W.shape)
    f = ly.to_lora(rec)
    g = ly.truncate(f, **rule)
    dW = ly.delta(rec).reshape(W.shape[0], -1)
    S = torch.linalg.svdvals(dW)  # dense oracle
    k = g.rank
    assert k < f.rank and g.source_rank == 16 and not g.exact
    want_retained = math.sqrt(float((S[:k] ** 2).sum() / (S ** 2).sum()))
    assert g.retained == pytest.approx(want_retained, rel=1e-12)
    err = float(torch.linalg.matrix_norm(g.delta().reshape(dW.shape) - dW) /
                torch.linalg.matrix_norm(dW))
    assert err == pytest.approx(g.residual, rel=1e-9)
    assert err == pytest.approx(math.sqrt(float((S[k:] ** 2).sum() / (S ** 2).sum())),
                                rel=1e-9)
    if "fro" in rule:
        assert g.retained >= 0.9
    if "rank" in rule:
        assert k == 5
    assert ly.truncate(f, rank=f.rank) is f


def test_non_contiguous_tensors(dtype64):
    # torch.kron raises on non-contiguous CPU input in torch 2.13: feed transposed views
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(8, 6, generator=g).T
    w2a = torch.randn(2, 8, generator=g).T
    w2b = torch.randn(8, 2, generator=g).T
    assert not (w1.is_contiguous() or w2a.is_contiguous() or w2b.is_contiguous())
    rec = ly.parse_module("m", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b,
                                "alpha": torch.tensor(1.0)})
    want = 0.5 * torch.kron(w1.contiguous(), (w2a @ w2b).contiguous())
    assert _rel(ly.delta(rec), want) <= TOL64
    assert _rel(ly.to_lora(rec).delta(), want) <= TOL64


def test_generic_and_kohya_wrappers_end_to_end(dtype64):
    # whole networks as LyCORIS builds and saves them: lycoris_* (generic) and lora_unet_*
    from lycoris import create_lycoris
    from lycoris.kohya import create_network

    class Transformer2DModel(nn.Module):  # a class name kohya's wrapper targets
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 12)
            self.conv = nn.Conv2d(8, 6, 3, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_blocks = nn.ModuleList([Transformer2DModel()])

    class TextEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    for make, prefix in (
        (lambda net: create_lycoris(net, 1.0, linear_dim=4, linear_alpha=2.0, algo="loha"),
         "lycoris"),
        (lambda net: create_network(1.0, 4, 2.0, None, TextEncoder(), net, algo="lokr",
                                    factor=4), "lora_unet"),
    ):
        torch.manual_seed(0)
        net = Net()
        weights = {n: m.weight.detach().clone() for n, m in net.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = make(net)
        if prefix == "lycoris":
            network.apply_to()
        else:
            network.apply_to(None, net, apply_text_encoder=False, apply_unet=True)
        for m in network.modules():
            if hasattr(m, "lora_name"):
                _randomize(m)
        saved = st_load(st_save({k: v.detach().clone().contiguous()
                                 for k, v in network.state_dict().items()}))
        modules = ly.split_state_dict(saved)
        assert set(modules) == {f"{prefix}_down_blocks_0_proj", f"{prefix}_down_blocks_0_conv"}
        blk = net.down_blocks[0]
        x_lin, x_conv = torch.randn(3, 16), torch.randn(1, 8, 5, 5)
        with torch.no_grad():
            y_lin, y_conv = blk.proj(x_lin), blk.conv(x_conv)
        for path, x, y, op in (("down_blocks.0.proj", x_lin, y_lin, F.linear),
                               ("down_blocks.0.conv", x_conv, y_conv,
                                lambda x, W, b: F.conv2d(x, W, b, padding=1))):
            W = weights[path]
            rec = ly.parse_module(f"{prefix}_{path.replace('.', '_')}",
                                  modules[f"{prefix}_{path.replace('.', '_')}"], shape=W.shape)
            bias = dict(net.named_modules())[path].bias
            assert _rel(op(x, ly.merged_weight(rec, W), bias), y) <= TOL64
            assert _rel(op(x, W + ly.to_lora(rec).delta(), bias), y) <= TOL64


@pytest.mark.parametrize("cls,kw,family", [
    (IA3Module, {}, "ia3"),
    (GLoRAModule, dict(lora_dim=4, alpha=2.0), "glora"),
    (DiagOFTModule, dict(lora_dim=8, alpha=1.0, rescaled=True), "oft"),
    (ButterflyOFTModule, dict(lora_dim=4, alpha=1.0), "boft"),
    (ButterflyOFTModule, dict(lora_dim=4, alpha=1.0, rescaled=True), "boft"),
])
def test_unsupported_families_are_named(cls, kw, family, dtype64):
    base = nn.Linear(32, 32)  # BOFT needs power-of-two blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = cls(NAME, base, **kw)
    tensors = ly.split_state_dict(_saved(mod))[NAME]
    _check_unsupported(tensors, family)


def test_norm_module_is_named(dtype64):
    base = nn.LayerNorm(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = NormModule(NAME, base)
    tensors = ly.split_state_dict(_saved(mod))[NAME]
    assert set(tensors) == {"w_norm", "b_norm"}
    _check_unsupported(tensors, "norm")


def _check_unsupported(tensors, family):
    assert ly.detect_family(tensors).value == family
    with pytest.raises(ly.LycorisError) as e:
        ly.parse_module(NAME, tensors)
    assert e.value.code == "LT231" and family in str(e.value)


# ----------------------------------------------------------------------------------------------
# Malformed modules: one defect each, with its code
# ----------------------------------------------------------------------------------------------

def _t(*shape):
    return torch.ones(*shape, dtype=torch.float32)


LOCON = {"lora_up.weight": _t(6, 2), "lora_down.weight": _t(2, 5), "alpha": torch.tensor(1.0)}
LOHA = {"hada_w1_a": _t(6, 2), "hada_w1_b": _t(2, 5), "hada_w2_a": _t(6, 2),
        "hada_w2_b": _t(2, 5), "alpha": torch.tensor(1.0)}
LOHA_T = {"hada_w1_a": _t(2, 6), "hada_w1_b": _t(2, 5), "hada_w2_a": _t(2, 6),
          "hada_w2_b": _t(2, 5), "hada_t1": _t(2, 2, 3, 3), "hada_t2": _t(2, 2, 3, 3)}
LOKR = {"lokr_w1": _t(2, 3), "lokr_w2_a": _t(4, 2), "lokr_w2_b": _t(2, 5),
        "alpha": torch.tensor(1.0)}
LOKR_T = {"lokr_w1": _t(2, 3), "lokr_w2_a": _t(2, 4), "lokr_w2_b": _t(2, 5),
          "lokr_t2": _t(2, 2, 3, 3)}


def _with(base, **changes):
    d = dict(base)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


MALFORMED = [
    ("unknown-param", _with(LOCON, bias_indices=_t(3)), None, "LT230"),
    ("two-families", _with(LOCON, hada_w1_a=_t(6, 2)), None, "LT230"),
    ("alpha-only", {"alpha": torch.tensor(1.0)}, None, "LT230"),
    ("lokr-t1", _with(LOKR_T, lokr_t1=_t(2, 2, 3, 3)), None, "LT230"),
    ("full-with-dora", {"diff": _t(6, 5), "dora_scale": _t(6, 1)}, None, "LT230"),
    ("ia3", {"weight": _t(6), "on_input": torch.tensor(0)}, None, "LT231"),
    ("glora", {"a1.weight": _t(5, 2), "a2.weight": _t(2, 5), "b1.weight": _t(6, 2),
               "b2.weight": _t(2, 5)}, None, "LT231"),
    ("oft", {"oft_blocks": _t(2, 3, 3)}, None, "LT231"),
    ("locon-no-down", _with(LOCON, lora_down__weight=None), None, "LT232"),
    ("loha-half", _with(LOHA, hada_w2_b=None), None, "LT232"),
    ("loha-one-core", _with(LOHA_T, hada_t2=None), None, "LT232"),
    ("lokr-w1-both-forms", _with(LOKR, lokr_w1_a=_t(2, 1), lokr_w1_b=_t(1, 3)), None, "LT232"),
    ("lokr-w1-half-pair", _with(LOKR, lokr_w1=None, lokr_w1_a=_t(2, 1)), None, "LT232"),
    ("lokr-no-w2", _with(LOKR, lokr_w2_a=None, lokr_w2_b=None), None, "LT232"),
    ("lokr-t2-with-full-w2", _with(LOKR, lokr_w2_a=None, lokr_w2_b=None, lokr_w2=_t(4, 5),
                                   lokr_t2=_t(2, 2, 3, 3)), None, "LT232"),
    ("locon-up-1d", _with(LOCON, lora_up__weight=_t(6)), None, "LT233"),
    ("locon-up-kernel", _with(LOCON, lora_up__weight=_t(6, 2, 3, 3),
                              lora_down__weight=_t(2, 5, 3, 3)), None, "LT233"),
    ("locon-conv-ndim", _with(LOCON, lora_up__weight=_t(6, 2, 1, 1, 1),
                              lora_down__weight=_t(2, 5, 3, 3)), None, "LT233"),
    ("locon-mid-down-kernel", _with(LOCON, lora_up__weight=_t(6, 2, 1, 1),
                                    lora_down__weight=_t(2, 5, 3, 3),
                                    lora_mid__weight=_t(2, 2, 3, 3)), None, "LT233"),
    ("loha-a-3d", _with(LOHA, hada_w1_a=_t(6, 2, 1)), None, "LT233"),
    ("loha-tucker-b-4d", _with(LOHA_T, hada_w1_b=_t(2, 5, 1, 1)), None, "LT233"),
    ("lokr-w1-3d", _with(LOKR, lokr_w1=_t(2, 3, 1)), None, "LT233"),
    ("locon-rank", _with(LOCON, lora_up__weight=_t(6, 3)), None, "LT234"),
    ("loha-rank", _with(LOHA, hada_w2_a=_t(6, 3)), None, "LT234"),
    ("lokr-w1-rank", _with(LOKR, lokr_w1=None, lokr_w1_a=_t(2, 2), lokr_w1_b=_t(1, 3)), None,
     "LT234"),
    ("lokr-w2-rank", _with(LOKR, lokr_w2_a=_t(4, 3)), None, "LT234"),
    ("locon-mid-rank", _with(LOCON, lora_up__weight=_t(6, 2, 1, 1),
                             lora_down__weight=_t(2, 5, 1, 1), lora_mid__weight=_t(3, 2, 3, 3)),
     None, "LT235"),
    ("loha-core-rank", _with(LOHA_T, hada_t1=_t(2, 3, 3, 3)), None, "LT235"),
    ("loha-core-kernels", _with(LOHA_T, hada_t2=_t(2, 2, 1, 3)), None, "LT235"),
    ("loha-core-2d", _with(LOHA_T, hada_t1=_t(2, 2)), None, "LT233"),
    ("lokr-core", _with(LOKR_T, lokr_t2=_t(2, 3, 3, 3)), None, "LT235"),
    ("loha-terms", _with(LOHA, hada_w2_b=_t(2, 4)), None, "LT236"),
    ("loha-tucker-terms", _with(LOHA_T, hada_w2_a=_t(2, 7)), None, "LT236"),
    ("lokr-conv-kernel", LOKR, (8, 5, 3), "LT237"),
    ("alpha-vector", _with(LOCON, alpha=_t(2)), None, "LT238"),
    ("alpha-nan", _with(LOCON, alpha=torch.tensor(float("nan"))), None, "LT238"),
    ("alpha-inf", _with(LOCON, alpha=torch.tensor(float("inf"))), None, "LT238"),
    ("dora-1d", _with(LOCON, dora_scale=_t(6)), None, "LT239"),
    ("dora-wrong-out", _with(LOCON, dora_scale=_t(5, 1)), None, "LT239"),
    ("dora-wrong-in", _with(LOCON, dora_scale=_t(1, 4)), None, "LT239"),
    ("dora-both", _with(LOCON, dora_scale=_t(6, 5)), None, "LT239"),
    ("dora-ndim", _with(LOCON, dora_scale=_t(6, 1, 1, 1)), None, "LT239"),
    ("dora-vs-base", _with(LOHA, dora_scale=_t(6, 1)), (6, 5, 1, 1), "LT239"),
    ("diff-1d", {"diff": _t(6)}, None, "LT240"),
    ("diff-b", {"diff": _t(6, 5), "diff_b": _t(5)}, None, "LT240"),
    ("full-no-diff", {"diff_b": _t(6)}, None, "LT232"),
    ("base-out", LOCON, (7, 5), "LT241"),
    ("base-in", LOHA, (6, 4), "LT241"),
    ("base-kernel", _with(LOCON, lora_up__weight=_t(6, 2, 1, 1),
                          lora_down__weight=_t(2, 5, 3, 3)), (6, 5, 1, 9), "LT241"),
    ("zero-rank", _with(LOCON, lora_up__weight=_t(6, 0), lora_down__weight=_t(0, 5)), None,
     "LT244"),
    ("zero-out", _with(LOHA, hada_w1_a=_t(0, 2)), None, "LT244"),
    ("int-tensor", _with(LOCON, lora_up__weight=torch.ones(6, 2, dtype=torch.int32)), None,
     "LT203"),
]


@pytest.mark.parametrize("tensors,shape,code", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_module_gives_its_code(tensors, shape, code):
    with pytest.raises(ly.LycorisError) as e:
        ly.parse_module("lora_unet_bad", tensors, shape=shape)
    assert e.value.code == code, str(e.value)
    assert "lora_unet_bad" in str(e.value) and e.value.module == "lora_unet_bad"


def test_every_lycoris_code_is_tested_and_documented():
    import os
    tested = {c[3] for c in MALFORMED} | {"LT242", "LT243", "LT237"}
    assert set(codes.LYCORIS_RULES) <= tested
    spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec",
                        "lycoris.md")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    for code, (level, summary) in codes.LYCORIS_RULES.items():
        assert f"| {code} | {level} | {summary} |" in text, code


@pytest.mark.parametrize("tensors", [LOCON, LOHA, LOHA_T, LOKR, LOKR_T],
                         ids=["locon", "loha", "loha-tucker", "lokr", "lokr-tucker"])
def test_wellformed_templates_parse(tensors):
    # the malformed cases above are one defect away from these
    rec = ly.parse_module("lora_unet_ok", tensors)
    assert ly.delta(rec).shape[0] == (8 if rec.family is ly.Family.LOKR else 6)
