"""merge / unmerge: exact numerics against an independent float64 reference (spec/merge.md)."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from _merge_helpers import (NAMES, base_for, bits, check_rounded_once, mixed_adapter, ref_delta,
                            ref_merge, ref_round)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool import format as F
from loratool.adapter import save_adapter
from loratool.errors import CheckpointError, LoraToolError, OperationError
from loratool.model import Adapter, LoraModule
from loratool.tensors import round_once
from loratool.ops.merge import (adapter_identity, merge, parse_adapter_spec,
                                unmerge)
from loratool.ops.merge.job import Engines, run_with

DTYPES = list(NAMES.values())
FP32 = Engines(precision="fp32")  # the float32 torch engine (CUDA's), on the CPU
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def _write(tmp_path, base: dict, adapters, metadata=None):
    base_path = str(tmp_path / "base.safetensors")
    save_file(base, base_path, metadata=metadata or {"format": "pt"})
    paths = []
    for i, (ad, scale) in enumerate(adapters):
        p = str(tmp_path / f"adapter{i}.safetensors")
        save_adapter(ad, p, overwrite=True)
        paths.append((p, scale))
    return base_path, paths


def _assert_bits_equal(out: dict, ref: dict, dtype) -> None:
    """``ref`` from ``ref_merge(..., with_error=True)``: every merged tensor is the float64
    reference rounded once (spec/merge.md, "Numerics")."""
    close = total = 0
    for name, (value, bound) in ref.items():
        close += check_rounded_once(bits(out[name]), value, bound, out[name].dtype, name)
        total += value.size
    # Close calls are rare but not as rare as chance: scales like 0.7 = 7/10 make sums of
    # short binary fractions that land on rounding midpoints (see spec/merge.md).
    assert close <= max(2, total // 100)


# --- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=list(NAMES))
def test_merge_bit_identical_every_kind_several_adapters(tmp_path, dtype):
    a1 = mixed_adapter(1, bias=True)
    a2 = mixed_adapter(2, dtype=torch.bfloat16)
    base = base_for(a1, dtype)
    adapters = [(a1, 0.7), (a2, -1.3)]
    base_path, paths = _write(tmp_path, base, adapters, {"format": "pt", "other.key": "x"})
    report = merge(base_path, paths, device="cpu")
    out = load_file(report.output)
    _assert_bits_equal(out, ref_merge(base, adapters, with_error=True), dtype)
    # untouched tensors are byte-identical, metadata of other tools preserved
    for name in ("model.norm.weight", "step", "scalar", "unet.conv1x1.bias"):
        assert torch.equal(out[name], base[name])
    with safe_open(report.output, "pt") as f:
        meta = f.metadata()
    assert meta["other.key"] == "x" and meta["format"] == "pt"
    assert report.modules_merged == 12 and report.tensors_merged == 8  # 6 weights + 2 biases
    assert report.output == str(tmp_path / "base-merged.safetensors")
    assert report.precision == "fp64"


def test_rounding_helper_is_correct_where_torch_double_rounds():
    # torch's float64 -> bf16/fp16 goes through float32: x = 1 + 2^-8 + 2^-40 becomes 1.0
    # (a tie after the first rounding) although x is above the midpoint.
    x = torch.tensor([1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40)], dtype=torch.float64)
    assert x.to(torch.bfloat16).tolist() == [1.0, -1.0]
    assert round_once(x, torch.bfloat16).tolist() == [1 + 2**-7, -(1 + 2**-7)]
    y = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert y.to(torch.float16).tolist() == [1.0]
    assert round_once(y, torch.float16).tolist() == [1 + 2**-10]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_once_matches_reference_on_hard_values(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * 10
    grid = x.to(torch.float32).to(dtype).double()
    ulp = grid.abs() * EPS[dtype] * 2
    near = torch.cat([grid + ulp / 2, grid - ulp / 2,
                      grid + ulp / 2 + ulp * 1e-9 * torch.randn(20000, generator=g,
                                                                dtype=torch.float64),
                      grid + ulp / 2 * (1 - 2.0**-30)])
    special = torch.tensor([0.0, -0.0, 1e-300, -1e-300, 2.0**-140, 6e-8, 65519.9, 65520.0,
                            3.3961e38, -3.4e38, 1e300, math.inf, -math.inf],
                           dtype=torch.float64)
    v = torch.cat([x, near, special])
    got = bits(round_once(v, dtype))
    want = ref_round(v.numpy(), dtype)
    assert np.array_equal(got, want)


def test_reference_rounding_is_itself_exact():
    # The test oracle, checked with exact rational arithmetic on near-tie values: no bf16
    # neighbour of the chosen value is nearer, and a tie picks the even one.
    g = torch.Generator().manual_seed(4)
    b = (torch.randn(300, generator=g) * 100).to(torch.bfloat16).double()
    noise = 1 + 2.0**-35 * torch.randn(300, generator=g, dtype=torch.float64)
    x = torch.cat([b + b.abs() * 2.0**-8 * noise, b + b.abs() * 2.0**-8]).numpy()
    got = ref_round(x, torch.bfloat16)

    def value(pattern: int) -> Fraction:
        t = torch.tensor([pattern], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        return Fraction(t.double().item())

    for v, pattern in zip(x, got.astype(np.int64)):
        c = value(int(pattern))
        for nb in (int(pattern) - 1, int(pattern) + 1):
            d_c, d_nb = abs(c - Fraction(v)), abs(value(nb) - Fraction(v))
            assert d_c < d_nb or (d_c == d_nb and pattern % 2 == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(NAMES))
def test_near_cancellation_fp32_sum_is_wrong_ours_is_right(tmp_path, dtype):
    # delta = h + h * 2^-26 with h half an ulp of 1 in the storage dtype: the exact sum lies
    # just above the midpoint, so the right answer is 1 + 2h. float32 (24 bits) loses the
    # h * 2^-26 and lands on the tie, which rounds to even: 1.0; float64 keeps it.
    half = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    A = torch.tensor([[half], [half * 2.0**-26]], dtype=torch.float32)  # [r=2, in=1]
    B = torch.tensor([[1.0, 1.0]], dtype=torch.float32)  # [out=1, r=2]
    ad = Adapter(modules={"w": LoraModule("w", "linear", "out_in", A, B, 2.0)}, alpha=2.0)
    base = {"w.weight": torch.ones(1, 1, dtype=dtype)}
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    out = load_file(merge(base_path, paths, device="cpu").output)["w.weight"]
    assert out.item() == 1 + 2 * half
    fp32_path = (base["w.weight"].float() + (B @ A)).to(dtype)
    assert fp32_path.item() == 1.0  # the test has teeth: the float32 sum gets it wrong
    # the float32 path (the GPU engine, forced onto the CPU) rounds twice and says 1.0
    fast = run_with(FP32, "merge", base_path, paths, device="cpu",
                    output=str(tmp_path / "fast.safetensors"))
    assert load_file(fast.output)["w.weight"].item() == 1.0


def test_dora_merge_matches_reference(tmp_path):
    ad = mixed_adapter(5, dora=True, bias=True)
    plain = mixed_adapter(6)
    base = base_for(ad, torch.float32)
    adapters = [(plain, 0.5), (ad, 0.8)]  # a plain LoRA first, then DoRA over it
    base_path, paths = _write(tmp_path, base, adapters)
    report = merge(base_path, paths, device="cpu")
    out = load_file(report.output)
    ref = ref_merge(base, adapters)
    for name, value in ref.items():
        got = out[name].double().numpy()
        want = ref_round(value, torch.float32).view(np.float32).astype(np.float64)
        ulps = np.abs(got - want) / np.maximum(np.abs(want) * 2.0**-23, 2.0**-149)
        assert ulps.max() <= 1, name  # the norm's float64 summation order may differ
        assert (got != want).mean() < 1e-3, name
    assert report.adapters[1]["dora"] is True


def test_lora_bias_added_and_required(tmp_path):
    ad = mixed_adapter(7, bias=True)
    base = base_for(ad, torch.float32)
    base_path, paths = _write(tmp_path, base, [(ad, 2.0)])
    out = load_file(merge(base_path, paths, device="cpu").output)
    m = ad.modules["h.0.attn.c_attn"]
    want = base["h.0.attn.c_attn.bias"].double() + 2.0 * m.scale * m.bias.double()
    assert torch.equal(out["h.0.attn.c_attn.bias"], want.float())
    del base["h.0.attn.c_attn.bias"]
    base_path, paths = _write(tmp_path, base, [(ad, 2.0)])
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn.*no `h\.0\.attn\.c_attn"
                                              r"\.bias`") as e:
        merge(base_path, paths, device="cpu", overwrite=True)
    assert e.value.code == "LT411"


def test_dtype_option_rounds_once_and_converts_untouched(tmp_path):
    ad = mixed_adapter(8)
    base = base_for(ad, torch.float32)
    base["model.extra64"] = torch.randn(5, 7, dtype=torch.float64)
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    report = merge(base_path, paths, device="cpu", dtype="bf16")
    out = load_file(report.output)
    _assert_bits_equal(out, ref_merge(base, [(ad, 1.0)], with_error=True), torch.bfloat16)
    assert np.array_equal(bits(out["model.extra64"]),
                          ref_round(base["model.extra64"].numpy(), torch.bfloat16))
    assert out["model.norm.weight"].dtype == torch.bfloat16
    assert out["step"].dtype == torch.int64 and torch.equal(out["step"], base["step"])
    assert report.tensors_converted == 1 + 6 + 1 + 1  # norm, biases, extra64, scalar


def _fast_bound(exact: torch.Tensor, bound64, dtype, dora: bool) -> torch.Tensor:
    """spec/merge.md, "The float32 path": one ulp of the storage dtype plus the float32
    evaluation error (the float64 bound scaled by 2^29); DoRA rows 2^-18 relative."""
    e = exact.double().abs()
    ulp = torch.maximum(e * EPS[dtype] * 2, torch.tensor(TINY[dtype], dtype=torch.float64))
    extra = torch.from_numpy(bound64).reshape(e.shape) * 2.0**29
    if dora:
        extra = extra + e * 2.0**-18
    return ulp + extra


def test_fast_engine_within_fp32_rounding_of_exact(tmp_path):
    # The float32 engine (what CUDA runs) forced onto the CPU: same code path, checked against
    # the exact result within the bound of spec/merge.md.
    a1, a2 = mixed_adapter(9, dora=True, bias=True), mixed_adapter(10)
    dora = {n + ".weight" for n, m in a1.modules.items() if m.magnitude is not None}
    for dtype in DTYPES:
        base = base_for(a1, dtype)
        base_path, paths = _write(tmp_path, base, [(a1, 0.9), (a2, 0.4)])
        exact = load_file(merge(base_path, paths, device="cpu", overwrite=True).output)
        fast_report = run_with(FP32, "merge", base_path, paths, device="cpu", overwrite=True,
                               output=str(tmp_path / "fast.safetensors"))
        assert fast_report.precision == "fp32"
        fast = load_file(fast_report.output)
        ref = ref_merge(base, [(a1, 0.9), (a2, 0.4)], with_error=True)
        for name, (_, bound64) in ref.items():
            diff = (exact[name].double() - fast[name].double()).abs()
            tol = _fast_bound(exact[name], bound64, dtype, name in dora)
            assert bool((diff <= tol).all()), (dtype, name)
        for name, e in exact.items():
            if name not in ref:
                assert torch.equal(e, fast[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_matches_cpu(tmp_path):  # pragma: no cover - no GPU in CI
    a1 = mixed_adapter(11, dora=True, bias=True)
    dora = {n + ".weight" for n, m in a1.modules.items() if m.magnitude is not None}
    for dtype in DTYPES:
        base = base_for(a1, dtype)
        base_path, paths = _write(tmp_path, base, [(a1, 0.9)])
        cpu = load_file(merge(base_path, paths, device="cpu", overwrite=True).output)
        gpu_report = merge(base_path, paths, device="cuda", overwrite=True,
                           output=str(tmp_path / "gpu.safetensors"))
        assert gpu_report.precision == "fp32" and gpu_report.device == "cuda"
        gpu = load_file(gpu_report.output)
        for name, (_, bound64) in ref_merge(base, [(a1, 0.9)], with_error=True).items():
            diff = (cpu[name].double() - gpu[name].double()).abs()
            assert bool((diff <= _fast_bound(cpu[name], bound64, dtype, name in dora)).all())


# --- unmerge and provenance ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=list(NAMES))
def test_unmerge_round_trip_within_bound(tmp_path, dtype):
    a1, a2 = mixed_adapter(12, bias=True), mixed_adapter(13)
    base = base_for(a1, dtype)
    base_path, paths = _write(tmp_path, base, [(a1, 1.0), (a2, 0.25)])
    merged = merge(base_path, paths, device="cpu")
    back = unmerge(merged.output, paths, device="cpu")
    assert back.records == []
    with safe_open(back.output, "pt") as f:
        assert F.KEY_MERGED not in (f.metadata() or {})
    m_out, u_out = load_file(merged.output), load_file(back.output)
    for name, w in base.items():
        if not w.is_floating_point():
            continue
        W, M, U = w.double(), m_out[name].double(), u_out[name].double()
        bound = EPS[dtype] * (W.abs() + M.abs()) * 1.0001 + TINY[dtype]
        assert bool(((U - W).abs() <= bound).all()), name


def test_provenance_record_stacks_and_unmerge_checks_it(tmp_path):
    a1, a2 = mixed_adapter(14), mixed_adapter(15)
    base = base_for(a1)
    base_path, paths = _write(tmp_path, base, [(a1, 1.0), (a2, 0.5)])
    first = merge(base_path, [paths[0]], device="cpu")
    second = merge(first.output, [paths[1]], device="cpu")
    with safe_open(second.output, "pt") as f:
        records = json.loads(f.metadata()[F.KEY_MERGED])
    assert [r["adapters"][0]["identity"] for r in records] == [adapter_identity(a1),
                                                                adapter_identity(a2)]
    assert records[1]["adapters"][0]["scale"] == 0.5
    assert records[0]["loratool_version"] and records[0]["format_version"] == "1.0"
    # wrong scale: refused, with the recorded scale in the message
    with pytest.raises(CheckpointError, match=r"scale 0\.5, not 1\.0") as e:
        unmerge(second.output, [(paths[1][0], 1.0)], device="cpu")
    assert e.value.code == "LT413"
    # another adapter: refused
    a3 = mixed_adapter(16)
    p3 = str(tmp_path / "a3.safetensors")
    save_adapter(a3, p3)
    with pytest.raises(CheckpointError, match="not among the adapters merged"):
        unmerge(second.output, [p3], device="cpu")
    # no record at all: refused
    with pytest.raises(CheckpointError, match="no loratool.merged record"):
        unmerge(base_path, [paths[0]], device="cpu")
    # the older merge can be taken out first (deltas commute); the record shrinks
    out = unmerge(second.output, [paths[0]], device="cpu")
    assert [r["adapters"][0]["identity"] for r in out.records] == [adapter_identity(a2)]
    # --force subtracts anyway and records what it did
    forced = unmerge(second.output, [p3], device="cpu", force=True,
                     output=str(tmp_path / "forced.safetensors"))
    assert forced.records[-1]["op"] == "unmerge"
    assert forced.records[-1]["adapters"][0]["identity"] == adapter_identity(a3)
    assert forced.notes


def test_identity_depends_on_semantics_not_file(tmp_path):
    a = mixed_adapter(17)
    b = mixed_adapter(17)
    assert adapter_identity(a) == adapter_identity(b)
    m = b.modules["unet.conv1x1"]
    b.modules["unet.conv1x1"] = m.with_tensors(alpha=m.alpha * 2)
    assert adapter_identity(a) != adapter_identity(b)
    c = mixed_adapter(17)
    c.modules["unet.conv1x1"] = c.modules["unet.conv1x1"].with_tensors(layout="out_in",
                                                                       kind="linear")
    assert adapter_identity(a) != adapter_identity(c)


def test_unmerge_dora_refused(tmp_path):
    ad = mixed_adapter(18, dora=True)
    base = base_for(ad)
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    merged = merge(base_path, paths, device="cpu")
    with pytest.raises(CheckpointError, match="cannot unmerge DoRA") as e:
        unmerge(merged.output, paths, device="cpu", force=True)
    assert e.value.code == "LT414"


# --- errors ------------------------------------------------------------------------------------

def test_missing_and_misshapen_modules_listed_in_one_error(tmp_path):
    ad = mixed_adapter(19)
    base = base_for(ad)
    del base["unet.conv3x3.weight"]
    del base["embed_tokens.weight"]
    base["model.layers.0.q_proj.weight"] = torch.randn(40, 24)  # the transpose
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    with pytest.raises(CheckpointError) as e:
        merge(base_path, paths, device="cpu")
    msg = str(e.value)
    assert e.value.code == "LT411" and "3 adapter module(s)" in msg
    for name in ("unet.conv3x3", "embed_tokens", "model.layers.0.q_proj"):
        assert f"`{name}`" in msg
    assert "stores the transpose" in msg and "--allow-missing" in msg
    assert not os.path.exists(tmp_path / "base-merged.safetensors")
    report = merge(base_path, paths, device="cpu", allow_missing=True)
    assert {s["module"] for s in report.skipped} == {"unet.conv3x3", "embed_tokens",
                                                     "model.layers.0.q_proj"}
    assert report.modules_merged == 3 and report.adapters[0]["skipped"] == 3
    out = load_file(report.output)
    assert torch.equal(out["model.layers.0.q_proj.weight"],
                       base["model.layers.0.q_proj.weight"])


def test_prefix_mismatch_and_map(tmp_path):
    ad = mixed_adapter(20, dtype=torch.float32)
    base = {("transformer." + k): v for k, v in base_for(ad).items()}
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    report = merge(base_path, paths, device="cpu")  # unique suffix matches
    out = load_file(report.output)
    ref = ref_merge({k.removeprefix("transformer."): v for k, v in base.items()}, [(ad, 1.0)],
                    with_error=True)
    _assert_bits_equal({k.removeprefix("transformer."): v for k, v in out.items()}, ref,
                       torch.float32)
    # an explicit map beats guessing
    base2 = dict(base)
    base2["other.q.weight"] = base2.pop("transformer.model.layers.0.q_proj.weight")
    p2 = str(tmp_path / "base2.safetensors")
    save_file(base2, p2)
    r2 = merge(p2, paths, device="cpu", name_map=["model.layers.0.q_proj=other.q"])
    assert r2.modules_merged == 6


def test_nan_produced_is_an_error_and_leaves_nothing(tmp_path):
    ad = mixed_adapter(21)
    base = base_for(ad, torch.float16)
    base["step"] = torch.tensor([1.0, math.nan], dtype=torch.float32)  # NaN in the base is ok
    base_path, paths = _write(tmp_path, base, [(ad, 1e6)])
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match="produced .* NaN/Inf") as e:
        merge(base_path, paths, device="cpu")
    assert e.value.code == "LT412"
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file
    ok = merge(base_path, [(paths[0][0], 0.01)], device="cpu")
    assert math.isnan(load_file(ok.output)["step"][1].item())


def test_output_rules(tmp_path):
    ad = mixed_adapter(22)
    base_path, paths = _write(tmp_path, base_for(ad), [(ad, 1.0)])
    with pytest.raises(OperationError) as e:
        merge(base_path, paths, output=base_path, device="cpu", overwrite=True)
    assert e.value.code == "LT502"
    merge(base_path, paths, device="cpu")
    with pytest.raises(OperationError) as e:
        merge(base_path, paths, device="cpu")
    assert e.value.code == "LT503"
    merge(base_path, paths, device="cpu", overwrite=True)
    with pytest.raises(OperationError) as e:
        merge(base_path, [(paths[0][0], math.inf)], device="cpu", overwrite=True)
    assert e.value.code == "LT520"
    with pytest.raises(OperationError, match="contradicts"):
        merge(base_path, paths, device="cpu", output=str(tmp_path / "x.pt"),
              output_format="safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(tmp_path):
    ad = mixed_adapter(23)
    base_path, paths = _write(tmp_path, base_for(ad), [(ad, 1.0)])
    with pytest.raises(OperationError, match="no CUDA device") as e:
        merge(base_path, paths, device="cuda")
    assert e.value.code == "LT521"


def test_int_base_weight_cannot_be_merged(tmp_path):
    ad = mixed_adapter(24)
    base = base_for(ad)
    base["unet.conv1x1.weight"] = torch.zeros(6, 8, 1, 1, dtype=torch.int8)
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    with pytest.raises(CheckpointError, match="I8; merging needs F16, BF16, F32 or F64"):
        merge(base_path, paths, device="cpu")


@pytest.mark.parametrize("text,want", [
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("a.safetensors:-1.5e-1", ("a.safetensors", -0.15)),
    ("C:/x/a.safetensors", ("C:/x/a.safetensors", 1.0)),
    ("dir:name/a.safetensors:2", ("dir:name/a.safetensors", 2.0)),
    ("a.safetensors:", ("a.safetensors:", 1.0)),
    (":0.5", (":0.5", 1.0)),
])
def test_parse_adapter_spec(text, want):
    assert parse_adapter_spec(text) == want


@pytest.mark.parametrize("text", ["a.safetensors:nan", "a:inf", "a:-Infinity"])
def test_parse_adapter_spec_refuses_nonfinite(text):
    # one PATH:NUMBER parser for merge and compose (guards.parse_path_number): the same input
    # gives the same refusal, here with merge's argument code
    with pytest.raises(OperationError) as e:
        parse_adapter_spec(text)
    assert e.value.code == "LT520" and "finite" in e.value.message


def test_parse_adapter_spec_existing_path_wins(tmp_path):
    p = tmp_path / "odd:0.5"
    p.write_bytes(b"")
    assert parse_adapter_spec(str(p)) == (str(p), 1.0)


def test_identity_matches_across_in_memory_and_file(tmp_path):
    ad = mixed_adapter(25)
    base_path, paths = _write(tmp_path, base_for(ad), [(ad, 1.0)])
    r1 = merge(base_path, [(ad, 1.0)], device="cpu")
    r2 = merge(base_path, paths, device="cpu", output=str(tmp_path / "b.safetensors"))
    assert r1.adapters[0]["identity"] == r2.adapters[0]["identity"] == adapter_identity(ad)
    assert load_file(r1.output).keys() == load_file(r2.output).keys()


def test_library_error_types():
    assert issubclass(CheckpointError, LoraToolError)


def test_linear_adapter_on_1x1_conv_weight_and_empty_tensors(tmp_path):
    # Stable Diffusion's proj_in is a Linear in some checkpoints and a 1x1 conv in others.
    g = torch.Generator().manual_seed(26)
    m = LoraModule("proj_in", "linear", "out_in", torch.randn(2, 8, generator=g),
                   torch.randn(6, 2, generator=g), 2.0)
    ad = Adapter(modules={"proj_in": m}, alpha=2.0)
    base = {"proj_in.weight": torch.randn(6, 8, 1, 1, generator=g),
            "empty": torch.zeros(0, 3), "empty_int": torch.zeros(0, dtype=torch.int32)}
    base_path, paths = _write(tmp_path, base, [(ad, 1.0)])
    out = load_file(merge(base_path, paths, device="cpu", dtype="bf16").output)
    want = ref_round(base["proj_in.weight"].double().numpy().reshape(6, 8)
                     + ref_delta(m), torch.bfloat16)
    assert np.array_equal(bits(out["proj_in.weight"]).reshape(6, 8), want)
    assert out["empty"].shape == (0, 3) and out["empty"].dtype == torch.bfloat16
    assert out["empty_int"].dtype == torch.int32
