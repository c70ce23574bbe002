"""Merges into FP8 safetensors bases (spec/merge.md section 4.6), against independent
computations: torch's float8 casts (the rounding oracle, on quotients that are float32
values, so torch's float64 -> float32 -> float8 route rounds once), exact rationals
(``fractions``) for quotients that are not, and numpy float64 deltas of the stored factors.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from _merge_helpers import check_rounded_once
from safetensors.torch import load_file
from safetensors.torch import save_file

from loratool.adapter import save_adapter
from loratool.errors import CheckpointError
from loratool.model import Adapter, LoraModule
from loratool.ops.merge import fp8_base as F
from loratool.ops.merge import merge
from loratool.rules import FP8_MERGE_CODES

TORCH = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}


def np_load(path: str) -> dict:
    """name -> the stored bytes as a uint8 array (numpy has no bf16 nor float8)."""
    return {k: v.contiguous().view(torch.uint8).numpy() for k, v in load_file(path).items()}


def _values(dt: str) -> np.ndarray:
    """torch's value of every code (its float8 -> float64 conversion is exact)."""
    return torch.arange(256, dtype=torch.uint8).view(TORCH[dt]).to(torch.float64).numpy()


def _torch_codes(q: np.ndarray, dt: str) -> np.ndarray:
    """Saturating cast (clamp, then torch's round to nearest even) of float32-exact ``q``."""
    q = np.clip(np.asarray(q, np.float64), -MAX[dt], MAX[dt])
    assert np.array_equal(q.astype(np.float32).astype(np.float64), q)
    return torch.from_numpy(q).to(TORCH[dt]).view(torch.uint8).numpy()


@pytest.mark.parametrize("dt", ["F8_E4M3", "F8_E5M2"])
def test_decode_table_is_torchs(dt):
    ours, ref = F._TABLES[dt], _values(dt)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.array_equal(ours[~np.isnan(ref)], ref[~np.isnan(ref)])


@pytest.mark.parametrize("dt", ["F8_E4M3", "F8_E5M2"])
def test_encode_equals_torch_cast_with_scales(dt):
    rng = np.random.default_rng(1)
    n = 40000
    # quotients over the whole range: subnormals, exact midpoints (ties), beyond the max
    q = rng.standard_normal(n) * np.exp2(rng.integers(-20, 18, n))
    vals = _values(dt)
    finite = np.sort(np.unique(np.abs(vals[np.isfinite(vals)])))
    mids = (finite[:-1] + finite[1:]) / 2
    q[:2000] = rng.choice(mids, 2000) * rng.choice([-1, 1], 2000)
    q[2000:2100] = rng.choice([-1, 1], 100) * (MAX[dt] + rng.uniform(0, 3 * MAX[dt], 100))
    q[2100] = -0.0
    q = q.astype(np.float32).astype(np.float64)
    s = rng.uniform(1e-4, 3, n).astype(np.float32).astype(np.float64)
    x = q * s  # exact: 24 + 24 significant bits
    codes, saturated = F.encode(x, dt, s)
    assert np.array_equal(codes, _torch_codes(q, dt))
    # saturated: the nearest value with an unbounded exponent lies beyond the max
    # (E5M2: torch's unclamped cast gives Inf exactly there; E4M3 has no Inf: above 464)
    if dt == "F8_E5M2":
        want = int(torch.from_numpy(q).to(TORCH[dt]).to(torch.float64).isinf().sum())
    else:
        want = int((np.abs(q) > 464.0).sum())
    assert saturated == want > 0


def test_encode_rounds_the_real_quotient():
    # x / s is not a float32 (nor, in general, a float64): compare with exact rationals
    rng = np.random.default_rng(2)
    dt = "F8_E4M3"
    vals = _values(dt)
    finite = np.sort(np.unique(np.abs(vals[np.isfinite(vals)])))
    mids = (finite[:-1] + finite[1:]) / 2
    n = 600
    s = rng.uniform(0.01, 10, n).astype(np.float32).astype(np.float64)
    q = rng.choice(mids, n)
    # a hair off each midpoint: below, above, or exactly on it
    x = q * s * (1 + rng.choice([-1, 0, 1], n) * 2.0 ** -50)
    codes, _ = F.encode(x, dt, s)
    for xi, si, c in zip(x, s, codes):
        r = Fraction(xi) / Fraction(si)
        dist = [(abs(Fraction(v) - r), k) for k, v in enumerate(vals[:0x7F])]
        best = min(d for d, _ in dist)
        cands = [k for d, k in dist if d == best]
        want = min(cands, key=lambda k: k % 2) if len(cands) > 1 else cands[0]
        assert c == want, (xi, si, c, want)


# --- merges -------------------------------------------------------------------------------


def _quantize_blocks(W: np.ndarray, dt: str, block=128):
    """transformers' FineGrainedFP8 quantization: scale_inv = amax(tile) / max per tile."""
    R, C = -(-W.shape[0] // block), -(-W.shape[1] // block)
    s = np.zeros((R, C), np.float32)
    for i in range(R):
        for j in range(C):
            tile = W[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s[i, j] = np.abs(tile).max() / MAX[dt]
    full = np.repeat(np.repeat(s.astype(np.float64), block, 0)[:W.shape[0]], block,
                     1)[:, :W.shape[1]]
    codes = torch.from_numpy(W / full).to(TORCH[dt]).view(torch.uint8)
    return codes, torch.from_numpy(s), full


def _module(name, out, inn, r, g, mag):
    return LoraModule(name, "linear", "out_in", torch.randn(r, inn, generator=g) * mag,
                      torch.randn(out, r, generator=g) * mag, 2.0 * r)


def _base(tmp_path, seed=0, mag=0.05):
    """A base with block-scaled E4M3 (300 x 200: blocks of 128 and partial ones), per-row
    scaled E4M3 (compressed-tensors), unscaled E5M2, BF16, untouched FP8; and an adapter."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    t = {}
    Wa = rng.standard_normal((300, 200)) * 0.02
    ca, sa, fa = _quantize_blocks(Wa, "F8_E4M3")
    t["a.weight"], t["a.weight_scale_inv"] = ca.view(torch.float8_e4m3fn), sa
    Wc = rng.standard_normal((40, 24))
    sc = (np.abs(Wc).max(axis=1, keepdims=True) / 448).astype(np.float32)
    t["c.weight"] = torch.from_numpy(Wc / sc.astype(np.float64)).to(torch.float8_e4m3fn)
    t["c.weight_scale"] = torch.from_numpy(sc)
    t["c.input_scale"] = torch.tensor([0.5])
    t["b.weight"] = torch.from_numpy(rng.standard_normal((64, 48))).to(torch.float8_e5m2)
    t["d.weight"] = torch.from_numpy(rng.standard_normal((16, 8))).to(torch.bfloat16)
    Wu = rng.standard_normal((130, 8)) * 0.1
    cu, su, _ = _quantize_blocks(Wu, "F8_E4M3")
    t["u.weight"], t["u.weight_scale_inv"] = cu.view(torch.float8_e4m3fn), su
    base = str(tmp_path / "base.safetensors")
    save_file(t, base)
    mods = {n: _module(n, o, i, 4, g, mag) for n, o, i in
            (("a", 300, 200), ("b", 64, 48), ("c", 40, 24), ("d", 16, 8))}
    ad = Adapter(modules=mods, alpha=8.0)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(ad, path)
    scales = {"a": fa, "c": np.repeat(sc.astype(np.float64), 24, 1), "b": None}
    return base, path, ad, t, scales


def _delta(m: LoraModule, scale: float = 1.0) -> np.ndarray:
    return scale * m.scale * (m.B.double().numpy() @ m.A.double().numpy())


def _deq(t, name, s):
    v = t[name].view(torch.uint8).numpy()
    return _values(str({torch.float8_e4m3fn: "F8_E4M3",
                        torch.float8_e5m2: "F8_E5M2"}[t[name].dtype]))[v] * (1 if s is None
                                                                             else s)


def _check_fp8(got_codes, value, bound, s, dt, name):
    """got == the saturating cast of value / s, except where value / s lies so close to a
    rounding boundary that float64 evaluation order or the oracle's float32 step matter."""
    q = value / (1.0 if s is None else s)
    band = np.abs(bound / (1.0 if s is None else s)) + np.abs(q) * 2.0 ** -22
    ref, a, b = (_ref_codes(x, dt) for x in (q, q - band, q + band))
    clear = a == b
    assert np.array_equal(got_codes[clear], ref[clear]), name
    assert np.all((got_codes == a) | (got_codes == b)), name
    return int((~clear).sum())


def _ref_codes(q, dt):
    """torch's saturating cast of the float32 nearest to ``q``."""
    q32 = np.clip(q, -MAX[dt], MAX[dt]).astype(np.float32).astype(np.float64)
    return torch.from_numpy(q32).to(TORCH[dt]).view(torch.uint8).numpy()


def test_merge_keep_requantizes_with_the_same_scales(tmp_path):
    base, path, ad, t, scales = _base(tmp_path)
    out = str(tmp_path / "out.safetensors")
    rep = merge(base, [(path, 0.7)], output=out, device="cpu")
    assert {k: v.dtype for k, v in load_file(out).items()} == \
        {k: v.dtype for k, v in load_file(base).items()}
    got = np_load(out)
    src = np_load(base)
    # scales, the activation scale and the untouched FP8 weight: byte for byte
    for k in ("a.weight_scale_inv", "c.weight_scale", "c.input_scale", "u.weight",
              "u.weight_scale_inv"):
        assert got[k].tobytes() == src[k].tobytes(), k
    close = 0
    rows = {r["name"]: r for r in rep.fp8["tensors"]}
    sums = np.zeros(3)
    for n, dt in (("a", "F8_E4M3"), ("b", "F8_E5M2"), ("c", "F8_E4M3")):
        s = scales[n]
        W = _deq(t, n + ".weight", s)
        d = _delta(ad.modules[n], 0.7)
        bound = 2.0 ** -50 * (np.abs(W) + np.abs(d) * 8)
        codes = got[n + ".weight"].reshape(W.shape)
        close += _check_fp8(codes, W + d, bound, s, dt, n)
        # the retained delta, from the written file
        eff = _values(dt)[codes] * (1 if s is None else s) - W
        r = rows[n + ".weight"]
        assert r["base_type"] == r["out_type"] == dt
        assert r["kept"] == pytest.approx(np.vdot(eff, d) / np.vdot(d, d), rel=1e-9)
        assert r["retained"] == pytest.approx(np.linalg.norm(eff) / np.linalg.norm(d),
                                              rel=1e-9)
        assert r["rel_error"] == pytest.approx(np.linalg.norm(eff - d) / np.linalg.norm(d),
                                               rel=1e-9)
        sums += (np.vdot(d, d), np.vdot(eff, d), 0)
    assert close <= 3
    assert rep.fp8["kept"] == pytest.approx(sums[1] / sums[0], rel=1e-9)
    assert set(rows) == {"a.weight", "b.weight", "c.weight"}  # d is BF16: a float merge
    assert rep.tensors_merged == 4
    assert any("kept" in n and "fp8" in n for n in rep.notes)


def test_saturation_is_counted_and_reported(tmp_path):
    # a large delta pushes block maxima (exactly 448 * scale) beyond the largest value
    base, path, ad, t, scales = _base(tmp_path, seed=3, mag=1.0)
    out = str(tmp_path / "out.safetensors")
    rep = merge(base, [(path, 1.0)], output=out, device="cpu")
    got = np_load(out)
    n = "a"
    W = _deq(t, "a.weight", scales[n])
    v = (W + _delta(ad.modules[n])) / scales[n]
    row = next(r for r in rep.fp8["tensors"] if r["name"] == "a.weight")
    assert row["saturated"] == int((np.abs(v) > 464).sum()) > 0
    codes = got["a.weight"].reshape(W.shape)
    assert np.all(np.abs(_values("F8_E4M3")[codes][np.abs(v) > 448]) == 448)
    assert rep.fp8["saturated"] == sum(r["saturated"] for r in rep.fp8["tensors"])
    assert any("saturated" in note for note in rep.notes)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_merge_dequantized_output(tmp_path, dtype, torch_dtype):
    base, path, ad, t, scales = _base(tmp_path)
    out = str(tmp_path / "out.safetensors")
    rep = merge(base, [(path, 0.7)], output=out, device="cpu", dtype=dtype)
    got = load_file(out)
    # scales are gone, the activation scale is not a weight scale and stays
    assert set(got) == {"a.weight", "b.weight", "c.weight", "c.input_scale", "d.weight",
                        "u.weight"}
    for n in ("a", "b", "c"):
        W = _deq(t, n + ".weight", scales[n])
        value = W + _delta(ad.modules[n], 0.7)
        bound = 2.0 ** -50 * (np.abs(W) + np.abs(value))
        assert got[n + ".weight"].dtype == torch_dtype
        from _merge_helpers import bits
        check_rounded_once(bits(got[n + ".weight"]), value, bound, torch_dtype, n)
    # untouched FP8 weight: dequantized exactly, rounded once
    Wu = _deq(t, "u.weight", np.repeat(t["u.weight_scale_inv"].double().numpy(), 128, 0)[:130])
    from _merge_helpers import bits, ref_round
    assert np.array_equal(bits(got["u.weight"]), ref_round(Wu, torch_dtype))
    assert {r["out_type"] for r in rep.fp8["tensors"]} == {dtype.upper().replace("FP", "F")}
    assert any("scale tensors are not in the output" in n for n in rep.notes)


def test_sharded_directory(tmp_path):
    base, path, ad, t, scales = _base(tmp_path)
    d = tmp_path / "model"
    d.mkdir()
    names = sorted(t)
    half = {"model-00001-of-00002.safetensors": names[:4],
            "model-00002-of-00002.safetensors": names[4:]}
    for shard, ns in half.items():
        save_file({n: t[n] for n in ns}, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, ns in half.items() for n in ns}}))
    cfg = {"model_type": "llama", "quantization_config": {"quant_method": "fp8",
                                                          "weight_block_size": [128, 128]}}
    (d / "config.json").write_text(json.dumps(cfg))
    keep = merge(str(d), [(path, 0.7)], output=str(tmp_path / "keep"), device="cpu")
    single = merge(base, [(path, 0.7)], output=str(tmp_path / "one.safetensors"),
                   device="cpu")
    one = np_load(str(tmp_path / "one.safetensors"))
    for shard, ns in half.items():
        part = np_load(str(tmp_path / "keep" / shard))
        for n in ns:
            assert part[n].tobytes() == one[n].tobytes(), n
    assert keep.fp8["kept"] == single.fp8["kept"]
    assert json.loads((tmp_path / "keep" / "config.json").read_text()) == cfg
    merge(str(d), [(path, 0.7)], output=str(tmp_path / "bf16"), device="cpu", dtype="bf16")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert not any(k.endswith(("_scale_inv", "weight_scale")) for k in index["weight_map"])
    assert "c.input_scale" in index["weight_map"]
    cfg_out = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg_out == {"model_type": "llama"}


def test_sharded_scales_read_once_per_shard(tmp_path, monkeypatch):
    # the scales of a sharded base come from the job's listing: no header parsed again, one
    # open file per shard, and a scale may lie in another shard than its weight
    from loratool import stfile
    from loratool.checkpoint import list_tensors
    base, path, ad, t, scales = _base(tmp_path)
    d = tmp_path / "model"
    d.mkdir()
    half = {"model-00001-of-00002.safetensors": ["a.weight", "c.weight_scale", "d.weight",
                                                 "u.weight_scale_inv"],
            "model-00002-of-00002.safetensors": ["a.weight_scale_inv", "b.weight",
                                                 "c.input_scale", "c.weight", "u.weight"]}
    for shard, ns in half.items():
        save_file({n: t[n] for n in ns}, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, ns in half.items() for n in ns}}))
    listed = list_tensors(str(d))
    opened = []
    monkeypatch.setattr(F, "open", lambda p, *a: opened.append(p) or open(p, *a),
                        raising=False)

    def parse(*args, **kw):
        raise AssertionError("a header parsed again")
    monkeypatch.setattr(stfile, "parse_header_bytes", parse)
    fp8 = F.prepare({n: (b.dtype, b.shape) for n, b in listed.items()}, "keep", None, listed)
    monkeypatch.undo()
    assert sorted(opened) == sorted(str(d / s) for s in half)
    assert fp8.scale_names == {"a.weight": "a.weight_scale_inv", "c.weight": "c.weight_scale",
                               "u.weight": "u.weight_scale_inv"}
    # the values: those the stored scales hold (a: 128 x 128 blocks, c: one per row)
    for n, width in (("a", 200), ("c", 24)):
        got = fp8.scale_rows(n + ".weight", 0, len(scales[n]), width)
        assert np.array_equal(np.broadcast_to(got, scales[n].shape), scales[n]), n
    merge(str(d), [(path, 0.7)], output=str(tmp_path / "keep"), device="cpu")
    merge(base, [(path, 0.7)], output=str(tmp_path / "one.safetensors"), device="cpu")
    one = np_load(str(tmp_path / "one.safetensors"))
    for shard, ns in half.items():
        part = np_load(str(tmp_path / "keep" / shard))
        assert all(part[n].tobytes() == one[n].tobytes() for n in ns), shard


def test_bad_scales_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    ad = Adapter(modules={"a": _module("a", 300, 200, 2, g, 0.1)}, alpha=4.0)
    path = str(tmp_path / "ad.safetensors")
    save_adapter(ad, path)
    w = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    for scale, why in ((torch.ones(2, 2), "cannot be inferred"),
                       (torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]), "zero"),
                       (torch.ones(3, 2, dtype=torch.int32), "not one of")):
        base = str(tmp_path / "b.safetensors")
        save_file({"a.weight": w, "a.weight_scale_inv": scale}, base)
        with pytest.raises(CheckpointError) as e:
            merge(base, [path], output=str(tmp_path / "o.safetensors"), device="cpu",
                  overwrite=True)
        assert e.value.code == "LT440" and why in str(e.value), e.value
    save_file({"a.weight": w, "a.weight_scale_inv": torch.ones(3, 2),
               "a.weight_scale": torch.ones(1)}, base)
    with pytest.raises(CheckpointError, match="both"):
        merge(base, [path], output=str(tmp_path / "o.safetensors"), device="cpu")


def test_fp8_codes_are_in_rules_and_spec():
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "spec", "merge.md"), encoding="utf-8").read()
    for code, meaning in FP8_MERGE_CODES.items():
        assert f"| {code} | {meaning} |" in text, code
    assert F.CODE in FP8_MERGE_CODES


def test_cli_reports_fp8(tmp_path):
    from click.testing import CliRunner

    from loratool.cli import main
    base, path, ad, t, scales = _base(tmp_path)
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(main, ["merge", base, path, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert {x["name"] for x in rep["fp8"]["tensors"]} == {"a.weight", "b.weight", "c.weight"}
    r = CliRunner().invoke(main, ["merge", base, path, "-o", str(out), "--overwrite"])
    assert r.exit_code == 0 and "fp8:" in r.output and "kept" in r.output, r.output


def test_encode_in_row_chunks_gives_the_same_bytes(tmp_path, monkeypatch):
    base, path, ad, t, scales = _base(tmp_path, seed=3, mag=1.0)  # saturating elements too
    one = merge(base, [path], output=str(tmp_path / "one.safetensors"), device="cpu")
    monkeypatch.setattr(F, "_CHUNK", 700)  # a.weight: rows of 200, chunks of 3 rows
    many = merge(base, [path], output=str(tmp_path / "many.safetensors"), device="cpu")
    assert open(tmp_path / "one.safetensors", "rb").read() == \
        open(tmp_path / "many.safetensors", "rb").read()
    assert one.fp8 == many.fp8


def test_ue8m0_scales_equal_their_float32_values(tmp_path):
    # UE8M0 scales (F8_E8M0: 2^(e - 127)) merge exactly like F32 scales of the same value
    rng = np.random.default_rng(4)
    g = torch.Generator().manual_seed(4)
    e = rng.integers(110, 125, (2, 2)).astype(np.uint8)
    codes = torch.from_numpy(rng.integers(0, 0x7F, (200, 130)).astype(np.uint8)) \
        .view(torch.float8_e4m3fn)
    ad = Adapter(modules={"a": _module("a", 200, 130, 2, g, 0.02)}, alpha=4.0)
    path = str(tmp_path / "ad.safetensors")
    save_adapter(ad, path)
    outs = []
    for kind, scale in (("e8m0", torch.from_numpy(e).view(torch.float8_e8m0fnu)),
                        ("f32", torch.from_numpy(np.exp2(e.astype(np.float64) - 127)).float())):
        base = str(tmp_path / f"{kind}.safetensors")
        save_file({"a.weight": codes, "a.weight_scale_inv": scale}, base)
        out = str(tmp_path / f"{kind}-out.safetensors")
        outs.append((merge(base, [path], output=out, device="cpu").fp8, np_load(out)))
    assert outs[0][1]["a.weight"].tobytes() == outs[1][1]["a.weight"].tobytes()
    assert outs[0][0] == outs[1][0] and outs[0][0]["kept"] > 0
