"""``resize`` against dense fp64 references (spec/lowrank.md, "resize"), and its CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import loratool
from loratool.adapter import load_adapter, save_adapter
from loratool.cli import main
from loratool.errors import LoraToolError

from _lowrank_helpers import (adapter, dense, dense_bias, diagonal_module, module,
                              rebuild_bound, rel, scale_of, svals, truncated)


def _all_kinds(dtype=torch.float32, rank=6, **kw):
    return adapter(
        module("lin", 20, 16, rank, 12.0, dtype=dtype, seed=1, decay=0.8, **kw),
        module("t", 18, 14, rank, 6.0, layout="in_out", dtype=dtype, seed=2, decay=0.7, **kw),
        module("rs", 24, 10, rank, 4.0, scaling="rslora", dtype=dtype, seed=3, decay=0.8, **kw),
        module("conv", 8, 3, rank, 5.0, kind="conv", kernel=(3, 3), dtype=dtype, seed=4,
               decay=0.75, **kw),
        module("emb", 9, 30, rank, 3.0, kind="embedding", dtype=dtype, seed=5, decay=0.8, **kw),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_resized_delta_is_truncated_svd_of_dense(dtype, k):
    src = _all_kinds(dtype)
    new, report = loratool.resize(src, rank=k)
    assert report["summary"]["resized"] == len(src.modules)
    for name, m in src.modules.items():
        out = new.modules[name]
        D = dense(m)
        assert out.rank == k
        assert (out.kind, out.layout, out.alpha, out.scaling) == (m.kind, m.layout, m.alpha,
                                                                  m.scaling)
        assert out.A.shape == (k, *m.A.shape[1:]) and out.B.shape == (m.B.shape[0], k,
                                                                       *m.B.shape[2:])
        assert out.A.dtype == dtype and out.B.dtype == dtype
        Dk = truncated(D, k)
        assert rel(dense(out), Dk) <= rebuild_bound(k, dtype), name
        # the singular values kept are those of the dense delta
        assert torch.allclose(svals(dense(out))[:k], svals(D)[:k],
                              rtol=2 * rebuild_bound(k, dtype))
        row = next(r for r in report["modules"] if r["name"] == name)
        S = svals(D)
        assert row["retained"] == pytest.approx(float(S[:k].norm() / S.norm()), rel=1e-9)
        assert row["residual"] == pytest.approx(float(S[k:].norm() / S.norm()), rel=1e-9)
        assert (row["old_rank"], row["new_rank"], row["clamped"], row["unchanged"]) == (
            6, k, False, False)


def test_factors_are_balanced_and_scale_is_folded():
    m = module("lin", 30, 20, 8, 24.0, seed=7, decay=0.8, dtype=torch.float64)
    new, _ = loratool.resize(adapter(m), rank=3)
    out = new.modules["lin"]
    s_new = 24.0 / 3
    assert scale_of(out) == s_new
    # s' B' A' = U S V^T with B' = U sqrt(S/s'), A' = sqrt(S/s') V^T
    S = svals(dense(m))[:3]
    assert torch.allclose(out.B.norm(dim=0), torch.sqrt(S / s_new), rtol=1e-12)
    assert torch.allclose(out.A.norm(dim=1), torch.sqrt(S / s_new), rtol=1e-12)


def test_negative_alpha_is_kept():
    m = module("lin", 12, 10, 5, -6.0, seed=2, dtype=torch.float64)
    new, _ = loratool.resize(adapter(m), rank=2)
    assert new.modules["lin"].alpha == -6.0
    assert rel(dense(new.modules["lin"]), truncated(dense(m), 2)) < 1e-12


def test_same_rank_is_copied_bit_for_bit():
    src = _all_kinds(torch.bfloat16, bias=True)
    for kw in ({"rank": 6}, {"rank": 100}, {"fro": 1.0}, {"cumulative": 1.0},
               {"sv_ratio": 1e30}, {"fro": 0.1, "min_rank": 6}):
        new, report = loratool.resize(src, **kw)
        for name, m in src.modules.items():
            out = new.modules[name]
            assert torch.equal(out.A, m.A) and torch.equal(out.B, m.B)
            assert torch.equal(out.bias, m.bias) and out.alpha == m.alpha
        assert report["summary"]["unchanged"] == len(src.modules)
    assert report["summary"]["parameters_after"] == report["summary"]["parameters_before"]


def test_rank_above_what_the_module_can_have_is_clamped_and_lossless():
    # rank 12 factors of a 5 x 7 delta: the delta has rank <= 5, resize to "12" gives 5.
    m = module("small", 5, 7, 12, 12.0, seed=3)
    big = module("big", 30, 30, 4, 4.0, seed=4)
    new, report = loratool.resize(adapter(m, big), rank=12)
    rows = {r["name"]: r for r in report["modules"]}
    assert rows["small"]["new_rank"] == 5 and rows["small"]["limit"] == 5
    assert rows["small"]["clamped"] and not rows["small"]["unchanged"]
    assert rows["big"]["clamped"] and rows["big"]["unchanged"] and rows["big"]["limit"] == 4
    assert report["summary"]["clamped"] == 2
    assert rel(dense(new.modules["small"]), dense(m)) <= rebuild_bound(5, torch.float32)
    assert rows["small"]["retained"] == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), r=st.integers(1, 16),
       alpha=st.floats(0.25, 64), rslora=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_resize_to_full_rank_is_lossless(out, inp, r, alpha, rslora, seed, dtype):
    m = module("m", out, inp, r, alpha, scaling="rslora" if rslora else "standard",
               seed=seed, dtype=dtype, bias=True)
    new, report = loratool.resize(adapter(m), rank=r)
    got = new.modules["m"]
    full = min(r, out, inp)
    assert got.rank == full
    if full == r:
        assert got is m
    else:
        assert rel(dense(got), dense(m)) <= rebuild_bound(full, dtype)
        assert torch.allclose(dense_bias(got), dense_bias(m),
                              rtol=2 * rebuild_bound(1, dtype), atol=0)


def test_bias_keeps_its_effect():
    m = module("m", 10, 8, 6, 6.0, seed=9, bias=True, dtype=torch.float64, scaling="rslora")
    new, _ = loratool.resize(adapter(m), rank=2)
    out = new.modules["m"]
    assert torch.allclose(dense_bias(out), dense_bias(m), rtol=1e-14)
    assert not torch.allclose(out.bias, m.bias)  # the scale changed; the bias follows it


# --- the rules end to end, at their boundaries --------------------------------------------------

def _diag_adapter():
    # exact singular values: d1 [3, 1 x7] (S^2 total 16), d2 [8, 4, 2, 1], d3 [4, 2, 1, 1]
    return adapter(diagonal_module([3, 1, 1, 1, 1, 1, 1, 1], name="d1"),
                   diagonal_module([8, 4, 2, 1], name="d2", out=6, inp=5),
                   diagonal_module([4, 2, 1, 1], name="d3", out=4, inp=9))


def test_kernel_is_exact_on_diagonal_modules():
    from loratool.linalg import CoreSVD
    for m in _diag_adapter().modules.values():
        B, A = m.factors()
        want = sorted((float(x) for x in m.B.diagonal()), reverse=True)
        assert CoreSVD(B, A, m.scale).S.tolist() == want


@pytest.mark.parametrize("kw,ranks", [
    ({"fro": 0.75}, {"d1": 1}),
    ({"fro": math.nextafter(0.75, 1)}, {"d1": 2}),
    ({"sv_ratio": 2.0}, {"d2": 2}),
    ({"sv_ratio": math.nextafter(2.0, 0)}, {"d2": 1}),
    ({"cumulative": 0.75}, {"d3": 2}),
    ({"cumulative": math.nextafter(0.75, 1)}, {"d3": 3}),
    ({"sv_ratio": 2.0, "max_rank": 1}, {"d2": 1}),
    ({"sv_ratio": 2.0, "min_rank": 3}, {"d1": 3, "d2": 3}),
])
def test_rules_at_their_boundaries_end_to_end(kw, ranks):
    src = _diag_adapter()
    new, report = loratool.resize(src, **kw)
    for name, k in ranks.items():
        assert new.modules[name].rank == k, name
        assert rel(dense(new.modules[name]), truncated(dense(src.modules[name]), k)) < 1e-15


def test_fro_rule_meets_its_promise():
    src = _all_kinds(torch.float64, rank=8)
    new, report = loratool.resize(src, fro=0.9)
    for name, m in src.modules.items():
        S = svals(dense(m))
        k = new.modules[name].rank
        assert float(S[:k].square().sum()) >= 0.81 * float(S.square().sum()) * (1 - 1e-12)
        assert k == 1 or float(S[:k - 1].square().sum()) < 0.81 * float(S.square().sum())
        assert next(r for r in report["modules"] if r["name"] == name)["retained"] >= 0.9 - 1e-12


def test_zero_module_keeps_rank_one():
    m = module("z", 6, 5, 3, 3.0)
    m.B = torch.zeros_like(m.B)
    new, report = loratool.resize(adapter(m), fro=0.5)
    assert new.modules["z"].rank == 1 and float(new.modules["z"].B.abs().max()) == 0
    assert report["modules"][0]["retained"] == 1.0


# --- errors -----------------------------------------------------------------------------------

def test_dora_is_refused():
    src = adapter(module("plain", 6, 6, 2, 2.0), module("dora", 6, 6, 2, 2.0, magnitude=True))
    with pytest.raises(LoraToolError) as e:
        loratool.resize(src, rank=1)
    assert e.value.code == "LT531" and "'dora'" in e.value.message and "merge" in e.value.message


@pytest.mark.parametrize("kw", [{}, {"rank": 2, "fro": 0.5}, {"fro": 2.0},
                                {"rank": 2, "min_rank": 3, "max_rank": 2}])
def test_bad_rules_are_refused(kw):
    with pytest.raises(LoraToolError) as e:
        loratool.resize(_diag_adapter(), **kw)
    assert e.value.code == "LT530"


def test_float16_overflow_is_reported():
    # a 1 x 1 delta B A = 4 * 6e4^2; rsLoRA rank 4 -> 1 folds s/s' = 1/2: sqrt(7.2e9) > 65504
    m = module("m", 1, 1, 4, 1.0, scaling="rslora", dtype=torch.float16, seed=1)
    m.A = torch.full_like(m.A, 6e4)
    m.B = torch.full_like(m.B, 6e4)
    with pytest.raises(LoraToolError) as e:
        loratool.resize(adapter(m), rank=1)
    assert e.value.code == "LT535" and "float16" in e.value.message


def test_nonfinite_input_is_refused():
    m = module("m", 8, 8, 4, 1.0)
    m.A[0, 0] = float("nan")
    with pytest.raises(LoraToolError) as e:
        loratool.resize(adapter(m), rank=1)
    assert e.value.code == "LT209" and "'m'" in e.value.message


def test_result_object_and_paths(tmp_path):
    src = _all_kinds()
    path = tmp_path / "a.safetensors"
    save_adapter(src, path)
    result = loratool.resize(str(path), rank=2)
    assert result.adapter is list(result)[0] and result.report["input"] == str(path)
    saved = tmp_path / "b.safetensors"
    save_adapter(result.adapter, saved)
    back = load_adapter(saved)
    assert back.alpha == src.alpha
    for name, m in back.modules.items():
        assert rel(dense(m), dense(result.adapter.modules[name])) < 1e-7
    assert "resize --rank 2" in back.provenance


# --- CLI ----------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "in.safetensors"
    save_adapter(_all_kinds(), path)
    return str(path)


def test_cli_resize_writes_and_reports(saved, tmp_path):
    out = str(tmp_path / "out.safetensors")
    r = CliRunner().invoke(main, ["resize", saved, "--rank", "2", "-o", out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["output"] == out and report["summary"]["ranks_after"] == {"2": 5}
    assert report["tensor_hash"].startswith("sha256:")
    new = load_adapter(out)
    src = load_adapter(saved)
    for name, m in new.modules.items():
        assert rel(dense(m), truncated(dense(src.modules[name]), 2)) <= rebuild_bound(
            2, torch.float32)


def test_cli_resize_table_and_preview(saved, tmp_path):
    r = CliRunner().invoke(main, ["resize", saved, "--fro", "0.9", "--max-rank", "4"])
    assert r.exit_code == 0, r.output
    assert "retained" in r.stdout and "conv" in r.stdout and "parameters" in r.stdout
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args,code", [
    ([], 2), (["--rank", "2", "--fro", "0.5"], 2), (["--fro", "1.5"], 2), (["--rank", "0"], 2),
    (["--sv-ratio", "0.5"], 2), (["--cumulative", "0"], 2),
])
def test_cli_usage_errors_exit_2(saved, args, code):
    r = CliRunner().invoke(main, ["resize", saved, *args])
    assert r.exit_code == code, r.output


def test_cli_errors_exit_1(saved, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["resize", saved, "--rank", "2", "-o", saved, "--overwrite"])
    assert r.exit_code == 1 and "[LT502]" in r.stderr
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"x")
    r = runner.invoke(main, ["resize", saved, "--rank", "2", "-o", str(out)])
    assert r.exit_code == 1 and "[LT503]" in r.stderr and out.read_bytes() == b"x"
    r = runner.invoke(main, ["resize", saved, "--rank", "2", "-o", str(out), "--overwrite", "-q"])
    assert r.exit_code == 0 and load_adapter(out).modules["lin"].rank == 2
    r = runner.invoke(main, ["resize", saved, "--fro", "0.5", "--min-rank", "3",
                             "--max-rank", "2"])
    assert r.exit_code == 1 and "[LT530]" in r.stderr
    dora = tmp_path / "dora.safetensors"
    save_adapter(adapter(module("d", 6, 6, 2, 2.0, magnitude=True)), dora)
    r = runner.invoke(main, ["resize", str(dora), "--rank", "1"])
    assert r.exit_code == 1 and "[LT531]" in r.stderr and "Traceback" not in r.output


def test_cli_alpha_for_loralib_inputs(tmp_path):
    pt = tmp_path / "lora.pt"
    torch.save({"fc.lora_A": torch.randn(4, 8), "fc.lora_B": torch.randn(6, 4)}, pt)
    runner = CliRunner()
    r = runner.invoke(main, ["resize", str(pt), "--rank", "2"])
    assert r.exit_code == 1 and "--alpha" in r.stderr
    out = tmp_path / "out.safetensors"
    r = runner.invoke(main, ["resize", str(pt), "--rank", "2", "--alpha", "8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    new = load_adapter(out).modules["fc"]
    src = load_adapter(pt, alpha=8.0).modules["fc"]
    assert new.alpha == 8.0 and rel(dense(new), truncated(dense(src), 2)) <= rebuild_bound(
        2, torch.float32)
    for cmd in (["compose", str(pt), f"{pt}:-0.5"], ["compare", str(pt), str(pt)]):
        r = runner.invoke(main, [*cmd, "--alpha", "8"])
        assert r.exit_code == 0, r.output
