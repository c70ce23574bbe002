"""``compose`` and ``compare`` against dense fp64 references (spec/lowrank.md), and their CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import loratool
from loratool.adapter import load_adapter, save_adapter
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.ops.compose import parse_weighted

from _lowrank_helpers import (UNIT, adapter, dense, dense_bias, module, rebuild_bound, rel,
                              scale_of, truncated)


def _pair(dtype=torch.float32):
    """Two adapters over overlapping module sets, different ranks/alphas/scaling rules."""
    a = adapter(module("q", 16, 12, 4, 8.0, seed=1, dtype=dtype, decay=0.8),
                module("conv", 6, 3, 3, 3.0, kind="conv", kernel=(3, 3), seed=2, dtype=dtype),
                module("emb", 7, 20, 2, 2.0, kind="embedding", seed=3, dtype=dtype),
                module("only_a", 5, 5, 2, 2.0, seed=4, dtype=dtype))
    b = adapter(module("q", 16, 12, 6, 3.0, scaling="rslora", seed=5, dtype=dtype, decay=0.7),
                module("conv", 6, 3, 2, 5.0, kind="conv", kernel=(3, 3), seed=6, dtype=dtype),
                module("emb", 7, 20, 5, 1.0, kind="embedding", seed=7, dtype=dtype),
                module("only_b", 9, 4, 3, 6.0, layout="in_out", seed=8, dtype=dtype), alpha=3.0)
    return a, b


def _exact_bound(parts, dtype) -> float:
    """spec/lowrank.md: |error| <= u * sum_i |w_i s_i| |B_i|_F |A_i|_2 (B rounded once)."""
    total = 0.0
    for m, w in parts:
        B = m.B.to(torch.float64).reshape(m.B.shape[0], -1)
        A = m.A.to(torch.float64).reshape(m.A.shape[0], -1)
        total += abs(w * scale_of(m)) * float(B.norm()) * float(torch.linalg.matrix_norm(A, 2))
    return UNIT[dtype] * total * 1.01 + 1e-12


def _dense_sum(items, name):
    parts = [(a.modules[name], w) for a, w in items if name in a.modules]
    return sum(w * dense(m) for m, w in parts), parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_exact_compose_is_the_weighted_dense_sum(dtype):
    a, b = _pair(dtype)
    items = [(a, 0.7), (b, -1.3)]
    new, report = loratool.compose(items)
    assert sorted(new.modules) == ["conv", "emb", "only_a", "only_b", "q"]
    for name, m in new.modules.items():
        want, parts = _dense_sum(items, name)
        assert m.rank == sum(p.rank for p, _ in parts)
        assert (m.scaling, m.alpha, scale_of(m)) == ("standard", float(m.rank), 1.0)
        assert m.kind == parts[0][0].kind and m.layout == parts[0][0].layout
        assert m.A.dtype == dtype
        err = float((dense(m) - want).norm())
        assert err <= _exact_bound(parts, dtype), name
    rows = {r["name"]: r for r in report["modules"]}
    assert rows["q"]["ranks"] == [4, 6] and rows["only_b"]["ranks"] == [None, 3]
    assert rows["q"]["weights"] == [0.7, -1.3] and all(r["exact"] for r in rows.values())
    assert report["summary"]["in_all_inputs"] == 3 and report["summary"]["truncated"] == 0


def test_power_of_two_weights_and_scales_are_exact():
    a, b = _pair()
    # conv scales are 1.0 and 2.5: with weights 0.5 and 0.8, w*s = 0.5 and 2.0: no rounding
    new, _ = loratool.compose([(a, 0.5), (b, 0.8)])
    m, ma, mb = new.modules["conv"], a.modules["conv"], b.modules["conv"]
    assert torch.equal(m.B, torch.cat([0.5 * ma.B, 2.0 * mb.B], dim=1))
    assert torch.equal(m.A, torch.cat([ma.A, mb.A]))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_truncated_compose_is_truncated_svd_of_dense_sum(k):
    a, b = _pair()
    items = [(a, 1.0), (b, 0.5)]
    new, report = loratool.compose(items, rank=k)
    for name, m in new.modules.items():
        want, parts = _dense_sum(items, name)
        r_cat = sum(p.rank for p, _ in parts)
        limit = min(r_cat, *want.shape)
        kk = min(k, limit)
        assert m.rank == kk, name
        assert (m.alpha, m.scaling) == (float(kk), "standard")
        if kk == r_cat:  # nothing to truncate: the exact concatenation
            assert rel(dense(m), want) <= 1e-6
        else:
            assert rel(dense(m), truncated(want, kk)) <= rebuild_bound(kk, torch.float32), name
        row = next(r for r in report["modules"] if r["name"] == name)
        S = torch.linalg.svdvals(want)
        assert row["retained"] == pytest.approx(float(S[:kk].norm() / S.norm()), rel=1e-9)
        assert row["exact"] == (kk == r_cat)


def test_fro_truncation_keeps_the_fraction():
    a, b = _pair(torch.float64)
    new, report = loratool.compose([(a, 1.0), (b, 1.0)], fro=0.8)
    for name, m in new.modules.items():
        want, _ = _dense_sum([(a, 1.0), (b, 1.0)], name)
        S = torch.linalg.svdvals(want)
        k = m.rank
        assert float(S[:k].square().sum()) >= 0.64 * float(S.square().sum()) * (1 - 1e-12)
        assert k == 1 or float(S[:k - 1].square().sum()) < 0.64 * float(S.square().sum())


def test_cancelling_inputs_give_zero():
    a, _ = _pair()
    new, _ = loratool.compose([(a, 1.0), (a, -1.0)])
    for m in new.modules.values():  # the factors cancel exactly: [sB | -sB] [A; A]
        r = m.rank // 2
        assert torch.equal(m.B[:, r:], -m.B[:, :r]) and torch.equal(m.A[r:], m.A[:r])
    new, _ = loratool.compose([(a, 1.0), (a, -1.0)], rank=2)
    for name, m in new.modules.items():
        assert float(dense(m).norm()) <= 1e-12 * float(dense(a.modules[name]).norm())


def test_biases_are_summed_with_their_scales():
    p = module("q", 8, 6, 3, 6.0, seed=1, bias=True, dtype=torch.float64)
    q = module("q", 8, 6, 2, 1.0, seed=2, bias=True, scaling="rslora", dtype=torch.float64)
    r = module("q", 8, 6, 2, 1.0, seed=3, dtype=torch.float64)  # no bias
    new, _ = loratool.compose([(adapter(p), 0.5), (adapter(q), -2.0), (adapter(r), 1.0)])
    want = 0.5 * dense_bias(p) - 2.0 * dense_bias(q)
    assert torch.allclose(dense_bias(new.modules["q"]), want, rtol=1e-15, atol=1e-15)
    new, _ = loratool.compose([(adapter(p), 0.5), (adapter(q), -2.0)], rank=1)
    assert torch.allclose(dense_bias(new.modules["q"]), want, rtol=1e-15, atol=1e-15)
    new, _ = loratool.compose([adapter(r)])
    assert new.modules["q"].bias is None


@pytest.mark.parametrize("d1,d2,want", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16,
                                                       torch.float32),
    (torch.float32, torch.bfloat16, torch.float32), (torch.float16, torch.float64,
                                                     torch.float64)])
def test_mixed_dtypes_take_the_widest(d1, d2, want):
    a = adapter(module("q", 6, 5, 2, 2.0, dtype=d1))
    b = adapter(module("q", 6, 5, 3, 2.0, dtype=d2, seed=1))
    new, report = loratool.compose([a, b])
    assert new.modules["q"].A.dtype == want and new.modules["q"].B.dtype == want


def test_metadata_of_the_result():
    a, b = _pair()
    a.base_model = b.base_model = "llama"
    a.extra_metadata = {"x": "1", "y": "2"}
    b.extra_metadata = {"x": "1", "y": "3"}
    new, report = loratool.compose([(a, 1.0), (b, 0.25)])
    assert new.base_model == "llama" and new.extra_metadata == {"x": "1"}
    ranks = [m.rank for m in new.modules.values()]
    assert new.alpha == max(set(ranks), key=lambda r: (ranks.count(r), r))
    assert "compose" in new.provenance and "0.25" in new.provenance
    b.base_model = "mistral"
    _, report = loratool.compose([(a, 1.0), (b, 0.0)])
    assert any("different base models" in w for w in report["warnings"])
    assert any("weight 0" in w for w in report["warnings"])


# --- errors ------------------------------------------------------------------------------------

def test_shape_mismatch_is_an_error():
    a = adapter(module("q", 8, 6, 2, 2.0))
    b = adapter(module("q", 8, 7, 2, 2.0))
    with pytest.raises(LoraToolError) as e:
        loratool.compose([a, b])
    assert e.value.code == "LT532" and "'q'" in e.value.message and "[8, 7]" in e.value.message


def test_conv_kernel_mismatch_is_an_error():
    a = adapter(module("c", 4, 3, 2, 2.0, kind="conv", kernel=(3, 1)))
    b = adapter(module("c", 4, 3, 2, 2.0, kind="conv", kernel=(1, 3)))
    with pytest.raises(LoraToolError) as e:
        loratool.compose([a, b])
    assert e.value.code == "LT532"


def test_kind_or_layout_mismatch_is_an_error():
    a = adapter(module("q", 8, 6, 2, 2.0))
    b = adapter(module("q", 6, 8, 2, 2.0, layout="in_out"))  # same base shape, other layout
    with pytest.raises(LoraToolError) as e:
        loratool.compose([a, b])
    assert e.value.code == "LT533" and "in_out" in e.value.message


@pytest.mark.parametrize("items,code", [
    ([], "LT534"), ([("A", float("nan"))], "LT534"), ([("A", float("inf"))], "LT534"),
    ([("DORA", 1.0)], "LT531"), ([("A", 1.0), ("DORA", 1.0)], "LT531"),
])
def test_bad_inputs_are_refused(items, code):
    a = adapter(module("q", 8, 6, 2, 2.0))
    dora = adapter(module("q", 8, 6, 2, 2.0, magnitude=True))
    with pytest.raises(LoraToolError) as e:
        loratool.compose([({"A": a, "DORA": dora}[x], w) for x, w in items])
    assert e.value.code == code


def test_bad_rule_is_refused():
    a = adapter(module("q", 8, 6, 2, 2.0))
    with pytest.raises(LoraToolError) as e:
        loratool.compose([a], rank=2, fro=0.5)
    assert e.value.code == "LT530"


# --- properties ----------------------------------------------------------------------------------

_weights = st.floats(-4, 4, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


@settings(max_examples=30, deadline=None)
@given(wa=_weights, wb=_weights, c=_weights, seed=st.integers(0, 2**16))
def test_compose_is_linear(wa, wb, c, seed):
    a = adapter(module("q", 9, 7, 3, 4.0, seed=seed, dtype=torch.float64),
                module("k", 5, 5, 2, 1.0, seed=seed + 1, scaling="rslora", dtype=torch.float64))
    b = adapter(module("q", 9, 7, 2, 2.0, seed=seed + 2, dtype=torch.float64))
    ab, _ = loratool.compose([(a, wa), (b, wb)])
    scaled, _ = loratool.compose([(ab, c)])
    direct, _ = loratool.compose([(a, c * wa), (b, c * wb)])
    for name in direct.modules:
        want, _ = _dense_sum([(a, c * wa), (b, c * wb)], name)
        tol = 1e-13 * (float(dense(a.modules[name]).norm()) * abs(c * wa) + (
            float(dense(b.modules[name]).norm()) * abs(c * wb) if name in b.modules else 0))
        assert float((dense(scaled.modules[name]) - want).norm()) <= tol
        assert float((dense(direct.modules[name]) - want).norm()) <= tol


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 10), inp=st.integers(1, 10), r=st.integers(1, 8),
       alpha=st.floats(0.1, 100), rslora=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_compose_of_one_adapter_with_weight_one_is_that_adapter(out, inp, r, alpha, rslora,
                                                                  seed, dtype):
    m = module("m", out, inp, r, alpha, scaling="rslora" if rslora else "standard", seed=seed,
               dtype=dtype, bias=True)
    new, _ = loratool.compose([(adapter(m), 1.0)])
    got = new.modules["m"]
    assert got.rank == r and torch.equal(got.A, m.A)
    assert float((dense(got) - dense(m)).norm()) <= _exact_bound([(m, 1.0)], dtype)
    assert torch.allclose(dense_bias(got), dense_bias(m), rtol=UNIT[dtype] * 1.01, atol=0)


def _merge(base: dict, adp, weight: float, dtype, tmp: str) -> dict:
    """merge(base, adapter:weight) with loratool.ops.merge (rounds once to the base dtype)."""
    from safetensors.torch import load_file, save_file

    from loratool.ops.merge import merge
    n = len(os.listdir(tmp))
    src, out = os.path.join(tmp, f"in{n}.safetensors"), os.path.join(tmp, f"out{n}.safetensors")
    save_file({k: v.contiguous() for k, v in base.items()}, src)
    merge(src, [(adp, weight)], output=out, device="cpu")
    return load_file(out)


@settings(max_examples=10, deadline=None)
@given(wa=_weights, wb=_weights, seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_merge_of_compose_equals_successive_merges(wa, wb, seed, dtype):
    import tempfile
    a, b = _pair()
    g = torch.Generator().manual_seed(seed)
    names = set(a.modules) | set(b.modules)
    infos = {n: (a.modules.get(n) or b.modules[n]).info for n in names}
    base = {f"{n}.weight": torch.randn(*i.base_shape, generator=g, dtype=torch.float64).to(dtype)
            for n, i in infos.items()}
    composed, _ = loratool.compose([(a, wa), (b, wb)])
    with tempfile.TemporaryDirectory() as tmp:
        one = _merge(base, composed, 1.0, dtype, tmp)
        two = _merge(_merge(base, a, wa, dtype, tmp), b, wb, dtype, tmp)
    for key in base:
        name = key.removesuffix(".weight")
        _, parts = _dense_sum([(a, wa), (b, wb)], name)
        # the compose bound, plus one rounding of the base per merge (two for successive merges)
        mag = base[key].abs().to(torch.float64) + sum(
            abs(w) * m.delta(torch.float64).abs() for m, w in parts)
        limit = _exact_bound(parts, torch.float32) + 3 * UNIT[dtype] * float(mag.max())
        assert float((one[key].to(torch.float64) - two[key].to(torch.float64)).abs().max()) <= \
            limit, key


# --- compare -----------------------------------------------------------------------------------

def test_compare_against_dense():
    a, b = _pair(torch.float64)
    report = loratool.compare(a, b)
    rows = {r["name"]: r for r in report["modules"]}
    for name in ("q", "conv", "emb"):
        da, db = dense(a.modules[name]), dense(b.modules[name])
        r = rows[name]
        assert r["status"] == "ok"
        assert r["norm_a"] == pytest.approx(float(da.norm()), rel=1e-12)
        assert r["norm_ratio"] == pytest.approx(float(db.norm() / da.norm()), rel=1e-12)
        assert r["cosine"] == pytest.approx(float((da * db).sum() / (da.norm() * db.norm())),
                                            rel=1e-10, abs=1e-14)
        assert r["rel_diff"] == pytest.approx(float((db - da).norm() / da.norm()), rel=1e-10)
    assert rows["only_a"]["status"] == "only_a" and rows["only_b"]["status"] == "only_b"
    s = report["summary"]
    assert s["only_a"] == ["only_a"] and s["only_b"] == ["only_b"] and s["common"] == 3
    num = sum(float((dense(a.modules[n]) * dense(b.modules[n])).sum()) for n in rows
              if rows[n]["status"] == "ok")
    den = math.sqrt(sum(float(dense(a.modules[n]).square().sum()) for n in ("q", "conv", "emb"))
                    * sum(float(dense(b.modules[n]).square().sum()) for n in ("q", "conv", "emb")))
    assert s["cosine"] == pytest.approx(num / den, rel=1e-10)


def test_compare_special_cases():
    a = adapter(module("q", 8, 6, 2, 2.0), module("z", 4, 4, 2, 2.0),
                module("d", 4, 4, 2, 2.0), module("s", 4, 4, 2, 2.0))
    b = adapter(module("q", 8, 6, 3, 5.0, seed=3), module("z", 4, 4, 2, 2.0),
                module("d", 4, 4, 2, 2.0, magnitude=True), module("s", 4, 5, 2, 2.0))
    b.modules["z"].B.zero_()
    rows = {r["name"]: r for r in loratool.compare(a, b)["modules"]}
    assert rows["z"]["cosine"] is None and rows["z"]["norm_ratio"] == 0.0
    assert rows["d"]["status"] == "dora" and rows["s"]["status"] == "shape_mismatch"
    same = loratool.compare(a, a)
    assert all(r["cosine"] == pytest.approx(1.0) for r in same["modules"])
    assert all(r["rel_diff"] <= 1e-14 for r in same["modules"])
    # a resized copy: cosine is the retained Frobenius fraction (the truncation is orthogonal)
    small, rep = loratool.resize(a, rank=1)
    rows = {r["name"]: r for r in loratool.compare(a, small)["modules"]}
    for r in rep["modules"]:
        assert rows[r["name"]]["cosine"] == pytest.approx(r["retained"], rel=1e-6)


# --- A[:W] parsing and CLI -----------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("b.safetensors:-0.5", ("b.safetensors", -0.5)),
    ("b.safetensors:+2", ("b.safetensors", 2.0)),
    ("c:1e-1", ("c", 0.1)),
    ("c:.5", ("c", 0.5)),
    ("c:3.", ("c", 3.0)),
    ("dir:x/a.safetensors", ("dir:x/a.safetensors", 1.0)),
    ("dir:1/a.safetensors:2", ("dir:1/a.safetensors", 2.0)),
    ("a:1:1", ("a:1", 1.0)),
    ("a:", ("a:", 1.0)),
    (":1", (":1", 1.0)),
    ("a:0x10", ("a:0x10", 1.0)),
    ("a:1_0", ("a:1_0", 1.0)),
    ("C:\\x\\a.safetensors", ("C:\\x\\a.safetensors", 1.0)),
])
def test_parse_weighted(text, want):
    assert parse_weighted(text) == want


@pytest.mark.parametrize("text", ["a:nan", "a:inf", "a:-Infinity"])
def test_parse_weighted_refuses_nonfinite(text):
    with pytest.raises(LoraToolError) as e:
        parse_weighted(text)
    assert e.value.code == "LT534"


@pytest.fixture
def files(tmp_path):
    a, b = _pair()
    d = tmp_path / "dir:1"
    d.mkdir()
    pa, pb = d / "a.safetensors", tmp_path / "b:2.safetensors"
    save_adapter(a, pa)
    save_adapter(b, pb)
    return str(pa), str(pb), a, b


def test_cli_compose_exact_with_colons_and_negative_weight(files, tmp_path):
    pa, pb, a, b = files
    out = str(tmp_path / "out.safetensors")
    r = CliRunner().invoke(main, ["compose", pa, f"{pb}:-0.5", "-o", out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [i["input"] for i in report["inputs"]] == [pa, pb]
    assert [i["weight"] for i in report["inputs"]] == [1.0, -0.5]
    new = load_adapter(out)
    for name, m in new.modules.items():
        want, parts = _dense_sum([(a, 1.0), (b, -0.5)], name)
        assert float((dense(m) - want).norm()) <= _exact_bound(parts, torch.float32)


def test_cli_compose_truncated_table(files, tmp_path):
    pa, pb, _, _ = files
    out = str(tmp_path / "out.safetensors")
    r = CliRunner().invoke(main, ["compose", f"{pa}:0.7", f"{pb}:0.3", "--rank", "2", "-o", out])
    assert r.exit_code == 0, r.output
    assert "retained" in r.stdout and "4+6" in r.stdout and "wrote" in r.stderr
    assert {m.rank for m in load_adapter(out).modules.values()} == {2}
    r = CliRunner().invoke(main, ["compose", pa, pb, "--fro", "0.9"])  # preview, no output
    assert r.exit_code == 0 and "truncated" in r.stdout


def test_cli_compose_errors(files, tmp_path):
    pa, pb, _, _ = files
    runner = CliRunner()
    r = runner.invoke(main, ["compose", f"{pa}:nan"])
    assert r.exit_code == 2 and "finite" in r.output
    r = runner.invoke(main, ["compose", str(tmp_path / "missing.safetensors:0.5")])
    assert r.exit_code == 2 and "missing.safetensors" in r.output and "weight 0.5" in r.output
    r = runner.invoke(main, ["compose", pa, "--rank", "2", "--fro", "0.5"])
    assert r.exit_code == 2
    r = runner.invoke(main, ["compose"])
    assert r.exit_code == 2
    r = runner.invoke(main, ["compose", pa, pb, "-o", pa, "--overwrite"])
    assert r.exit_code == 1 and "[LT502]" in r.stderr
    other = tmp_path / "other.safetensors"
    save_adapter(adapter(module("q", 16, 13, 2, 2.0)), other)
    r = runner.invoke(main, ["compose", pa, str(other)])
    assert r.exit_code == 1 and "[LT532]" in r.stderr and "Traceback" not in r.output


def test_cli_compare(files):
    pa, pb, _, _ = files
    r = CliRunner().invoke(main, ["compare", pa, pb, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["summary"]["only_a"] == ["only_a"] and report["a"] == pa
    r = CliRunner().invoke(main, ["compare", pa, pb])
    assert r.exit_code == 0 and "cosine" in r.stdout and "only in B" in r.stdout


def test_cli_on_shipped_examples(tmp_path, examples_dir):
    a = os.path.join(examples_dir, "adapter.safetensors")
    b = os.path.join(examples_dir, "adapter_style.safetensors")
    if not (os.path.exists(a) and os.path.exists(b)):
        pytest.skip("examples not generated")
    runner = CliRunner()
    for args in (["resize", a, "--rank", "4", "-o", str(tmp_path / "r.safetensors")],
                 ["compose", a, f"{b}:0.5", "--rank", "8", "-o", str(tmp_path / "c.safetensors")],
                 ["compare", a, b]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, (args, r.output)
