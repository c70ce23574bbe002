"""LyCORIS kinds of the loratool format (format 1.2, spec/adapter-format.md section 4.2) and the
plain-LoRA options of ``convert`` (spec/lycoris.md section 5).

LyCORIS -> loratool -> LyCORIS must give back every tensor (name, dtype, shape, bytes) and every
metadata key; merging the loratool file must give the same bytes as merging the LyCORIS file.
lycoris-lora 4.1.3 builds the modules (``build`` of test_lycoris_io); a hypothesis test draws
LyCORIS state dicts of every family directly. Truncation is checked against a dense float64
SVD of the LyCORIS delta, rounding against ``Tensor.to``.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool import lycoris as ly
from loratool.adapter import load_adapter, read_adapter_info
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.interop import detect_format
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge
from loratool.ops.validate import validate
from test_lycoris_io import CASES, DORA, LohaModule, LokrModule, build

ALL = [(c[0], c[1], c[2]) for c in CASES] + list(DORA)


def _tensors_and_meta(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8))
        for k in a)


def _round_trip(src, tmp_path, **options):
    native, back = tmp_path / "native.safetensors", tmp_path / "back.safetensors"
    convert(src, str(native), to="loratool", overwrite=True, **options)
    convert(str(native), str(back), to="lycoris", overwrite=True)
    return str(native), str(back)


@pytest.mark.parametrize("case", ALL, ids=[c[0] for c in ALL])
def test_lycoris_loratool_lycoris_is_bit_exact_and_merges_alike(case, tmp_path):
    path, base, _ = build(tmp_path, case[1], case[2])
    native, back = _round_trip(path, tmp_path)
    (ta, ma), (tb, mb) = _tensors_and_meta(path), _tensors_and_meta(back)
    assert _same_bits(ta, tb) and ma == mb
    assert validate(native).ok and not validate(native).files[0].findings
    meta = _tensors_and_meta(native)[1]
    assert meta["loratool.format_version"] == "1.2"
    assert meta["ss_network_module"] == "lycoris.kohya"  # other tools' keys kept
    records = json.loads(meta["loratool.modules"])
    family = {"locon": "locon", "loha": "loha", "lokr": "lokr", "full": "full"}
    assert {r["kind"] for r in records.values()} <= set(family)
    # inspect says the same of both files (the source format aside)
    rows = {r["name"]: r for r in inspect(path)["modules"]}
    for r in inspect(native)["modules"]:
        assert r["lycoris"] == rows[r["name"]]["lycoris"]
    m1, m2 = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    merge(base, [path], output=str(m1), device="cpu")
    merge(base, [native], output=str(m2), device="cpu")
    assert _same_bits(load_file(m1), load_file(m2))
    if case[0] in ("loha", "lokr-dora"):  # one file's merge is the other's to unmerge
        from loratool.ops.merge import unmerge
        if "dora" in case[0]:
            with pytest.raises(LoraToolError) as e:
                unmerge(str(m1), [native], output=str(tmp_path / "u.safetensors"),
                        device="cpu")
            assert e.value.code == "LT414"
        else:
            rep = unmerge(str(m1), [native], output=str(tmp_path / "u.safetensors"),
                          device="cpu")
            assert not any("forced" in n for n in rep.notes)  # the merge record matched
            u, w = load_file(tmp_path / "u.safetensors"), load_file(base)
            assert all(torch.allclose(u[k], w[k], rtol=0, atol=1e-12) for k in w)


def test_native_load_reads_its_header_once_and_groups_by_module(tmp_path, monkeypatch):
    from loratool.interop import native as N
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0, use_tucker=True))
    native, _ = _round_trip(path, tmp_path, base=base)
    calls, real = [], N.read_header
    monkeypatch.setattr(N, "read_header", lambda p, **kw: calls.append(p) or real(p, **kw))
    ad = load_adapter(native)
    assert calls == [native]
    # each module got its own tensors, every one of them: written back, the file's tensors
    assert len(ad.modules) == 2 and _same_bits(N.canonical_tensors(ad), load_file(native))


def test_shape_from_base_generic_names_and_half_dtypes(tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0, use_tucker=False))
    sd = {k.replace("lora_unet_", "lycoris_unet_"): (v.to(torch.bfloat16) if "hada" in k else
                                                      v.half()) for k, v in load_file(path).items()}
    src = tmp_path / "generic.safetensors"
    save_file(sd, src)  # no metadata at all
    native, back = _round_trip(str(src), tmp_path, base=base)
    (ta, ma), (tb, mb) = _tensors_and_meta(str(src)), _tensors_and_meta(back)
    assert _same_bits(ta, tb) and ma == mb
    rec = json.loads(_tensors_and_meta(native)[1]["loratool.modules"])["unet.conv"]
    assert rec["shape"] == [24, 32, 3, 3] and rec["lycoris"]["name"] == "lycoris_unet_conv"
    # without the base the conv shape is unknown: the merge takes it from the base tensor
    native2, _ = _round_trip(path, tmp_path)
    assert "shape" not in json.loads(_tensors_and_meta(native2)[1]["loratool.modules"])[
        "unet.conv"]
    m1, m2 = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    merge(base, [path], output=str(m1), device="cpu")
    merge(base, [native2], output=str(m2), device="cpu", overwrite=True)
    assert _same_bits(load_file(m1), load_file(m2))


def test_plain_lora_form_on_request(tmp_path):
    path, base, _ = build(tmp_path, LokrModule, dict(lora_dim=2, alpha=1.0))
    out = tmp_path / "plain.safetensors"
    rep = convert(path, str(out), to="loratool", lycoris="lora", base=base)
    assert any("exact plain-LoRA form" in n for n in rep.notes)
    meta = _tensors_and_meta(str(out))[1]
    assert meta["loratool.format_version"] == "1.0"
    assert {r["kind"] for r in json.loads(meta["loratool.modules"]).values()} == {
        "linear", "conv"}
    got, want = load_adapter(str(out)), load_adapter(path, base=base)
    for name, m in want.modules.items():  # the very factors the LyCORIS reader computes
        g = got.modules[name]
        assert torch.equal(g.A, m.A) and torch.equal(g.B, m.B) and g.alpha == m.alpha
    # DoRA and full diffs have no plain form: refused with the reason
    for cls, kw in ((DORA[0][1], DORA[0][2]), (CASES[5][1], CASES[5][2])):
        p, _, _ = build(tmp_path, cls, kw, tag=cls.__name__)
        with pytest.raises(LoraToolError) as e:
            convert(p, str(tmp_path / "x.safetensors"), to="loratool", lycoris="lora",
                    overwrite=True)
        assert e.value.code == "LT243"


def test_cli_lycoris_option(tmp_path):
    path, _, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    for mode, version in (("native", "1.2"), ("lora", "1.0")):
        out = tmp_path / f"{mode}.safetensors"
        r = CliRunner().invoke(main, ["convert", path, "-o", str(out), "--lycoris", mode])
        assert r.exit_code == 0, r.output
        assert _tensors_and_meta(str(out))[1]["loratool.format_version"] == version
    r = CliRunner().invoke(main, ["convert", path, "-o", str(tmp_path / "z"), "--lycoris", "x"])
    assert r.exit_code == 2


# --- validation of native modules ---------------------------------------------------------------

def _native(tmp_path):
    path, _, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    native, _ = _round_trip(path, tmp_path)
    return _tensors_and_meta(native)


@pytest.mark.parametrize("change, code", [
    (lambda t, m: m.update({"loratool.format_version": "1.1"}), "LT217"),
    (lambda t, m: _record(m, "unet.fc", layout="in_out"), "LT218"),
    (lambda t, m: _record(m, "unet.fc", shape=[48, 0]), "LT218"),
    (lambda t, m: _record(m, "unet.fc", alpha=2.0), "LT218"),
    (lambda t, m: _record(m, "unet.fc", kind="lokr"), "LT219"),
    (lambda t, m: t.update({"unet.fc.lora_up": torch.zeros(48, 3)}), "LT219"),
    (lambda t, m: t.pop("unet.fc.hada_w2_a"), "LT232"),
    (lambda t, m: t.update({"unet.fc.hada_w2_b": t["unet.fc.hada_w2_b"][:2].clone()}),
     "LT234"),
    (lambda t, m: _record(m, "unet.fc", shape=[48, 65]), "LT241"),
    (lambda t, m: t.update({"unet.fc.alpha": torch.tensor([1.0, 2.0])}), "LT238"),
    (lambda t, m: t.update({"unet.fc.alpha": torch.tensor(float("inf"))}), "LT238"),
])
def test_each_native_rule_has_its_code(tmp_path, change, code):
    tensors, meta = _native(tmp_path)
    change(tensors, meta)
    meta.pop("loratool.tensor_hash")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    codes = {f.code for f in validate(str(bad)).files[0].findings if f.is_error}
    assert code in codes and codes <= {code, "LT209"}
    with pytest.raises(LoraToolError) as e:
        load_adapter(str(bad))
    assert e.value.code in {code, "LT209"}


def _record(meta, name, **fields):
    table = json.loads(meta["loratool.modules"])
    table[name].update(fields)
    meta["loratool.modules"] = json.dumps(table)


# --- hypothesis: any LyCORIS module, any dtype ----------------------------------------------

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def lycoris_module(draw):
    """(params, shape) of one module of a random family, layout and dtype."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    dt = draw(st.sampled_from(_DTYPES))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)
    family = draw(st.sampled_from(["locon", "loha", "lokr", "full"]))
    conv = draw(st.booleans())
    out, inn, k = draw(st.integers(2, 6)), draw(st.integers(2, 6)), (3, 3) if conv else ()
    r = draw(st.integers(1, 3))
    tucker = conv and draw(st.booleans())
    p = {}
    if family == "locon":
        p["lora_up.weight"] = rnd(out, r, *[1] * len(k))
        if tucker:
            p["lora_down.weight"] = rnd(r, inn, 1, 1)
            p["lora_mid.weight"] = rnd(r, r, *k)
        else:
            p["lora_down.weight"] = rnd(r, inn, *k)
    elif family == "loha":
        for i in (1, 2):
            if tucker:
                p[f"hada_w{i}_a"], p[f"hada_w{i}_b"] = rnd(r, out), rnd(r, inn)
                p[f"hada_t{i}"] = rnd(r, r, *k)
            else:
                p[f"hada_w{i}_a"], p[f"hada_w{i}_b"] = rnd(out, r), rnd(r, inn * 9 if conv
                                                                           else inn)
    elif family == "lokr":
        a, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        b, d = out, inn
        out, inn = a * b, c * d
        if draw(st.booleans()):
            p["lokr_w1"] = rnd(a, c)
        else:
            p["lokr_w1_a"], p["lokr_w1_b"] = rnd(a, r), rnd(r, c)
        w2 = draw(st.sampled_from(["full", "factored", "tucker"] if conv else
                                  ["full", "factored"]))
        if w2 == "full":
            p["lokr_w2"] = rnd(b, d, *k)
        elif w2 == "tucker":
            p["lokr_w2_a"], p["lokr_w2_b"], p["lokr_t2"] = rnd(r, b), rnd(r, d), rnd(r, r, *k)
        else:
            p["lokr_w2_a"], p["lokr_w2_b"] = rnd(b, r), rnd(r, d * 9 if conv else d)
    else:
        p["diff"] = rnd(out, inn, *k)
        if draw(st.booleans()):
            p["diff_b"] = rnd(out)
    if family != "full" and draw(st.booleans()):
        p["dora_scale"] = (rnd(out, 1, *[1] * len(k)) if draw(st.booleans())
                           else rnd(1, inn, *[1] * len(k))).float()
    if draw(st.booleans()):
        p["alpha"] = torch.tensor(draw(st.sampled_from([0.0, 1.0, 2.5, 16.0])),
                                  dtype=draw(st.sampled_from(_DTYPES)))
    return p, (out, inn, *k)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(mods=st.lists(lycoris_module(), min_size=1, max_size=3),
       meta=st.dictionaries(st.sampled_from(["ss_network_module", "ss_network_args",
                                             "modelspec.title"]), st.text(max_size=8)),
       with_base=st.booleans())
def test_any_lycoris_file_round_trips_bit_exactly(tmp_path, mods, meta, with_base):
    sd, base = {}, {}
    for i, (params, shape) in enumerate(mods):
        sd.update({f"lora_unet_m{i}.{p}": t.contiguous() for p, t in params.items()})
        base[f"unet.m{i}.weight"] = torch.zeros(shape)
    src, base_path = tmp_path / "src.safetensors", tmp_path / "base.safetensors"
    save_file(sd, src, metadata=meta or None)
    save_file(base, base_path)
    assume(detect_format(str(src)) == "lycoris")  # plain LoCon only: a kohya file
    options = {"base": str(base_path)} if with_base else {}
    native, back = _round_trip(str(src), tmp_path, **options)
    (ta, ma), (tb, mb) = _tensors_and_meta(str(src)), _tensors_and_meta(back)
    assert _same_bits(ta, tb) and (ma or {}) == (mb or {})
    assert validate(native).ok


# --- convert to plain LoRA: resize's rank rules and --dtype ------------------------------------

def _records(path, base_shapes):
    return {n: ly.parse_module(n, p, shape=base_shapes[n]) for n, p in
            ly.split_state_dict(load_file(path)).items()}


SHAPES = {"lora_unet_fc": (48, 64), "lora_unet_conv": (24, 32, 3, 3)}


@pytest.mark.parametrize("rule", [{"sv_ratio": 3.0}, {"cumulative": 0.6}])
def test_sv_ratio_and_cumulative_truncate_as_resize_rules(rule, tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    out = tmp_path / "k.safetensors"
    convert(path, str(out), to="kohya", base=base, **rule)
    got = ly.split_state_dict(load_file(out))
    for name, rec in _records(path, SHAPES).items():
        D = ly.delta(rec).reshape(rec.shape[0], -1)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        if "sv_ratio" in rule:
            k = int((S >= S[0] / rule["sv_ratio"]).sum())
        else:
            c = torch.cumsum(S, 0)
            k = int((c < rule["cumulative"] * c[-1]).sum()) + 1
        assert 1 <= k < 9
        p = got[name]
        assert p["lora_down.weight"].shape[0] == k
        B = p["lora_up.weight"].reshape(rec.shape[0], k).double()
        A = p["lora_down.weight"].reshape(k, -1).double()
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]  # Eckart-Young
        assert float(torch.linalg.vector_norm(B @ A * float(p["alpha"]) / k - best)) <= \
            1e-9 * float(S[0])


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32),
                                                 ("fp16", torch.float16),
                                                 ("bf16", torch.bfloat16)])
def test_dtype_of_converted_factors(dtype, torch_dtype, tmp_path):
    path, base, _ = build(tmp_path, LokrModule, dict(lora_dim=2, alpha=1.0))
    exact = load_adapter(path, base=base)
    assert all(m.A.dtype == torch.float64 for m in exact.modules.values())  # the default
    for to, out in (("kohya", tmp_path / "k.safetensors"), ("peft", tmp_path / "p"),
                    ("loratool", tmp_path / "l.safetensors")):
        rep = convert(path, str(out), to=to, base=base, dtype=dtype, lycoris="lora")
        assert any(f"rounded once to {dtype}" in n for n in rep.notes)
        got = load_adapter(str(out), base=base)
        for name, m in got.modules.items():
            want = exact.modules[name if name in exact.modules else "unet." + name]
            assert m.A.dtype == torch_dtype
            assert torch.equal(m.A, _nearest_even(want.A, torch_dtype))
            assert torch.equal(m.B.reshape(want.B.shape), _nearest_even(want.B, torch_dtype))


def _nearest_even(x: torch.Tensor, dtype) -> torch.Tensor:
    """float64 ``x`` rounded once to nearest-even ``dtype``, element by element in exact
    rational arithmetic (torch's float64 -> bf16/fp16 ``.to`` rounds twice)."""
    from fractions import Fraction
    bits_dtype = {torch.float32: torch.int32, torch.float16: torch.int16,
                  torch.bfloat16: torch.int16}[dtype]
    out = []
    for v in x.reshape(-1).tolist():
        guess = torch.tensor([v], dtype=torch.float64).to(dtype)
        b = int(guess.view(bits_dtype)[0])
        cands = [torch.tensor([b + d], dtype=bits_dtype).view(dtype) for d in (-1, 0, 1)]
        cands = [c for c in cands if torch.isfinite(c).all()]
        best = min(cands, key=lambda c: (abs(Fraction(float(c[0])) - Fraction(v)),
                                         int(c.view(bits_dtype)[0]) & 1))
        out.append(best)
    return torch.cat(out).reshape(x.shape)


def test_dtype_overflow_and_plain_sources_are_refused(tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    sd = {k: (v * 1e3 if "hada" in k else v) for k, v in load_file(path).items()}
    big = tmp_path / "big.safetensors"
    save_file(sd, big)
    with pytest.raises(LoraToolError) as e:
        convert(str(big), str(tmp_path / "k.safetensors"), to="kohya", dtype="fp16")
    assert e.value.code == "LT305" and "fp16" in e.value.message
    plain = tmp_path / "plain.safetensors"
    convert(path, str(plain), to="kohya")
    with pytest.raises(LoraToolError) as e:
        convert(str(plain), str(tmp_path / "p2.safetensors"), to="kohya", dtype="fp16")
    assert e.value.code == "LT304" and "--dtype" in e.value.message
    with pytest.raises(LoraToolError) as e:
        convert(path, str(tmp_path / "p3.safetensors"), to="kohya", sv_ratio=2.0, rank=3)
    assert e.value.code == "LT530"
    with pytest.raises(LoraToolError) as e:  # the native kinds keep LyCORIS's own dtypes
        convert(path, str(tmp_path / "p4.safetensors"), to="loratool", dtype="fp16")
    assert e.value.code == "LT304" and "--lycoris lora" in e.value.message


def test_cli_truncation_and_dtype(tmp_path):
    path, base, _ = build(tmp_path, LohaModule, dict(lora_dim=3, alpha=2.0))
    out = tmp_path / "k.safetensors"
    r = CliRunner().invoke(main, ["convert", path, "-o", str(out), "--to", "kohya", "--base",
                                  base, "--cumulative", "0.6", "--dtype", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any(n.startswith("truncated 2 LyCORIS") for n in notes)
    assert {t.dtype for k, t in load_file(out).items() if "alpha" not in k} == {torch.bfloat16}
    info = read_adapter_info(str(out))
    assert all(m.rank < 9 for m in info.modules.values())
