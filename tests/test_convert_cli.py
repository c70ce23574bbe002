"""``loratool convert`` on the command line: exit codes, messages, --json, and that every
command that takes an adapter shows the detected source format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from loratool.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def _kohya(path):
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_mid_proj.lora_down.weight": torch.randn(2, 6, generator=g),
               "lora_unet_mid_proj.lora_up.weight": torch.randn(4, 2, generator=g),
               "lora_unet_mid_proj.alpha": torch.tensor(1.0),
               "lora_te_enc_q.lora_down.weight": torch.randn(2, 4, generator=g),
               "lora_te_enc_q.lora_up.weight": torch.randn(4, 2, generator=g)},
              path, metadata={"ss_network_module": "networks.lora"})
    return path


def _loralib(path):
    g = torch.Generator().manual_seed(1)
    torch.save({"h.0.attn.c_attn.lora_A": torch.randn(4, 6, generator=g),  # r=2, 2 groups
                "h.0.attn.c_attn.lora_B": torch.randn(6, 2, generator=g),
                "h.0.mlp.fc.lora_A": torch.randn(2, 6, generator=g),
                "h.0.mlp.fc.lora_B": torch.randn(5, 2, generator=g)}, path)
    return path


def test_convert_to_each_format_and_back(runner, tmp_path):
    src = _kohya(str(tmp_path / "k.safetensors"))
    outs = {"loratool": tmp_path / "a.safetensors", "peft": tmp_path / "peft_dir",
            "kohya": tmp_path / "k2.safetensors", "loralib": tmp_path / "l.pt"}
    for to, out in outs.items():
        extra = ["--alpha", "1"] if to == "loralib" else []  # loralib holds no per-module alpha
        r = runner.invoke(main, ["convert", src, "-o", str(out), "--to", to, "--json", *extra])
        assert r.exit_code == 0, r.output
        data = json.loads(r.output)
        assert data["source_format"] == "kohya" and data["target_format"] == to
        assert data["modules"] == 2
        r = runner.invoke(main, ["inspect", str(out), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["source_format"] == to
    assert os.path.exists(outs["peft"] / "adapter_config.json")
    r = runner.invoke(main, ["convert", str(outs["peft"]), "-o", str(tmp_path / "k3.safetensors"),
                             "--to", "kohya"])
    assert r.exit_code == 0, r.output
    assert "(peft) ->" in r.output and "(kohya): 2 module(s)" in r.output


def test_existing_output_needs_overwrite(runner, tmp_path):
    src = _kohya(str(tmp_path / "k.safetensors"))
    out = str(tmp_path / "a.safetensors")
    assert runner.invoke(main, ["convert", src, "-o", out]).exit_code == 0
    r = runner.invoke(main, ["convert", src, "-o", out])
    assert r.exit_code == 1 and "[LT503]" in r.output and "--overwrite" in r.output
    assert runner.invoke(main, ["convert", src, "-o", out, "--overwrite"]).exit_code == 0
    r = runner.invoke(main, ["convert", src, "-o", src, "--overwrite"])
    assert r.exit_code == 1 and "[LT502]" in r.output


def test_input_inside_output_directory_is_refused(runner, tmp_path):
    d = tmp_path / "peft_dir"
    src = _kohya(str(tmp_path / "k.safetensors"))
    assert runner.invoke(main, ["convert", src, "-o", str(d), "--to", "peft"]).exit_code == 0
    inner = str(d / "adapter_model.safetensors")
    r = runner.invoke(main, ["convert", inner, "-o", str(d), "--to", "peft", "--overwrite"])
    assert r.exit_code == 1 and "[LT502]" in r.output
    assert os.path.exists(inner)


def test_loralib_options(runner, tmp_path):
    src = _loralib(str(tmp_path / "l.pt"))
    out = str(tmp_path / "a.safetensors")
    r = runner.invoke(main, ["convert", src, "-o", out])
    assert r.exit_code == 1 and "[LT304]" in r.output and "--alpha" in r.output
    r = runner.invoke(main, ["convert", src, "-o", out, "--alpha", "16"])
    assert r.exit_code == 1 and "--enable-lora" in r.output and "h.0.attn.c_attn" in r.output
    r = runner.invoke(main, ["convert", src, "-o", out, "--alpha", "16", "--enable-lora", "1,2"])
    assert r.exit_code == 2 and "--enable-lora" in r.output
    r = runner.invoke(main, ["convert", src, "-o", out, "--alpha", "16", "--enable-lora", "1,0,1",
                             "--fan-in-fan-out", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert any("MergedLinear" in n for n in data["notes"])
    r = runner.invoke(main, ["inspect", out, "--json"])
    mods = {m["name"]: m for m in json.loads(r.output)["modules"]}
    assert mods["h.0.attn.c_attn"]["rank"] == 4 and mods["h.0.attn.c_attn"]["out"] == 9
    assert mods["h.0.attn.c_attn"]["scale"] == 8.0 and mods["h.0.mlp.fc"]["scale"] == 8.0
    assert mods["h.0.attn.c_attn"]["layout"] == "in_out"


def test_ignored_options_are_reported(runner, tmp_path):
    src = _kohya(str(tmp_path / "k.safetensors"))
    r = runner.invoke(main, ["convert", src, "-o", str(tmp_path / "a.safetensors"),
                             "--alpha", "3", "--json"])
    assert r.exit_code == 0
    assert any("ignored --alpha" in n for n in json.loads(r.output)["notes"])


def test_map_renames_modules(runner, tmp_path):
    src = _kohya(str(tmp_path / "k.safetensors"))
    out = str(tmp_path / "a.safetensors")
    r = runner.invoke(main, ["convert", src, "-o", out, "--map", "unet.=", "--map",
                             "lora_te_enc_q=text_encoder.enc.q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", out, "--json"])
    assert sorted(m["name"] for m in json.loads(r.output)["modules"]) == [
        "mid_proj", "text_encoder.enc.q"]
    r = runner.invoke(main, ["convert", src, "-o", out, "--overwrite", "--map", "nonsense"])
    assert r.exit_code == 1 and "[LT404]" in r.output


def test_refusals_are_errors_not_tracebacks(runner, tmp_path):
    src = _kohya(str(tmp_path / "k.safetensors"))
    r = runner.invoke(main, ["convert", src, "-o", str(tmp_path / "x.safetensors"), "--to",
                             "peft"])
    assert r.exit_code == 1 and "[LT306]" in r.output and "directory" in r.output
    r = runner.invoke(main, ["convert", src, "-o", str(tmp_path / "x"), "--to", "onnx"])
    assert r.exit_code == 2
    garbage = tmp_path / "junk.pt"
    garbage.write_bytes(b"not a pickle")
    r = runner.invoke(main, ["convert", str(garbage), "-o", str(tmp_path / "y.safetensors"),
                             "--alpha", "1"])
    assert r.exit_code == 1 and "[LT403]" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_validate_and_inspect_show_foreign_formats(runner, tmp_path):
    src = _kohya(str(tmp_path / "k.safetensors"))
    r = runner.invoke(main, ["validate", src, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["files"][0]["source_format"] == "kohya"
    r = runner.invoke(main, ["inspect", src])
    assert r.exit_code == 0 and "kohya" in r.output and "missing_alpha" in r.output


def test_help_documents_every_option(runner):
    r = runner.invoke(main, ["convert", "--help"])
    assert r.exit_code == 0
    for flag in ("--to", "--alpha", "--enable-lora", "--fan-in-fan-out", "--base", "--map",
                 "--allow-unknown", "--overwrite", "--json"):
        assert flag in r.output


# --- convert there-and-back is lossless (hypothesis) ---------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loratool import convert, load_adapter, save_adapter  # noqa: E402
from loratool.interop.kohya import kohya_name  # noqa: E402
from loratool.model import Adapter, LoraModule  # noqa: E402

_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def adapters(draw, kinds=("linear", "conv", "embedding"), extras=True):
    n = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["out_in", "in_out"]))  # one per adapter: PEFT's flag is global
    dtype = draw(st.sampled_from(_DTYPES))
    dora = extras and draw(st.booleans())
    scaling = draw(st.sampled_from(["standard", "rslora", "mixed"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        r, fin, fout = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        leaf = {"linear": "q_proj", "conv": "conv_in", "embedding": "wte"}[kind]
        name = f"model.layers.{i}.{leaf}"  # loralib embeddings are recognized by name
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            A, B = torch.randn(r, fin, k, k, generator=g), torch.randn(fout, r, 1, 1, generator=g)
        else:
            A, B = torch.randn(r, fin, generator=g), torch.randn(fout, r, generator=g)
        lay = "out_in" if kind == "conv" else ("in_out" if kind == "embedding" else layout)
        alpha = draw(st.sampled_from([1.0, 4.0, 8.0, 0.5, 3.0, -2.0]))
        sc = scaling if scaling != "mixed" else ("rslora" if i % 2 else "standard")
        mods[name] = LoraModule(name, kind, lay, A.to(dtype), B.to(dtype), alpha, sc,
                                magnitude=(torch.rand(fout, generator=g) + 0.5).to(dtype)
                                if dora else None)
    return Adapter(modules=mods, alpha=float(draw(st.sampled_from([4.0, 8.0]))),
                   extra_metadata={"ss_note": "kept"})


def _same_scale(a, b):
    assert abs(a - b) <= 1e-12 * max(abs(a), abs(b)), (a, b)


_SETTINGS = settings(max_examples=20, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(adapter=adapters())
def test_loratool_peft_loratool_is_lossless(tmp_path, adapter):
    src, mid, back = tmp_path / "a.safetensors", tmp_path / "peft", tmp_path / "b.safetensors"
    save_adapter(adapter, src, overwrite=True)
    convert(src, mid, to="peft", overwrite=True)
    # PEFT's fan_in_fan_out true on modules not named like Conv1D cannot be trusted without a
    # base (PEFT itself corrects it per layer at load): the option confirms it
    fif = {m.layout for m in adapter.modules.values() if m.kind == "linear"} == {"in_out"}
    convert(mid, back, overwrite=True, fan_in_fan_out=fif or None)
    got = load_adapter(back)
    assert got.modules.keys() == adapter.modules.keys()
    assert got.extra_metadata == adapter.extra_metadata
    for name, m in adapter.modules.items():
        o = got.modules[name]
        assert (o.kind, o.layout) == (m.kind, m.layout)
        assert torch.equal(o.A, m.A) and torch.equal(o.B, m.B)
        assert (o.magnitude is None) == (m.magnitude is None)
        if m.magnitude is not None:
            assert torch.equal(o.magnitude, m.magnitude)
        _same_scale(o.scale, m.scale)


@_SETTINGS
@given(adapter=adapters(kinds=("linear", "conv"), extras=False))
def test_loratool_kohya_loratool_is_lossless(tmp_path, adapter):
    src, mid, back = tmp_path / "a.safetensors", tmp_path / "k.safetensors", tmp_path / "b"
    save_adapter(adapter, src, overwrite=True)
    convert(src, mid, to="kohya", overwrite=True)
    base = tmp_path / "base.safetensors"
    save_file({n + ".weight": torch.zeros(tuple(m.info.base_shape)) for n, m in
               adapter.modules.items()}, str(base))
    fif = {m.layout for m in adapter.modules.values() if m.kind == "linear"} == {"in_out"}
    convert(mid, str(back) + ".safetensors", base=str(base), fan_in_fan_out=fif or None,
            overwrite=True)  # a square weight cannot tell its layout: the flag does
    got = load_adapter(str(back) + ".safetensors")
    # with a base, names and layouts come back exactly
    assert got.modules.keys() == adapter.modules.keys()
    assert got.extra_metadata == adapter.extra_metadata
    for name, m in adapter.modules.items():
        o = got.modules[name]
        assert (o.kind, o.layout) == (m.kind, m.layout)
        assert torch.equal(o.A, m.A) and torch.equal(o.B, m.B)
        _same_scale(o.scale, m.scale)
    # without one, the kohya names still map one to one
    plain = load_adapter(mid)
    assert sorted(kohya_name(n) for n in plain.modules) == sorted(
        kohya_name(n) for n in adapter.modules)


@_SETTINGS
@given(adapter=adapters(kinds=("linear", "conv", "embedding"), extras=False))
def test_loratool_loralib_loratool_keeps_every_delta(tmp_path, adapter):
    src, mid = tmp_path / "a.safetensors", tmp_path / "l.pt"
    save_adapter(adapter, src, overwrite=True)
    convert(src, mid, to="loralib", alpha=2.0, overwrite=True)
    base = tmp_path / "base.safetensors"
    save_file({n + ".weight": torch.zeros(tuple(m.info.base_shape)) for n, m in
               adapter.modules.items()}, str(base))
    fif = {m.layout for m in adapter.modules.values() if m.kind == "linear"} == {"in_out"}
    got = load_adapter(mid, alpha=2.0, base=str(base), fan_in_fan_out=fif or None)
    assert got.modules.keys() == adapter.modules.keys()
    for name, m in adapter.modules.items():
        o = got.modules[name]
        want, have = m.delta(torch.float64), o.delta(torch.float64)
        assert want.shape == have.shape
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[m.A.dtype]
        # Folding the scale into B rounds each factor entry once; with cancellation inside
        # B @ A that error is relative to |s| |B| |A|, not to the delta itself.
        B2, A2 = m.factors(torch.float64)
        bound = abs(m.scale) * float((B2.abs() @ A2.abs()).max())
        torch.testing.assert_close(have, want, rtol=tol, atol=tol * bound)
