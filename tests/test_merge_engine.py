"""The exact CPU engine on multi-block tensors: the compiled kernel (when built), the numpy
fast kernel, the reference kernel, one worker and two workers give the same bits, and those
bits are the correctly rounded ``W + s L R`` computed independently in float64 with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.errors import CheckpointError
import itertools
import os

from loratool.ops.merge.exact import BLOCK_ROWS, EXTENSION, REFERENCE_ELEMS, NumpyExactEngine
from loratool.ops.merge.plan import Op

ROWS, COLS, RANK = 4 * REFERENCE_ELEMS // 512 + 37, 512, 16  # 2085 rows: 5 reference blocks
NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BITS = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
SCALE = 0.5  # dyadic: s L stays exact
DTYPES = ("F32", "BF16", "F16")


def _fast_engines(workers: int, **kw) -> dict:
    """The numpy fast kernel and, when built, the compiled one, with its own product and
    after numpy's (CI builds it: ``LORATOOL_REQUIRE_EXT=1``, see
    test_extension_built_when_required)."""
    out = {f"numpy-{workers}": NumpyExactEngine(workers, compiled=False, **kw)}
    if EXTENSION is not None:
        out[f"compiled-{workers}"] = NumpyExactEngine(workers, compiled=True,
                                                      compiled_product=True, **kw)
        out[f"compiled-add-{workers}"] = NumpyExactEngine(workers, compiled=True,
                                                          compiled_product=False, **kw)
    return out


def test_extension_loaded_only_by_a_merge():
    """Commands that never merge (inspect) do not load the compiled kernel, so a missing build
    with LORATOOL_REQUIRE_EXT=1 cannot break them; a merge engine loads it."""
    import subprocess
    import sys
    code = ("import sys; from loratool.cli import main\n"
            "try: main(['inspect', sys.argv[1]])\n"
            "except SystemExit: pass\n"
            "assert 'loratool._fastmerge' not in sys.modules, 'loaded by inspect'\n"
            "from loratool.ops.merge.exact import NumpyExactEngine\n"
            "NumpyExactEngine(1)\n"
            "print('loaded', 'loratool._fastmerge' in sys.modules)\n")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "adapter.safetensors")
    out = subprocess.run([sys.executable, "-c", code, example], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("loaded " + str(EXTENSION is not None))


def test_extension_built_when_required(monkeypatch):
    if os.environ.get("LORATOOL_REQUIRE_EXT") == "1":
        assert EXTENSION is not None
    if EXTENSION is None:
        with pytest.raises(RuntimeError):
            NumpyExactEngine(1, compiled=True)
        return
    # finite blocks never reach the numpy kernels when the compiled one runs
    from loratool.ops.merge import exact

    def boom(*a):
        raise AssertionError("numpy kernel used")
    monkeypatch.setattr(exact, "_fast_block", boom)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5 * BLOCK_ROWS, 64)).astype(np.float32)
    engine = NumpyExactEngine(2, compiled=True, compiled_product=True)
    try:
        for out in ("F32", "BF16", "F16"):
            _run(engine, w, "F32", rng.standard_normal((w.shape[0], 4)),
                 rng.standard_normal((4, 64)), 0.3, out)
    finally:
        engine.close()


def _to_stored(x64: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values that ``dtype`` represents exactly -> the stored array (BF16 as bits)."""
    t = torch.from_numpy(x64).to(TORCH[dtype])
    assert np.array_equal(t.double().numpy(), x64, equal_nan=True), "not representable"
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else t.numpy()


def _fixture(base_dtype: str, seed: int = 0):
    """A base with random rows, rows of values at and near rounding ties of every output
    dtype, NaN/Inf entries; dyadic factors, so that s L R is exact in float64 and every
    correct evaluation gives the same float64 sum (the oracle is then independent of any
    summation order)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((ROWS, COLS))
    # ties: 1 + k 2^-7 (bf16 grid) and 1 + k 2^-10 (fp16 grid): delta = +-half ulp +- tiny
    w[100:140] = 1.0 + rng.integers(0, 64, (40, COLS)) * 2.0**-7
    w[500:520] = -(1.0 + rng.integers(0, 512, (20, COLS)) * 2.0**-10)
    w = torch.from_numpy(w).to(TORCH[base_dtype]).double().numpy()  # representable
    w[7, 3], w[900, 5], w[1500, 0], w[2000, 511] = np.nan, np.inf, -np.inf, np.nan
    L = rng.integers(-8, 9, (ROWS, RANK)) * 2.0**-12
    R = rng.integers(-8, 9, (RANK, COLS)) * 2.0**-12
    # rows whose delta is exactly a half ulp of bf16 / fp16 / fp32 at 1, or a hair off it
    for r0, half in ((100, 2.0**-8), (120, 2.0**-24), (500, 2.0**-11), (510, 2.0**-24)):
        L[r0:r0 + 10] = 0.0
        L[r0:r0 + 10, 0] = half / SCALE * rng.choice([-1.0, 1.0], 10)
        L[r0 + 5:r0 + 10, 1] = 2.0**-40
        R[0], R[1] = 1.0, 1.0
    return w, L, R


def _oracle(w: np.ndarray, L, R, scale: float, out: str) -> np.ndarray:
    """Correctly rounded W + s L R, in torch, by choosing the nearest of the candidates
    around torch's own (possibly twice-rounded) conversion; ties to the even one."""
    x = torch.from_numpy(w) + (torch.from_numpy(L) * scale) @ torch.from_numpy(R)
    if out == "F32":
        return x.to(torch.float32).numpy().view(np.uint32)
    dt = TORCH[out]
    guess = x.to(dt).view(torch.int16).to(torch.int32)
    cands = torch.stack([guess - 1, guess, guess + 1])  # same sign: steps in magnitude
    vals = cands.to(torch.int16).view(dt).double()
    err = torch.nan_to_num((vals - x).abs(), nan=torch.inf)
    even = (cands & 1) == 0
    best = err.min(dim=0).values
    pick = torch.where((err == best) & (even | ((err == best).sum(0) == 1)),
                       torch.arange(3).reshape(3, *([1] * x.dim())), 3).min(dim=0).values
    chosen = torch.gather(cands, 0, pick.clamp(max=2).unsqueeze(0))[0]
    chosen = torch.where(torch.isfinite(x), chosen, guess)
    res = chosen.to(torch.int16).numpy().view(np.uint16)
    nan = torch.isnan(x).numpy()
    res[nan] = 0x7FC0 if out == "BF16" else 0x7E00
    return res


def _run(engine, w_stored, base: str, L, R, scale, out: str) -> np.ndarray:
    raw = np.frombuffer(w_stored.tobytes(), dtype=np.uint8).copy()
    op = Op("lowrank", scale, 0, "m", L, R)
    data, _ = engine.run(raw, base, w_stored.shape, [op], out, "w")
    return np.frombuffer(bytes(data), dtype=BITS[out]).reshape(w_stored.shape)


@pytest.mark.parametrize("base", ["F32", "BF16", "F16"])
def test_engines_bit_identical_and_correctly_rounded(base):
    w, L, R = _fixture(base)
    stored = _to_stored(w, base)
    engines = {**_fast_engines(1), **_fast_engines(2),
               "ref-1": NumpyExactEngine(1, fast=False), "ref-2": NumpyExactEngine(2, fast=False)}
    try:
        for out in ("F32", "BF16", "F16"):
            want = _oracle(w, L, R, SCALE, out)
            finite = ~np.isnan(w)
            for label, engine in engines.items():
                got = _run(engine, stored, base, L, R, SCALE, out)
                # NaN payloads: the engines keep torch's/numpy's, the oracle canonical ones
                assert np.array_equal(got[finite], want[finite]), (label, out)
                assert np.array_equal(got, _run(engines["ref-1"], stored, base, L, R, SCALE,
                                                out)), (label, out)
    finally:
        for engine in engines.values():
            engine.close()


@pytest.mark.parametrize("base,out", list(itertools.product(DTYPES, DTYPES)))
def test_fast_kernels_equal_reference_on_random_factors(base, out):
    """Non-dyadic factors (the product rounds in float64): every kernel agrees with the
    reference, block size and worker count do not change a bit; values span subnormals to
    near-overflow of the output dtype."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((ROWS, COLS)) * 0.05
    # rows of tiny values (bf16/fp16 subnormals) and of large ones (near fp16's 65504)
    w[:40] *= 2.0**-130 if base != "F16" else 2.0**-20
    w[-40:] = rng.uniform(-6e4, 6e4, (40, COLS)) if "F16" in (base, out) else w[-40:] * 1e30
    w = torch.from_numpy(w).to(TORCH[base]).double()
    stored = _to_stored(w.numpy(), base)
    L, R = rng.standard_normal((ROWS, RANK)) * 0.01, rng.standard_normal((RANK, COLS)) * 0.01
    L[:40] *= 2.0**-130 if base != "F16" else 2.0**-20
    ref = NumpyExactEngine(1, fast=False)
    engines = {**_fast_engines(2), **_fast_engines(1, block_rows=7)}
    try:
        want = _run(ref, stored, base, L, R, 1.3, out)
        for label, engine in engines.items():
            assert np.array_equal(_run(engine, stored, base, L, R, 1.3, out), want), label
    finally:
        for e in (ref, *engines.values()):
            e.close()


@pytest.mark.parametrize("base,out", [("F32", "F32"), ("F16", "F16"), ("BF16", "BF16"),
                                      ("F32", "F16"), ("F32", "BF16")])
def test_overflow_is_lt412_on_every_kernel(base, out):
    """A finite base entry rounded to Inf: LT412 from the flags (fast) and the scan
    (reference); an Inf already in the base is not an error."""
    w = np.zeros((3 * BLOCK_ROWS + 1, 8))
    w[-1, -1] = np.inf
    stored = _to_stored(w, base)
    L = np.zeros((w.shape[0], 1))
    R = np.ones((1, 8))
    big = {"F32": 1e39, "F16": 1e5, "BF16": 1e39}[out]
    engines = [NumpyExactEngine(2, fast=False), *_fast_engines(2).values()]
    for engine in engines:
        try:
            assert _run(engine, stored, base, L, R, big, out).shape == w.shape  # all-zero L
            L2 = L.copy()
            L2[2 * BLOCK_ROWS + 3, 0] = 1.0
            with pytest.raises(CheckpointError) as e:
                _run(engine, stored, base, L2, R, big, out)
            assert e.value.code == "LT412" and "8 NaN/Inf" in str(e.value)
        finally:
            engine.close()


@pytest.mark.parametrize("out", ["BF16", "F16", "F32"])
def test_nan_payloads_of_the_base_stay_nan(out):
    """NaN patterns whose low bits would carry in bf16's integer rounding (a negative NaN
    with mantissa bits all ones once rounded to +0.0): every kernel keeps a NaN, and they
    agree bit for bit with the reference."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3 * BLOCK_ROWS + 5, 32)).astype(np.float32)
    bits = w.view(np.uint32)
    spots = [(0, 0), (BLOCK_ROWS, 7), (2 * BLOCK_ROWS + 1, 31), (3 * BLOCK_ROWS + 4, 3)]
    for (i, j), pattern in zip(spots, (0xFFFFFFFF, 0xFFFF8001, 0x7FFFFFFF, 0xFF800001)):
        bits[i, j] = pattern
    L, R = rng.standard_normal((w.shape[0], 4)), rng.standard_normal((4, 32))
    ref = NumpyExactEngine(1, fast=False)
    engines = _fast_engines(2)
    try:
        want = _run(ref, w, "F32", L, R, 0.1, out)
        vals = want.view({"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[out])
        got_nan = np.isnan(vals) if out != "BF16" else (vals & 0x7FFF) > 0x7F80
        assert [bool(got_nan[i, j]) for i, j in spots] == [True] * 4
        assert int(got_nan.sum()) == 4
        for label, engine in engines.items():
            assert np.array_equal(_run(engine, w, "F32", L, R, 0.1, out), want), label
    finally:
        for e in (ref, *engines.values()):
            e.close()


# ---- the compiled product (``_fastmerge.lowrank_round``): certified equal to numpy's ----

needs_ext = pytest.mark.skipif(EXTENSION is None, reason="compiled kernel not built")
CODES = {"F32": 1, "F16": 2, "BF16": 3}


def _direct(w_stored, base, L, R, out, tmp=False):
    """``lowrank_round`` on one block: (status, output bits)."""
    from loratool.ops.merge.exact import _NpOp, _compiled_operands
    m, n = w_stored.shape
    packed, rb, ca, f32 = _compiled_operands(_NpOp("lowrank", 1.0, "m", L, R, None), base, out,
                                             forced=True)
    dst = np.zeros((m, n), dtype=BITS[out])
    scratch = np.zeros_like(dst) if tmp else None
    left = EXTENSION.lowrank_round(w_stored, CODES[base], L, R, packed, rb, ca, dst,
                                   CODES[out], m, R.shape[0], n, 0, m, m, scratch, f32)
    assert left in ([], [(0, 1)], [(0, 2)])
    return (left[0][1] if left else 0), dst


@pytest.fixture(params=[True, False], ids=["simd", "plain"])
def simd(request):
    """Both code paths of the compiled product: AVX2/FMA (where the CPU has it) and plain C."""
    if EXTENSION is None:
        pytest.skip("compiled kernel not built")
    before = EXTENSION.simd()
    EXTENSION.simd(request.param)
    yield request.param
    EXTENSION.simd(before)


@needs_ext
@pytest.mark.parametrize("out", DTYPES)
def test_compiled_product_reports_close_calls_and_nonfinite(simd, out):
    """A sum exactly on (or a hair off) a rounding midpoint of the output dtype cannot be
    certified: status 2, for the numpy kernel to decide; NaN in the base: status 1; ordinary
    values: status 0 and the correctly rounded result, in every tile position (4-row tiles,
    8-column chunks, and the rows and columns left over)."""
    rng = np.random.default_rng(11)
    m, n, r = 11, 37, 3
    half = {"F32": 2.0**-24, "BF16": 2.0**-8, "F16": 2.0**-11}[out]
    L, R = rng.standard_normal((m, r)) * 0.1, rng.standard_normal((r, n)) * 0.1
    w = rng.standard_normal((m, n)).astype(np.float32).astype(np.float64)
    status, got = _direct(_to_stored(w, "F32"), "F32", L, R, out)
    assert status == 0
    assert np.array_equal(got, _oracle(w, L, R, 1.0, out))
    # midpoints at 1, and for F16 also below its normal range (spacing 2^-24 there)
    for w0, h in [(1.0, half)] + ([(2.0**-20, 2.0**-25)] if out == "F16" else []):
        w = np.full((m, n), w0)
        for i, j in itertools.product((0, 5, 10), (0, 9, 36)):  # tiles, chunks, leftovers
            for off in (0.0, 2.0**-50, -2.0**-50):
                L2, R2 = np.zeros((m, r)), np.zeros((r, n))
                L2[i, 0], R2[0, j] = h, 1.0 + off  # W + delta on (or by a hair) a midpoint
                status, _ = _direct(_to_stored(w, "F32"), "F32", L2, R2, out)
                assert status == 2, (w0, i, j, off)
            # off the midpoint by more than the certificate's margin (2^-22 of a half ulp),
            # but so little that the binary32 rounding lands on it
            for off in (2.0**-22, -2.0**-22):
                L2, R2 = np.zeros((m, r)), np.zeros((r, n))
                L2[i, 0], R2[0, j] = h, 1.0 + off
                status, got = _direct(_to_stored(w, "F32"), "F32", L2, R2, out)
                assert status == 0, (w0, i, j, off)
                assert np.array_equal(got, _oracle(w, L2, R2, 1.0, out)), (w0, i, j, off)
    w = np.ones((m, n))
    for i, j in itertools.product((0, 5, 10), (0, 9, 36)):
        bad = w.copy()
        bad[i, j] = np.nan
        assert _direct(_to_stored(bad, "F32"), "F32", L, R, out)[0] == 1


@pytest.mark.parametrize("case", ["dense", "one-hot rows", "squares underflow",
                                  "some squares underflow", "squares overflow"])
def test_compiled_bound_is_above_the_product_magnitude(case):
    """The kernel's bound rb_i ca_j on P_ij = sum_k |sL_ik| |R_kj| (1-norm and max, or the
    2-norms: whichever is tighter for the tensor) is never below P, and picks the 2-norms for
    dense factors, the first pair for one-hot rows of L; factors whose squares underflow
    (the norms' floor keeps them above) or overflow (the first pair) included."""
    from loratool.ops.merge.exact import _compiled_operands, _NpOp
    rng = np.random.default_rng(7)
    rows, cols, r = 37, 45, 16
    L, R = rng.standard_normal((rows, r)), rng.standard_normal((r, cols))
    if case == "one-hot rows":
        L = np.zeros((rows, r))
        L[np.arange(rows), rng.integers(0, r, rows)] = rng.standard_normal(rows)
    elif case == "squares underflow":
        L, R = L * 2.0**-530, R * 2.0**380
    elif case == "some squares underflow":
        L[:, :3] *= 2.0**-530
    elif case == "squares overflow":
        L, R = L * 2.0**520, R * 2.0**-600
    _, rb, ca, _ = _compiled_operands(_NpOp("lowrank", 1.0, "m", L, R, None), "F32", "F32")
    P = np.abs(L) @ np.abs(R)
    assert np.all(rb[:, None] * ca[None, :] >= P * (1 - 2.0**-40)), case
    first, norms = np.abs(L).sum(axis=1), np.linalg.norm(L, axis=1)
    chosen = norms if case in ("dense", "some squares underflow") else first
    assert np.allclose(rb, chosen, rtol=1e-12, atol=0), case


@needs_ext
@pytest.mark.parametrize("out", DTYPES)
def test_compiled_product_flags_boundary_within_product_error(simd, out):
    """The certificate's product term: an exact sum 2^-42 above a rounding midpoint of the
    output, reached through a large cancellation (1 + (1024 + half + 2^-42) - 1024, so
    P = 2048 while e is about 1). A binary64 product of these factors may be off by about
    2 r 2^-53 P = 2^-40, so a BLAS sum may land on either side of the midpoint: the entry is
    never certified (status 2), in any tile position. A bound on |e| alone (the final
    rounding) would certify it: this fails if the product term is dropped or shrunk."""
    half = {"F32": 2.0**-24, "BF16": 2.0**-8, "F16": 2.0**-11}[out]
    m, n, r = 11, 37, 2
    for i, j in itertools.product((0, 5, 10), (0, 9, 36)):
        L, R = np.zeros((m, r)), np.zeros((r, n))
        L[i] = (1024.0 + half + 2.0**-42, -1024.0)  # exact in binary64 (52 bits apart)
        R[:, j] = 1.0
        status, _ = _direct(_to_stored(np.ones((m, n)), "F32"), "F32", L, R, out)
        assert status == 2, (i, j)
        # the same sum without the cancellation (P about half an ulp): certified, correct
        L[i] = (half + 2.0**-42, 0.0)
        status, got = _direct(_to_stored(np.ones((m, n)), "F32"), "F32", L, R, out)
        assert status == 0, (i, j)
        assert np.array_equal(got, _oracle(np.ones((m, n)), L, R, 1.0, out)), (i, j)


@needs_ext
@pytest.mark.parametrize("out", DTYPES)
def test_compiled_product_overflow_edge(simd, out):
    """Sums just above the largest finite output value: below the tie that rounds to Inf the
    result is that value (status 0); past the tie (far from it, so not a close call) the
    output would be Inf: status 1, for numpy to refuse (LT412), in every tile position. For
    BF16/F16 outputs the float32 base itself lies above the largest output value and the
    update is small, so that the binary32 product runs (its factors must stay below 2^60)."""
    top, ulp = {"F32": (float(np.finfo(np.float32).max), 2.0**104),
                "BF16": (float.fromhex("0x1.fep127"), 2.0**120),
                "F16": (65504.0, 32.0)}[out]
    # (base value, the update as L * R, expected status), fractions of the ulp above ``top``
    cases = [(top, (0.3 * ulp, 1.0), 0), (top, (0.8 * ulp, 1.0), 1)] if out == "F32" else [
        (top + 0.25 * ulp, (2.0**-5 * ulp, 1.0) if out == "F16" else (2.0**59, 2.0**56), 0),
        (top + 0.75 * ulp, (2.0**-5 * ulp, 1.0) if out == "F16" else (2.0**59, 2.0**56), 1)]
    m, n, r = 11, 37, 2
    for (w0, (a, b), want), i, j in itertools.product(cases, (0, 5, 10), (0, 9, 36)):
        w = np.ones((m, n))
        w[i, j] = w0
        L, R = np.zeros((m, r)), np.zeros((r, n))
        L[i, 0], R[0, j] = a, b
        status, got = _direct(_to_stored(w, "F32"), "F32", L, R, out)
        assert status == want, (w0, i, j)
        if want == 0:
            assert np.array_equal(got, _oracle(w, L, R, 1.0, out)), (i, j)


@needs_ext
@pytest.mark.parametrize("base,out", list(itertools.product(DTYPES, DTYPES)))
def test_compiled_product_equals_numpy_on_odd_shapes(simd, base, out):
    """Shapes that use every path of the compiled product (columns not a multiple of 8,
    rows not a multiple of 4, several blocks, ranks 1 to 40, rank 32 being the binary32
    product's limit for F16 outputs): the engine with the compiled kernel writes numpy's
    bytes, with and without the scratch buffer (in place)."""
    rng = np.random.default_rng(hash((base, out)) % 2**32)
    for rows, cols, rank in ((70, 333, 16), (9, 7, 1), (35, 64, 40), (4, 8, 3), (37, 50, 32)):
        w = torch.from_numpy(rng.standard_normal((rows, cols)) * 0.05).to(TORCH[base])
        stored = _to_stored(w.double().numpy(), base)
        L = rng.standard_normal((rows, rank)) * 0.01
        R = rng.standard_normal((rank, cols)) * 0.01
        engines = {**_fast_engines(2), **_fast_engines(1, block_rows=5)}
        try:
            want = _run(engines["numpy-2"], stored, base, L, R, 0.7, out)
            for label, engine in engines.items():
                got = _run(engine, stored, base, L, R, 0.7, out)
                assert np.array_equal(got, want), (label, rows, cols, rank)
        finally:
            for e in engines.values():
                e.close()


@needs_ext
@settings(max_examples=60)
@given(rows=st.integers(1, 23), cols=st.integers(1, 41), rank=st.integers(1, 20),
       base=st.sampled_from(DTYPES), out=st.sampled_from(DTYPES),
       w_exp=st.integers(-30, 8), d_exp=st.integers(-40, 4),
       scale=st.floats(-4, 4, allow_nan=False).filter(lambda s: s != 0),
       seed=st.integers(0, 2**32 - 1), simd_on=st.booleans())
def test_compiled_product_equals_numpy_property(rows, cols, rank, base, out, w_exp, d_exp,
                                                scale, seed, simd_on):
    """Any shape, rank, scale and magnitude (deltas from far below to far above the
    weights, subnormal and overflowing results included): the compiled product gives the
    numpy kernel's bytes, or the same LT412 error."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((rows, cols)) * 2.0**w_exp).to(TORCH[base])
    stored = _to_stored(w.double().numpy(), base)
    L = rng.standard_normal((rows, rank)) * 2.0**(d_exp / 2)
    R = rng.standard_normal((rank, cols)) * 2.0**(d_exp / 2)
    before = EXTENSION.simd()
    EXTENSION.simd(simd_on)
    engines = [NumpyExactEngine(1, compiled=False, block_rows=4),
               NumpyExactEngine(1, compiled=True, compiled_product=True, block_rows=4)]
    try:
        results = []
        for engine in engines:
            try:
                results.append(_run(engine, stored, base, L, R, scale, out))
            except CheckpointError as e:
                results.append(e.code)
        assert type(results[0]) is type(results[1])
        assert (results[0] == results[1]) if isinstance(results[0], str) else \
            np.array_equal(results[0], results[1])
    finally:
        EXTENSION.simd(before)
        for e in engines:
            e.close()


@needs_ext
@pytest.mark.parametrize("out", DTYPES)
def test_compiled_product_float64_base_and_huge_factors(simd, out):
    """The compiled product's other tiles: a float64 base (products into a tile, then the
    generic epilogue) and, for BF16/F16 outputs, factors too large for the binary32 product:
    numpy's bytes either way."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((37, 45)) * 0.05
    L, R = rng.standard_normal((37, 6)) * 0.01, rng.standard_normal((6, 45)) * 0.01
    cases = [("F64", w, L, R, 0.7),  # float64 base
             ("F32", w.astype(np.float32), L * 2.0**70, R * 2.0**-70, 0.7)]  # huge L
    for base, stored, L_, R_, scale in cases:
        engines = [NumpyExactEngine(1, compiled=False, block_rows=8),
                   NumpyExactEngine(1, compiled=True, compiled_product=True, block_rows=8)]
        try:
            got = [_run(e, stored, base, L_, R_, scale, out) for e in engines]
            assert np.array_equal(got[0], got[1]), base
        finally:
            for e in engines:
                e.close()


@needs_ext
def test_compiled_product_rank_limits():
    """By default the compiled product runs only up to the ranks where it pays (measured:
    its certificate fails more often as the rank grows); forced, it runs at any rank."""
    from loratool.ops.merge.exact import _compiled_operands, _NpOp, _product_pays
    assert _product_pays(16, "F32") and _product_pays(64, "F32") and not _product_pays(65, "F32")
    assert _product_pays(4096, "BF16") and _product_pays(32, "F16")
    assert not _product_pays(33, "F16") and not _product_pays(16, "F64")
    assert _product_pays(65, "F32", forced=True) and _product_pays(33, "F16", forced=True)
    rng = np.random.default_rng(2)
    op = _NpOp("lowrank", 1.0, "m", rng.standard_normal((8, 65)), rng.standard_normal((65, 32)),
               None)
    assert _compiled_operands(op, "BF16", "BF16")[3] is None  # binary64 tiles above rank 64
    assert _compiled_operands(op, "BF16", "BF16", forced=True)[3] is not None
