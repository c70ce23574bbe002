"""FP8 merges by row chunks (spec/merge.md section 4.6, loratool/ops/merge/fp8_base.py): the
bytes written equal an independent whole-tensor float64 computation, bit for bit, whatever the
chunking: dequantize with a full-size scale array made here, add the numpy float64 deltas of
the stored factors, and requantize by brute force (every element compared exactly with every
midpoint between FP8 values times its scale, ties to the even code, saturating). The report's
figures equal whole-tensor float64 dot products to 1e-12 relative. DoRA (merged whole, encoded
by chunks) and the torch engine are checked against the same engine's merge of an F64 base
holding the FP8 weights' exact values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _merge_helpers import bits, ref_round
from safetensors.torch import load_file
from safetensors.torch import save_file

from loratool.adapter import save_adapter
from loratool.model import Adapter, LoraModule
from loratool.ops.merge import fp8_base as F
from loratool.ops.merge import merge

TORCH = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# largest finite code and the value one step above the largest finite one (unbounded exponent)
TOP = {"F8_E4M3": (0x7E, 480.0), "F8_E5M2": (0x7B, 65536.0)}


def _values(dt: str) -> np.ndarray:
    return torch.arange(256, dtype=torch.uint8).view(TORCH[dt]).to(torch.float64).numpy()


def _encode(x: np.ndarray, s: np.ndarray, dt: str) -> tuple[np.ndarray, int]:
    """Brute force RN_sat(x / s): k = how many midpoints m satisfy m * s < |x| (exact: m has
    at most 5 significant bits, s 24); |x| == m_k * s is a tie between codes k and k + 1."""
    top, above = TOP[dt]
    v = _values(dt)[: top + 1]
    mids = np.append((v[:-1] + v[1:]) / 2, (v[-1] + above) / 2)
    a, s = np.abs(x).reshape(-1), np.broadcast_to(s, x.shape).reshape(-1)
    k = np.zeros(a.size, np.int64)
    tie = np.zeros(a.size, bool)
    for m in mids:
        k += m * s < a
        tie |= m * s == a
    k += tie & (k % 2 == 1)
    codes = np.minimum(k, top).astype(np.uint8) | (np.signbit(x.reshape(-1)) * 0x80).astype(
        np.uint8)
    return codes.reshape(x.shape), int((k > top).sum())


def _codes(rng, shape, dt):
    top = TOP[dt][0]
    c = rng.integers(0, top + 1, shape) | (rng.integers(0, 2, shape) << 7)
    return c.astype(np.uint8)


def _full(scale: np.ndarray, shape, block):
    """The scale of every element, built independently of fp8_base."""
    rows, cols = shape
    i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
    return scale[i // block[0], j // block[1]]


def _case(tmp_path):
    """Block (F32; UE8M0 scales), per-row, per-tensor and no scale; E4M3 and E5M2; edges
    that are not multiples of 128; two adapters on one tensor (the reference kernel)."""
    rng = np.random.default_rng(7)
    g = torch.Generator().manual_seed(7)
    specs = {  # name: (dtype, shape, scale kind, scale, block, adapter magnitude)
        "blk": ("F8_E4M3", (300, 200), "F32",
                rng.uniform(1e-3, 4e-3, (3, 2)), (128, 128), 0.12),
        "e8": ("F8_E4M3", (270, 130), "F8_E8M0",
               np.exp2(rng.integers(-10, -7, (3, 2)).astype(np.float64)), (128, 128), 0.12),
        "row": ("F8_E4M3", (90, 40), "F32", rng.uniform(1e-3, 4e-3, (90, 1)), (1, 40), 0.12),
        "ten": ("F8_E5M2", (70, 50), "BF16", np.array([[2.0 ** -12 * 1.5]]), (70, 50), 0.3),
        "none": ("F8_E5M2", (50, 30), None, np.ones((1, 1)), (50, 30), 3.0),
    }
    t, want = {}, {}
    for n, (dt, shape, kind, s, block, mag) in specs.items():
        codes = _codes(rng, shape, dt)
        t[n + ".weight"] = torch.from_numpy(codes).view(TORCH[dt])
        if kind == "F8_E8M0":
            e = (np.log2(s) + 127).astype(np.uint8)
            t[n + ".weight_scale_inv"] = torch.from_numpy(e).view(torch.float8_e8m0fnu)
        elif kind is not None:
            s = s.astype(np.float32).astype(np.float64)
            sc = torch.from_numpy(s).float() if kind == "F32" else \
                torch.from_numpy(s.reshape(1)).to(torch.bfloat16)
            t[n + ".weight_scale_inv" if n != "row" else n + ".weight_scale"] = sc
        full = _full(s, shape, block)
        want[n] = (dt, _values(dt)[codes] * full, full, mag)
    base = str(tmp_path / "base.safetensors")
    save_file(t, base)
    adapters = []
    for k, names in enumerate((list(specs), ["blk"])):
        mods = {}
        for n in names:
            dt, W, full, mag = want[n]
            r = 4
            mods[n] = LoraModule(n, "linear", "out_in", torch.randn(r, W.shape[1], generator=g)
                                 * mag, torch.randn(W.shape[0], r, generator=g) * mag, 2.0 * r)
        path = str(tmp_path / f"ad{k}.safetensors")
        save_adapter(Adapter(modules=mods, alpha=8.0), path)
        adapters.append((path, mods, 0.7 if k == 0 else -1.3))
    return base, adapters, want


def _merged(n, W, adapters):
    """W + (c s B) @ A per adapter, in adapter order, float64 (as section 4.1 evaluates it)."""
    M = W
    for _, mods, c in adapters:
        if n in mods:
            m = mods[n]
            M = (m.B.double().numpy() * (c * m.scale)) @ m.A.double().numpy() + M
    return M


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
@pytest.mark.parametrize("chunk", [F._CHUNK, 1500])
def test_chunked_merge_equals_whole_tensor_reference(tmp_path, monkeypatch, dtype, chunk):
    # chunk 1500 elements: blk and e8 in chunks of 128 rows, row/ten/none in 16-row ones
    monkeypatch.setattr(F, "_CHUNK", chunk)
    base, adapters, want = _case(tmp_path)
    out = str(tmp_path / "out.safetensors")
    rep = merge(base, [(p, c) for p, _, c in adapters], output=out, device="cpu",
                dtype=dtype)
    got = {k: v.contiguous() for k, v in load_file(out).items()}
    rows = {r["name"]: r for r in rep.fp8["tensors"]}
    sums = np.zeros(4)
    for n, (dt, W, full, _) in want.items():
        M = _merged(n, W, adapters)
        if dtype == "keep":
            codes, sat = _encode(M, full, dt)
            g = got[n + ".weight"].view(torch.uint8).numpy()
            assert np.array_equal(g, codes), n
            assert rows[n + ".weight"]["saturated"] == sat, n
            stored = _values(dt)[codes] * full
        else:
            b = bits(got[n + ".weight"])
            assert np.array_equal(b, ref_round(M, torch.bfloat16)), n
            stored = (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        eff, d = stored - W, M - W
        fig = (np.vdot(d, d), np.vdot(eff, eff), np.vdot(eff, d), np.vdot(eff - d, eff - d))
        sums += fig
        r = rows[n + ".weight"]
        assert r["delta_norm"] == pytest.approx(fig[0] ** 0.5, rel=1e-12)
        assert r["change_norm"] == pytest.approx(fig[1] ** 0.5, rel=1e-12)
        assert r["kept"] == pytest.approx(fig[2] / fig[0], rel=1e-12)
        assert r["rel_error"] == pytest.approx((fig[3] / fig[0]) ** 0.5, rel=1e-12)
    assert rep.fp8["kept"] == pytest.approx(sums[2] / sums[0], rel=1e-12)
    assert rep.fp8["retained"] == pytest.approx((sums[1] / sums[0]) ** 0.5, rel=1e-12)
    if dtype == "keep":
        assert rows["blk.weight"]["saturated"] > 0 and rows["e8.weight"]["saturated"] > 0
        for k in ("blk.weight_scale_inv", "e8.weight_scale_inv", "row.weight_scale",
                  "ten.weight_scale_inv"):
            assert torch.equal(got[k].view(torch.uint8), load_file(base)[k].view(torch.uint8))
    else:
        assert not any(k.endswith(("_scale", "_scale_inv")) for k in got)


def test_report_does_not_depend_on_the_chunks(tmp_path, monkeypatch):
    base, adapters, _ = _case(tmp_path)
    reps = []
    for chunk in (F._CHUNK, 1500, 1):
        monkeypatch.setattr(F, "_CHUNK", chunk)
        out = str(tmp_path / f"o{chunk}.safetensors")
        reps.append((merge(base, [(p, c) for p, _, c in adapters], output=out,
                           device="cpu").fp8, open(out, "rb").read()))
    assert reps[0] == reps[1] == reps[2]


def test_whole_tensor_figures_are_the_chunked_ones():
    # GGUF merges add whole tensors (RetainedDelta.add), FP8 merges row chunks (add_sums):
    # one computation, the same figures to the bit; against exact rational sums
    from fractions import Fraction

    from loratool.retained import RetainedDelta, TensorSums
    rng = np.random.default_rng(5)
    delta = rng.standard_normal((37, 29)) * 1e-3
    eff = delta + rng.standard_normal((37, 29)) * 1e-5
    whole = RetainedDelta().add("t", "Q4_K", "Q4_K", eff, delta)
    sums = TensorSums()
    for i in range(0, 37, 10):
        sums.update(eff[i:i + 10], delta[i:i + 10])
    assert whole == RetainedDelta().add_sums("t", "Q4_K", "Q4_K", sums)

    def exact(x, y):
        return float(sum(Fraction(a) * Fraction(b) for a, b in zip(x.ravel(), y.ravel())))
    dd, ee, ed = exact(delta, delta), exact(eff, eff), exact(eff, delta)
    rr = exact(eff - delta, eff - delta)
    assert whole.delta_norm == pytest.approx(dd ** 0.5, rel=1e-15)
    assert whole.retained == pytest.approx((ee / dd) ** 0.5, rel=1e-14)
    assert whole.kept == pytest.approx(ed / dd, rel=1e-14)
    assert whole.rel_error == pytest.approx((rr / dd) ** 0.5, rel=1e-14)
    # a 1-D tensor (a norm's weight) is a column: one element per row
    vec = RetainedDelta().add("v", "F32", "F16", eff[0], delta[0])
    assert vec == RetainedDelta().add("v", "F32", "F16", eff[:1].T, delta[:1].T)
    assert vec.kept == pytest.approx(exact(eff[0], delta[0]) / exact(delta[0], delta[0]),
                                     rel=1e-14)


def test_chunks_follow_the_scale_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "_CHUNK", 1 << 20)
    fp8 = F.Fp8Base.__new__(F.Fp8Base)
    fp8.scales = {"b": (np.ones(6), (128, 128)), "r": (np.ones(7168), (1, 18432)),
                  "one": (np.ones(1), (100, 7))}
    assert fp8.chunk_rows("b", (7168, 18432)) == 128  # 18432 columns: one block row
    assert fp8.chunk_rows("b", (300, 200)) == 5120  # 40 blocks of 128 rows
    assert fp8.chunk_rows("r", (7168, 18432)) == 48  # ~1M elements, 16-row multiples
    assert fp8.chunk_rows("one", (100, 7)) == 149792
    assert fp8.chunk_rows("none", (4, 1 << 21)) == 16
    # scales of rows 100:300 of a 128x128 grid: rows of two block rows, never the whole tensor
    s = np.arange(6, dtype=np.float64)
    fp8.scales["b"] = (s, (128, 128))
    part = fp8.scale_rows("b", 100, 300, 200)
    assert part.shape == (200, 200)
    assert np.array_equal(part, _full(s.reshape(3, 2), (300, 200), (128, 128))[100:300])
    assert fp8.scale_rows("r", 5, 9, 18432).shape == (4, 1)


def _float_twin(tmp_path, want, adapters):
    """The same weights stored as F64 (no scales): section 4.6 merges an FP8 weight as a float
    base holding its exact value, so that base's F64 output is x, to be encoded here."""
    path = str(tmp_path / "f64.safetensors")
    save_file({n + ".weight": torch.from_numpy(W) for n, (_, W, _, _) in want.items()}, path)
    return path


@pytest.mark.parametrize("kind", ["dora", "fp32-engine"])
def test_whole_tensor_updates_and_the_torch_engine(tmp_path, monkeypatch, kind):
    # DoRA (a norm per output: the whole tensor in float64, encoded by chunks) through the
    # exact engine, and low-rank updates through the torch engine (CUDA's, on the CPU here),
    # in chunks: both equal the same engine's merge of an F64 base of the same values
    from loratool.ops.merge.job import Engines, run_with
    monkeypatch.setattr(F, "_CHUNK", 1500)
    base, adapters, want = _case(tmp_path)
    if kind == "dora":
        g = torch.Generator().manual_seed(9)
        path, mods, c = adapters[0]
        mods = {n: LoraModule(n, m.kind, m.layout, m.A, m.B, m.alpha,
                              magnitude=torch.rand(m.B.shape[0], generator=g) + 0.5)
                for n, m in mods.items()}
        save_adapter(Adapter(modules=mods, alpha=8.0), path, overwrite=True)
        adapters = [(path, mods, c)]
    engines = Engines(precision="fp64" if kind == "dora" else "fp32")
    items = [(p, c) for p, _, c in adapters]
    twin = _float_twin(tmp_path, want, adapters)
    run_with(engines, "merge", twin, items, output=str(tmp_path / "x.safetensors"),
             device="cpu")
    xs = load_file(str(tmp_path / "x.safetensors"))
    rep = run_with(engines, "merge", base, items, output=str(tmp_path / "o.safetensors"),
                   device="cpu")
    got = load_file(str(tmp_path / "o.safetensors"))
    rows = {r["name"]: r for r in rep.fp8["tensors"]}
    for n, (dt, W, full, _) in want.items():
        codes, sat = _encode(xs[n + ".weight"].numpy(), full, dt)
        assert np.array_equal(got[n + ".weight"].view(torch.uint8).numpy(), codes), n
        assert rows[n + ".weight"]["saturated"] == sat
