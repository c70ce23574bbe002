"""LyCORIS files through every command (spec/lycoris.md, interop.lycoris): detection, inspect
and validate from the header, merge/unmerge against the LyCORIS modules' forward pass, and
convert to PEFT checked by loading the result in PEFT. lycoris-lora 4.1.3 is the oracle.

Each case applies LyCORIS modules to a small model's ``unet.fc`` (Linear 64 -> 48) and
``unet.conv`` (Conv2d 32 -> 24, 3x3), randomizes all their parameters, saves them as LyCORIS
saves (kohya names ``lora_unet_fc``/``lora_unet_conv``, safetensors), and saves the model's own
state dict as the base. Tolerances (spec/lycoris.md section 6): float64 base and modules,
merged output vs LyCORIS's forward <= 1e-12 relative; DoRA <= 1e-5 (LyCORIS renormalizes in
float32); PEFT (float32 layers) vs LyCORIS <= 1e-5.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratool import lycoris as ly
from loratool.adapter import read_adapter_info
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.interop import detect_format
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge, unmerge
from loratool.ops.validate import validate

from lycoris.modules.full import FullModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOL64, TOL_DORA, TOL32 = 1e-12, 1e-5, 1e-5
LAYERS = {"fc": "lora_unet_fc", "conv": "lora_unet_conv"}


class Inner(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.fc = nn.Linear(64, 48, dtype=dtype)
        self.conv = nn.Conv2d(32, 24, 3, padding=1, dtype=dtype)


class Net(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(1)
        self.unet = Inner(dtype)


def _inputs(dtype):
    g = torch.Generator().manual_seed(2)
    return {"fc": torch.randn(7, 64, generator=g, dtype=dtype),
            "conv": torch.randn(2, 32, 6, 6, generator=g, dtype=dtype)}


def _op(layer: str, x, W, b):
    return F.linear(x, W, b) if layer == "fc" else F.conv2d(x, W, b, padding=1)


def _randomize(mod: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in mod.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(p * (1 + 0.1 * noise) if k.endswith("dora_scale") else 0.3 * noise)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def build(tmp_path, cls, kw, dtype=torch.float64, tag="a"):
    """(adapter path, base path, {layer: (W, b, x, y_lycoris)})."""
    net = Net(dtype)
    base = tmp_path / f"base_{tag}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base)
    xs, sd, ref = _inputs(dtype), {}, {}
    for i, (layer, name) in enumerate(LAYERS.items()):
        orig = getattr(net.unet, layer)
        W, b = orig.weight.detach().clone(), orig.bias.detach().clone()
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # LyCORIS creates its parameters in the default dtype
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = cls(name, orig, multiplier=1.0, **kw)
        finally:
            torch.set_default_dtype(old)
        _randomize(mod, 3 + i)
        mod.apply_to()
        with torch.no_grad():
            y = orig(xs[layer])
        ref[layer] = (W, b, xs[layer], y)
        sd.update({k: v.detach().clone().contiguous()
                   for k, v in mod.state_dict(prefix=f"{name}.").items()})
    path = tmp_path / f"lyco_{tag}.safetensors"
    save_file(sd, path, metadata={"ss_network_module": "lycoris.kohya"})
    return str(path), str(base), ref


CASES = [  # (id, class, kwargs, family, plain-LoRA rank of fc, of conv)
    ("locon-tucker", LoConModule, dict(lora_dim=4, alpha=2.0, use_tucker=True), "locon", 4, 4),
    ("loha", LohaModule, dict(lora_dim=3, alpha=2.0), "loha", 9, 9),
    ("loha-tucker", LohaModule, dict(lora_dim=3, alpha=2.0, use_tucker=True), "loha", 9, 9),
    ("lokr", LokrModule, dict(lora_dim=2, alpha=1.0), "lokr", 12, 8),
    ("lokr-full", LokrModule, dict(lora_dim=2, alpha=1.0, full_matrix=True), "lokr", 48, 24),
    ("full", FullModule, dict(), "full", 48, 24),
]
DORA = [
    ("locon-dora", LoConModule, dict(lora_dim=4, alpha=2.0, weight_decompose=True)),
    ("loha-dora-in", LohaModule, dict(lora_dim=3, alpha=2.0, weight_decompose=True,
                                      wd_on_out=False)),
    ("lokr-dora", LokrModule, dict(lora_dim=2, alpha=1.0, weight_decompose=True)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_inspect_validate_merge_unmerge(case, tmp_path):
    _, cls, kw, family, rank_fc, rank_conv = case
    path, base, ref = build(tmp_path, cls, kw)
    assert detect_format(path) == "lycoris"
    report = inspect(path, base=None)
    rows = {r["name"]: r for r in report["modules"]}
    assert set(rows) == {"unet.fc", "unet.conv"}
    assert {r["lycoris"]["family"] for r in rows.values()} == {family}
    assert rows["unet.fc"]["lycoris"]["plain_lora_rank"] == rank_fc
    assert rows["unet.conv"]["lycoris"]["plain_lora_rank"] == rank_conv
    conv = rows["unet.conv"]
    if conv["lycoris"]["shape_known"]:
        assert conv["kind"] == "conv" and conv["kernel"] == [3, 3]
    else:  # flattened conv factors: (out, in * k * k) until the base gives the kernel
        assert (conv["kind"], conv["out"], conv["in"]) == ("linear", 24, 32 * 9)
    info = read_adapter_info(path, base=base).modules["unet.conv"]
    assert (info.kind, info.kernel, info.rank) == ("conv", (3, 3), rank_conv)
    assert validate(path).ok
    out = tmp_path / "merged.safetensors"
    rep = merge(base, [path], output=str(out), device="cpu")
    assert rep.modules_merged == 2
    merged = load_file(out)
    for layer, (W, b, x, y) in ref.items():
        Wm, bm = merged[f"unet.{layer}.weight"], merged[f"unet.{layer}.bias"]
        assert Wm.dtype == torch.float64
        assert _rel(_op(layer, x, Wm, bm), y) <= TOL64
    back = tmp_path / "back.safetensors"
    unmerge(str(out), [path], output=str(back), device="cpu")
    orig = load_file(base)
    for k, v in load_file(back).items():
        assert _rel(v, orig[k]) <= TOL64


@pytest.mark.parametrize("case", DORA, ids=[c[0] for c in DORA])
def test_dora_merges_as_lycoris_forward_and_refuses_unmerge_and_lora(case, tmp_path):
    _, cls, kw = case
    path, base, ref = build(tmp_path, cls, kw)
    rows = {r["name"]: r for r in inspect(path)["modules"]}
    assert rows["unet.fc"]["lycoris"]["dora"] == ("out" if kw.get("wd_on_out", True) else "in")
    out = tmp_path / "merged.safetensors"
    merge(base, [path], output=str(out), device="cpu")
    merged = load_file(out)
    for layer, (W, b, x, y) in ref.items():
        assert _rel(_op(layer, x, merged[f"unet.{layer}.weight"], b), y) <= TOL_DORA
    with pytest.raises(LoraToolError) as e:
        unmerge(str(out), [path], output=str(tmp_path / "b.safetensors"), device="cpu")
    assert e.value.code == "LT414"
    with pytest.raises(LoraToolError) as e:
        convert(path, str(tmp_path / "p"), to="peft", base=base)
    assert e.value.code == "LT243" and "DoRA" in e.value.message


def _peft_outputs(tmp_path, peft_dir, dtype=torch.float32):
    from peft import PeftModel
    net = Net(dtype)
    model = PeftModel.from_pretrained(net, str(peft_dir))
    xs = _inputs(dtype)
    with torch.no_grad():
        return {layer: getattr(model.base_model.model.unet, layer)(xs[layer])
                for layer in LAYERS}


@pytest.mark.parametrize("case", [c for c in CASES if c[3] != "full"],
                         ids=[c[0] for c in CASES if c[3] != "full"])
def test_convert_to_peft_matches_lycoris_forward(case, tmp_path):
    _, cls, kw, _, rank_fc, rank_conv = case
    path, base, ref = build(tmp_path, cls, kw, dtype=torch.float32)
    dst = tmp_path / "peft"
    rep = convert(path, str(dst), to="peft", base=base)
    assert any(f"unet.fc: " in n and f"rank {rank_fc}" in n for n in rep.notes)
    got = _peft_outputs(tmp_path, dst)
    for layer, (_, _, _, y) in ref.items():
        assert _rel(got[layer], y) <= TOL32


def test_truncation_reports_retained_fraction_of_the_best_rank_k(tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    rep = convert(path, str(tmp_path / "k.safetensors"), to="kohya", base=base, rank=4)
    recs = {n: ly.parse_module(n, p, shape=s) for (n, p), s in zip(
        ly.split_state_dict(load_file(path)).items(), [(24, 32, 3, 3), (48, 64)])}
    out = ly.split_state_dict(load_file(tmp_path / "k.safetensors"))
    assert all(p["lora_down.weight"].shape[0] == 4 for p in out.values())
    note = next(n for n in rep.notes if n.startswith("truncated 2"))
    for name, rec in recs.items():
        S = torch.linalg.svdvals(ly.delta(rec).reshape(rec.shape[0], -1))
        want = float(torch.sqrt((S[:4] ** 2).sum() / (S ** 2).sum()))
        module = "unet." + name[len("lora_unet_"):]
        got = float(note.split(f"{module}: rank 9 -> 4, Frobenius retained ")[1].split()[0])
        assert got == pytest.approx(want, abs=1e-6)  # printed with 6 decimals
        # and the written factors are the best rank-4 approximation
        p = out[name]
        B = p["lora_up.weight"].reshape(rec.shape[0], 4).double()
        A = p["lora_down.weight"].reshape(4, -1).double()
        approx = B @ A * float(p["alpha"]) / 4
        err = torch.linalg.vector_norm(approx - ly.delta(rec).reshape(rec.shape[0], -1))
        assert float(err) == pytest.approx(float(torch.sqrt((S[4:] ** 2).sum())), rel=1e-6)


def test_full_diff_needs_dense_svd_for_plain_lora(tmp_path):
    path, base, ref = build(tmp_path, FullModule, {})
    with pytest.raises(LoraToolError) as e:
        convert(path, str(tmp_path / "k.safetensors"), to="kohya", base=base)
    assert e.value.code == "LT243" and "--dense-svd" in e.value.message
    rep = convert(path, str(tmp_path / "p"), to="peft", base=base, dense_svd=True)
    assert any("Frobenius retained" in n for n in rep.notes)


def test_unsupported_family_is_refused_by_name(tmp_path):
    path, base, _ = build(tmp_path, IA3Module, {})
    assert detect_format(path) == "lycoris"
    report = validate(path)
    assert not report.ok
    codes = {f.code for f in report.files[0].findings}
    assert codes == {"LT231"}
    with pytest.raises(LoraToolError) as e:
        inspect(path)
    assert e.value.code == "LT231" and "ia3" in e.value.message
    assert "lora_unet_" in e.value.message


def test_malformed_module_reports_its_code(tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    sd = load_file(path)
    sd["lora_unet_fc.hada_w2_b"] = sd["lora_unet_fc.hada_w2_b"][:2].contiguous()
    del sd["lora_unet_conv.hada_w1_a"]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    findings = validate(str(bad)).files[0].findings
    assert sorted(f.code for f in findings) == ["LT232", "LT234"]
    assert {f.module for f in findings} == {"lora_unet_fc", "lora_unet_conv"}


def test_plain_kohya_file_stays_kohya(tmp_path):
    path, _, _ = build(tmp_path, LoConModule, dict(lora_dim=4, alpha=2.0))
    assert detect_format(path) == "kohya"


def test_header_paths_do_not_import_torch(tmp_path):
    path, _, _ = build(tmp_path, LokrModule, dict(lora_dim=2, alpha=1.0))
    code = ("import sys, json; from loratool.ops.inspect import inspect; "
            "from loratool.ops.validate import validate; "
            f"r = inspect({path!r}); v = validate({path!r}, data=False); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print(json.dumps([r['modules'][0]['lycoris']['family'], v.ok]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["lokr", True]


def test_cli_inspect_and_convert(tmp_path):
    path, base, _ = build(tmp_path, LokrModule, dict(lora_dim=2, alpha=1.0))
    r = CliRunner().invoke(main, ["inspect", path, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["details"]["lycoris_families"] == "lokr: 2"
    r = CliRunner().invoke(main, ["convert", path, "-o", str(tmp_path / "o.safetensors"),
                                  "--to", "kohya", "--base", base, "--fro", "0.9"])
    assert r.exit_code == 0, r.output
    assert "Frobenius retained" in r.output


def test_float32_engine_merges_dora_and_loha(tmp_path):
    # the CUDA engine's code (float32, whole tensors) run on the CPU
    from loratool.ops.merge.job import Engines, run_with
    for cls, kw, tol in ((LokrModule, dict(lora_dim=2, alpha=1.0, weight_decompose=True),
                          TOL_DORA), (LohaModule, dict(lora_dim=3, alpha=2.0), 1e-6)):
        path, base, ref = build(tmp_path, cls, kw, dtype=torch.float32, tag=cls.__name__)
        out = tmp_path / f"m_{cls.__name__}.safetensors"
        run_with(Engines(precision="fp32"), "merge", base, [path], output=str(out),
                 device="cpu")
        merged = load_file(out)
        for layer, (W, b, x, y) in ref.items():
            assert _rel(_op(layer, x, merged[f"unet.{layer}.weight"], b), y) <= tol


def test_generic_wrapper_names_merge_like_kohya_names(tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    renamed = tmp_path / "generic.safetensors"
    save_file({k.replace("lora_unet_", "lycoris_unet_"): v for k, v in load_file(path).items()},
              renamed)
    assert detect_format(str(renamed)) == "lycoris"
    info = read_adapter_info(str(renamed), base=base)
    assert set(info.modules) == {"unet.fc", "unet.conv"}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge(base, [path], output=str(a), device="cpu")
    merge(base, [str(renamed)], output=str(b), device="cpu")
    ta, tb = load_file(a), load_file(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_inspect_stats_compose_and_resize_read_lycoris(tmp_path):
    from loratool.ops.compose import compose
    path, base, _ = build(tmp_path, LokrModule, dict(lora_dim=2, alpha=1.0))
    rows = {r["name"]: r for r in inspect(path, stats=True)["modules"]}
    rec = ly.parse_module("lora_unet_fc", ly.split_state_dict(load_file(path))["lora_unet_fc"])
    assert rows["unet.fc"]["stats"]["norm"] == pytest.approx(
        float(torch.linalg.vector_norm(ly.delta(rec))), rel=1e-12)
    adapter, _ = compose([(path, 0.25), (path, 0.75)])
    assert _rel(adapter.modules["unet.fc"].delta(), ly.delta(rec)) <= TOL64
    from loratool.ops.resize import resize
    small, _ = resize(path, rank=2)
    assert small.modules["unet.fc"].rank == 2


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5], DORA[1]],
                         ids=["loha-tucker", "lokr", "full", "loha-dora-in"])
def test_lycoris_to_lycoris_is_bit_exact(case, tmp_path):
    path, base, _ = build(tmp_path, case[1], case[2])
    for options in ({}, {"base": base}):
        out = tmp_path / f"rt{len(options)}.safetensors"
        rep = convert(path, str(out), to="lycoris", **options)
        assert rep.notes[-1] == "2 LyCORIS module(s) written with their original tensors"
        a, b = load_file(path), load_file(out)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
