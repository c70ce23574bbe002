"""loralib (microsoft/LoRA) as the oracle: a layer's output with the merged weight W + delta
(loratool's delta, in the base tensor's layout) equals loralib's own unmerged forward pass
(``train()`` mode, so loralib does not merge) for Linear, Linear(fan_in_fan_out), MergedLinear
(enable_lora [True, False, True], fan_in_fan_out), Embedding and Conv2d. Loading never runs
pickled code."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

lora = pytest.importorskip("loralib")

from loratool import convert, load_adapter, read_adapter_info  # noqa: E402
from loratool.errors import LoraToolError  # noqa: E402
from loratool.interop import detect_format  # noqa: E402
from loratool.interop import loralib as L  # noqa: E402
from loratool.interop.base import ReaderOptions  # noqa: E402
from loratool.model import Adapter, LoraModule  # noqa: E402

R, ALPHA, MASK = 2, 8.0, [True, False, True]


class Net(nn.Module):
    """One of each loralib layer, named like the modules they replace."""

    def __init__(self, r=R, alpha=ALPHA, conv_r=R):
        super().__init__()
        torch.manual_seed(3)
        self.fc = lora.Linear(6, 5, r=r, lora_alpha=alpha)
        self.proj = lora.Linear(6, 4, r=r, lora_alpha=alpha, fan_in_fan_out=True)
        self.c_attn = lora.MergedLinear(6, 9, r=r, lora_alpha=alpha, enable_lora=MASK,
                                        fan_in_fan_out=True)
        self.wte = lora.Embedding(11, 6, r=r, lora_alpha=alpha)
        self.conv = lora.Conv2d(3, 4, 3, r=conv_r, lora_alpha=alpha, padding=1)
        self.point = lora.Conv2d(4, 5, 1, r=r, lora_alpha=alpha)


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    net.train()  # loralib merges in eval(); train() keeps the forward pass unmerged
    return net


@pytest.fixture
def net():
    return _randomize(Net())


def _save(net, tmp_path):
    path = str(tmp_path / "lora.pt")
    torch.save(lora.lora_state_dict(net), path)
    from safetensors.torch import save_file
    base = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()
            if "lora_" not in k}
    save_file(base, str(tmp_path / "base.safetensors"))
    return path, str(tmp_path / "base.safetensors")


def _forward_with(name, layer, W, x):
    """The base layer's computation with weight W in its own storage layout."""
    if isinstance(layer, lora.Embedding):
        return F.embedding(x, W)
    if isinstance(layer, lora.ConvLoRA):
        return layer.conv._conv_forward(x, W, layer.conv.bias.double())
    return F.linear(x, W.T if layer.fan_in_fan_out else W, layer.bias.double())


def _inputs(layer):
    g = torch.Generator().manual_seed(5)
    if isinstance(layer, lora.Embedding):
        return torch.randint(0, layer.num_embeddings, (7,), generator=g)
    if isinstance(layer, lora.ConvLoRA):
        return torch.randn(2, layer.conv.in_channels, 5, 5, generator=g)
    return torch.randn(3, layer.in_features, generator=g)


def _check_against_forward(net, adapter):
    layers = {"fc": net.fc, "proj": net.proj, "c_attn": net.c_attn, "wte": net.wte,
              "conv": net.conv, "point": net.point}
    assert sorted(adapter.modules) == sorted(layers)
    for name, layer in layers.items():
        W = (layer.conv.weight if isinstance(layer, lora.ConvLoRA) else layer.weight).detach()
        merged = W.double() + adapter.modules[name].delta(torch.float64)
        x = _inputs(layer)
        with torch.no_grad():
            want = layer(x).double()
            got = _forward_with(name, layer, merged, x.double() if x.is_floating_point() else x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_delta_matches_loralib_forward(net, tmp_path):
    path, base = _save(net, tmp_path)
    assert detect_format(path) == "loralib"
    adapter = load_adapter(path, alpha=ALPHA, enable_lora=MASK, base=base)
    kinds = {n: (m.kind, m.layout) for n, m in adapter.modules.items()}
    assert kinds == {"fc": ("linear", "out_in"), "proj": ("linear", "in_out"),
                     "c_attn": ("linear", "in_out"), "wte": ("embedding", "in_out"),
                     "conv": ("conv", "out_in"), "point": ("conv", "out_in")}
    assert adapter.modules["c_attn"].rank == R * 2  # r x enabled groups
    assert adapter.modules["conv"].rank == R * 3 * 3  # loralib's r*k rows, k blocks
    _check_against_forward(net, adapter)


def test_roundtrip_keeps_loralib_tensors(net, tmp_path):
    path, base = _save(net, tmp_path)
    mid, back = str(tmp_path / "a.safetensors"), str(tmp_path / "back.pt")
    report = convert(path, mid, alpha=ALPHA, enable_lora="1,0,1", base=base)
    assert any("MergedLinear" in n for n in report.notes)
    assert any("Conv2d" in n for n in report.notes)
    report = convert(mid, back, to="loralib", enable_lora=[True, False, True])
    assert any(f"lora_alpha={ALPHA:g}" in n for n in report.notes), report.notes
    a = torch.load(path, weights_only=True)
    b = torch.load(back, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and loads into a fresh loralib model that computes the same outputs.
    fresh = _randomize(Net(), seed=99)
    fresh.load_state_dict(b, strict=False)
    for name in ("fc", "c_attn", "wte", "conv"):
        layer, orig = getattr(fresh, name), getattr(net, name)
        x = _inputs(layer)
        with torch.no_grad():
            assert torch.equal(layer(x), orig(x)), name


def test_fan_in_fan_out_inferred_from_base(net, tmp_path):
    path, base = _save(net, tmp_path)
    info = read_adapter_info(path, alpha=ALPHA, enable_lora=MASK, base=base)
    assert info.modules["proj"].layout == "in_out" and info.modules["fc"].layout == "out_in"
    assert info.source_format == "loralib"
    # Without a base nothing says so: every linear is read as out_in (or in_out if told).
    plain = read_adapter_info(path, alpha=ALPHA, enable_lora=MASK)
    assert plain.modules["proj"].layout == "out_in"
    told = read_adapter_info(path, alpha=ALPHA, enable_lora=MASK, fan_in_fan_out=True)
    assert told.modules["proj"].layout == "in_out"


def test_missing_options_name_the_flag(net, tmp_path):
    path, base = _save(net, tmp_path)
    with pytest.raises(LoraToolError) as e:
        load_adapter(path, enable_lora=MASK, base=base)
    assert e.value.code == "LT304" and "--alpha" in e.value.message
    with pytest.raises(LoraToolError) as e:
        load_adapter(path, alpha=ALPHA, base=base)
    assert e.value.code == "LT304" and "--enable-lora" in e.value.message
    assert "c_attn" in e.value.message
    with pytest.raises(LoraToolError) as e:
        load_adapter(path, alpha=ALPHA, enable_lora=[True, True], base=base)
    assert e.value.code == "LT305"
    # read_info describes the file without alpha (shown as rank) for inspect/validate
    info = read_adapter_info(path, enable_lora=MASK)
    assert info.modules["fc"].scale == 1.0 and "alpha" in info.details


def test_general_conv_adapter_written_to_loralib(tmp_path):
    """A conv adapter without loralib's block structure is written exactly at rank x k."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(3, 3, 3, 3, generator=g)
    B = torch.randn(4, 3, 1, 1, generator=g)
    m = LoraModule("conv", "conv", "out_in", A, B, alpha=6.0)
    out = str(tmp_path / "c.pt")
    notes = L.save(Adapter(modules={"conv": m}, alpha=6.0), out, ReaderOptions(alpha=6.0))
    state = torch.load(out, weights_only=True)
    assert state["conv.lora_A"].shape == (3 * 3, 3 * 3) and state["conv.lora_B"].shape == (12, 9)
    layer = lora.Conv2d(3, 4, 3, r=3, lora_alpha=6.0, padding=1)
    layer.load_state_dict({"lora_A": state["conv.lora_A"], "lora_B": state["conv.lora_B"]},
                          strict=False)
    layer.train()
    x = torch.randn(2, 3, 5, 5, generator=g)
    W = layer.conv.weight.detach().double() + m.delta(torch.float64)
    with torch.no_grad():
        got = layer.conv._conv_forward(x.double(), W, layer.conv.bias.double())
        torch.testing.assert_close(got, layer(x).double(), rtol=1e-5, atol=1e-5)
    assert any("Conv2d (rank x k)" in n for n in notes)


def test_dense_linear_written_as_merged_linear(tmp_path):
    g = torch.Generator().manual_seed(6)
    B = torch.randn(9, 2, generator=g)
    B[3:6] = 0  # the disabled (k) group changes nothing
    m = LoraModule("c_attn", "linear", "in_out", torch.randn(2, 6, generator=g), B, alpha=4.0)
    out = str(tmp_path / "m.pt")
    L.save(Adapter(modules={"c_attn": m}, alpha=4.0), out, ReaderOptions.of(enable_lora=MASK))
    state = torch.load(out, weights_only=True)
    layer = lora.MergedLinear(6, 9, r=2, lora_alpha=4.0, enable_lora=MASK, fan_in_fan_out=True)
    layer.load_state_dict({"lora_A": state["c_attn.lora_A"], "lora_B": state["c_attn.lora_B"]},
                          strict=False)
    layer.train()
    x = torch.randn(3, 6, generator=g)
    W = layer.weight.detach().double() + m.delta(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x.double(), W.T, layer.bias.double()),
                                   layer(x).double(), rtol=1e-5, atol=1e-5)


def test_loralib_writer_needs_alpha_when_scales_differ(tmp_path):
    g = torch.Generator().manual_seed(8)
    mods = {n: LoraModule(n, "linear", "out_in", torch.randn(2, 4, generator=g),
                          torch.randn(3, 2, generator=g), alpha=a)
            for n, a in (("a", 4.0), ("b", 8.0))}
    adapter = Adapter(modules=mods, alpha=4.0)
    with pytest.raises(LoraToolError) as e:
        L.save(adapter, str(tmp_path / "x.pt"), ReaderOptions())
    assert e.value.code == "LT304" and "--alpha" in e.value.message
    notes = L.save(adapter, str(tmp_path / "x.pt"), ReaderOptions(alpha=4.0))
    assert any("folded" in n for n in notes)
    state = torch.load(str(tmp_path / "x.pt"), weights_only=True)
    torch.testing.assert_close(state["b.lora_B"], mods["b"].B * 2)


def test_unknown_tensors_in_full_state_dict(net, tmp_path):
    path = str(tmp_path / "full.pt")
    torch.save(net.state_dict(), path)
    with pytest.raises(LoraToolError) as e:
        load_adapter(path, alpha=ALPHA, enable_lora=MASK)
    assert e.value.code == "LT303" and "fc.weight" in e.value.message
    adapter = load_adapter(path, alpha=ALPHA, enable_lora=MASK, allow_unknown=True)
    assert "fc" in adapter.modules


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    from click.testing import CliRunner

    from loratool.cli import main
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    torch.save({"x.lora_A": torch.zeros(2, 3), "payload": _Boom(str(marker))}, path)
    assert not marker.exists()
    for attempt in (lambda: detect_format(path),
                    lambda: load_adapter(path, alpha=1.0),
                    lambda: read_adapter_info(path)):
        with pytest.raises(LoraToolError) as e:
            attempt()
        assert e.value.code == "LT403"
    result = CliRunner().invoke(main, ["convert", path, "-o", str(tmp_path / "o.safetensors"),
                                       "--alpha", "1"])
    assert result.exit_code == 1 and "LT403" in result.output
    assert not marker.exists()


def test_enable_lora_parsing():
    assert L.parse_enable_lora("1,0,1") == [True, False, True]
    assert L.parse_enable_lora("true, false") == [True, False]
    for bad in ("1,2", "", "0,0"):
        with pytest.raises(LoraToolError):
            L.parse_enable_lora(bad)
