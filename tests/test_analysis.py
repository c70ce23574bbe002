"""The LoRA paper's analyses (spec/lowrank.md sections 6 and 7) against dense float64 oracles.

Oracles here use only the formulas of Hu et al. 2021, section 7, on dense matrices:
``torch.linalg.svd`` of A (or of the dense delta s * B @ A) and of W, and the plain products.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from _lowrank_helpers import adapter, dense, module
from loratool.adapter import save_adapter
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.ops.compose import compare
from loratool.ops.inspect import inspect

TOL = 1e-10  # the spec's tolerance: phi absolute (phi is in [0, 1]), norms relative


# --- oracles -------------------------------------------------------------------------------------

def right_vectors(M: torch.Tensor) -> torch.Tensor:
    """Columns: right singular vectors of M (float64), by descending singular value."""
    return torch.linalg.svd(M.to(torch.float64), full_matrices=False).Vh.T


def left_vectors(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(M.to(torch.float64), full_matrices=False).U


def phi_oracle(V1, V2) -> list[list[float]]:
    """phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), entry by entry."""
    return [[float(torch.linalg.matrix_norm(V1[:, :i].T @ V2[:, :j]) ** 2 / min(i, j))
             for j in range(1, V2.shape[1] + 1)] for i in range(1, V1.shape[1] + 1)]


def assert_grid(grid, ref, tol=TOL):
    assert len(grid) == len(ref) and all(len(g) == len(r) for g, r in zip(grid, ref))
    worst = max(abs(g - r) for gr, rr in zip(grid, ref) for g, r in zip(gr, rr))
    assert worst <= tol, worst


def assert_rel(x, ref, tol=TOL):
    assert abs(x - ref) <= tol * abs(ref), (x, ref)


def A2(m) -> torch.Tensor:
    return m.A.to(torch.float64).reshape(m.A.shape[0], -1)


def pair(seed_a=0, seed_b=1, rank_a=4, rank_b=6):
    """Two adapters over the same modules (every kind), different ranks and seeds."""
    def mods(seed, r):
        return [module("q", out=10, inp=12, rank=r, seed=seed),
                module("c_attn", out=36, inp=12, rank=r, layout="in_out", seed=seed + 10),
                module("conv", out=6, inp=3, kernel=(3, 3), rank=r, kind="conv", seed=seed + 20),
                module("emb", out=8, inp=20, rank=r, kind="embedding", seed=seed + 30,
                       scaling="rslora")]
    return adapter(*mods(seed_a, rank_a)), adapter(*mods(seed_b, rank_b))


# --- subspace similarity ----------------------------------------------------------------------

def test_phi_on_a_matches_the_dense_formula():
    a, b = pair()
    report = compare(a, b, subspace=True)
    assert report["subspace"]["on"] == "a" and report["subspace"]["modules"] == 4
    for row in report["modules"]:
        V1 = right_vectors(A2(a.modules[row["name"]]))
        V2 = right_vectors(A2(b.modules[row["name"]]))
        assert_grid(row["subspace_similarity"], phi_oracle(V1, V2))
        assert row["subspace"]["dims"] == [4, 6]


def test_phi_on_delta_matches_the_dense_formula_on_both_sides():
    a, b = pair(rank_a=5, rank_b=3)
    report = compare(a, b, subspace=True, on="delta")
    for row in report["modules"]:
        Da, Db = dense(a.modules[row["name"]]), dense(b.modules[row["name"]])
        k_a, k_b = min(5, *Da.shape), min(3, *Db.shape)
        assert_grid(row["subspace_similarity"],
                    phi_oracle(right_vectors(Da)[:, :k_a], right_vectors(Db)[:, :k_b]))
        assert_grid(row["subspace_similarity_output"],
                    phi_oracle(left_vectors(Da)[:, :k_a], left_vectors(Db)[:, :k_b]))


def test_phi_summary_fields():
    a, b = pair()
    row = compare(a, b, subspace=True)["modules"][0]
    grid = row["subspace_similarity"]
    diag = [grid[i][i] for i in range(4)]
    assert row["subspace"]["phi_at_min"] == diag[3]
    above = [i + 1 for i, v in enumerate(diag) if v >= 0.5]
    assert row["subspace"]["half_dim"] == (max(above) if above else None)


def test_phi_is_symmetric_exactly():
    a, b = pair(rank_a=4, rank_b=4)
    for on in ("a", "delta"):
        ab = compare(a, b, subspace=True, on=on)["modules"]
        ba = compare(b, a, subspace=True, on=on)["modules"]
        for x, y in zip(ab, ba):
            for key in ("subspace_similarity", "subspace_similarity_output"):
                if key in x:
                    gx, gy = x[key], y[key]
                    assert gx == [list(col) for col in zip(*gy)]  # phi(A1,A2,i,j) == phi(A2,A1,j,i)


def test_phi_of_an_adapter_with_itself_is_one_on_the_diagonal():
    a, _ = pair(rank_a=6)
    for on in ("a", "delta"):
        for row in compare(a, a, subspace=True, on=on)["modules"]:
            grid = row["subspace_similarity"]
            for i in range(len(grid)):
                assert abs(grid[i][i] - 1.0) <= 1e-12
                assert all(0.0 <= v <= 1.0 for v in grid[i])


def test_phi_of_independent_random_adapters_is_near_its_expectation():
    # For a fixed i-dimensional subspace and a uniformly random j-dimensional one in R^n,
    # T = ||P_i^T P_j||_F^2 has mean i*j/n and variance 2ij(n-i)(n-j) / (n^2 (n-1)(n+2));
    # the top-i right singular subspace of a Gaussian A is uniformly random (A Q ~ A). Over
    # M independent module pairs the mean of phi = T / min(i, j) is within 5 standard errors
    # of i*j/(n*min(i, j)) (spec/lowrank.md 6.3; seeded, so the check is deterministic).
    n, r, M = 48, 6, 40
    mods_a = [module(f"m{k}", out=16, inp=n, rank=r, seed=1000 + k) for k in range(M)]
    mods_b = [module(f"m{k}", out=16, inp=n, rank=r, seed=5000 + k) for k in range(M)]
    report = compare(adapter(*mods_a), adapter(*mods_b), subspace=True)
    grids = torch.tensor([row["subspace_similarity"] for row in report["modules"]])
    mean = grids.mean(0)
    for i in range(1, r + 1):
        for j in range(1, r + 1):
            expect = i * j / (n * min(i, j))
            var = 2 * i * j * (n - i) * (n - j) / (n * n * (n - 1) * (n + 2)) / min(i, j) ** 2
            assert abs(float(mean[i - 1, j - 1]) - expect) <= 5 * math.sqrt(var / M), (i, j)


def test_variance_formula_used_above_is_right():
    # Monte Carlo check of the variance the previous test relies on (seeded).
    g = torch.Generator().manual_seed(7)
    n, i, j, N = 12, 2, 3, 20000
    P = torch.eye(n, dtype=torch.float64)[:, :i]
    Q = torch.linalg.qr(torch.randn(N, n, j, generator=g, dtype=torch.float64)).Q
    T = ((P.T @ Q) ** 2).sum((1, 2))
    var = 2 * i * j * (n - i) * (n - j) / (n * n * (n - 1) * (n + 2))
    assert abs(float(T.mean()) - i * j / n) <= 5 * math.sqrt(var / N)
    assert abs(float(T.var()) / var - 1) <= 0.05


def test_subspace_skips_zero_deltas_and_uncomparable_modules():
    a = adapter(module("q", rank=3, seed=1), module("only_a", seed=2))
    zero = module("q", rank=3, seed=3)
    zero.B = torch.zeros_like(zero.B)
    b = adapter(zero, module("only_b", seed=4))
    report = compare(a, b, subspace=True, on="delta")
    q = next(r for r in report["modules"] if r["name"] == "q")
    assert q["subspace_similarity"] == [[], [], []] and q["subspace"]["phi_at_min"] is None
    assert q["subspace"]["dims"] == [3, 0]
    assert all("subspace" not in r for r in report["modules"] if r["status"] != "ok")
    on_a = compare(a, b, subspace=True)  # A of the zero-B module is still a subspace
    assert next(r for r in on_a["modules"] if r["name"] == "q")["subspace"]["dims"] == [3, 3]


def test_bad_on_is_refused():
    a, b = pair()
    with pytest.raises(LoraToolError) as e:
        compare(a, b, subspace=True, on="b")
    assert e.value.code == "LT536"


# --- amplification ----------------------------------------------------------------------------

def random_orth(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def amplification_oracle(name, D, W2, seed):
    """Section 7.3 of the paper on the dense delta D and base matrix W2 [out, n], and the
    spec's random-baseline recipe for module ``name``."""
    D = D.to(torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = int((S > S[0] * max(D.shape) * 2.0**-52).sum()) if float(S[0]) > 0 else 0
    U, V = U[:, :k], Vh[:k].T
    W2 = W2.to(torch.float64)
    proj = float(torch.linalg.matrix_norm(U.T @ W2 @ V))
    Uw, Sw, Vwh = torch.linalg.svd(W2, full_matrices=False)
    top = float(torch.linalg.matrix_norm(Uw[:, :k].T @ W2 @ Vwh[:k].T))
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    Ur = random_orth(W2.shape[0], k, g)
    Vr = random_orth(W2.shape[1], k, g)
    rand = float(torch.linalg.matrix_norm(Ur.T @ W2 @ Vr))
    dnorm = float(torch.linalg.matrix_norm(D))
    return {"rank": k, "delta_norm": dnorm, "base_norm": float(torch.linalg.matrix_norm(W2)),
            "projection_norm": proj, "amplification": dnorm / proj,
            "top_projection_norm": top, "random_projection_norm": rand}


def base_for(ad, seed=0, dtype=torch.float32, extra=True):
    """A base state dict fitting ``ad`` (each module's weight in the base's own layout)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in ad.modules.items():
        out[name + ".weight"] = torch.randn(*m.info.base_shape, generator=g).to(dtype)
    if extra:
        out["unrelated.weight"] = torch.randn(300, 7, generator=g).to(dtype)
    return out


def matrix_view(m, W):
    """The [out, n] matrix that dW is added to, written from adapter-format.md section 5."""
    if m.kind == "conv":
        return W.reshape(W.shape[0], -1)
    if m.kind == "embedding" or m.layout == "in_out":
        return W.T
    return W


@pytest.fixture
def analysed(tmp_path):
    a, _ = pair(rank_a=4)
    path = str(tmp_path / "a.safetensors")
    save_adapter(a, path)
    base = base_for(a)
    return a, path, base


@pytest.mark.parametrize("layout", ["safetensors", "pt", "sharded"])
def test_amplification_matches_the_dense_formulas(tmp_path, analysed, layout):
    a, path, base = analysed
    if layout == "safetensors":
        bpath = str(tmp_path / "base.safetensors")
        save_file(base, bpath)
    elif layout == "pt":
        bpath = str(tmp_path / "base.pt")
        torch.save(base, bpath)
    else:
        bpath = str(tmp_path / "sharded")
        os.makedirs(bpath)
        names = sorted(base)
        weight_map = {}
        for s, part in enumerate((names[:2], names[2:])):
            shard = f"model-{s + 1:05d}-of-00002.safetensors"
            save_file({n: base[n] for n in part}, os.path.join(bpath, shard))
            weight_map.update({n: shard for n in part})
        with open(os.path.join(bpath, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    report = inspect(path, base=bpath, seed=3)
    assert report["base"]["seed"] == 3 and report["base"]["modules"] == 4
    # Only the matched tensors were read (not "unrelated.weight").
    assert report["base"]["bytes_read"] == sum(
        base[n + ".weight"].numel() * 4 for n in a.modules)
    for row in report["modules"]:
        m = a.modules[row["name"]]
        got = row["amplification"]
        ref = amplification_oracle(m.name, dense(m), matrix_view(m, base[m.name + ".weight"]),
                                   seed=3)
        assert got["rank"] == ref["rank"] == 4
        assert got["base_tensor"] == m.name + ".weight"
        for key in ("delta_norm", "base_norm", "projection_norm", "amplification",
                    "top_projection_norm", "random_projection_norm"):
            assert_rel(got[key], ref[key])


def test_random_baseline_has_the_expected_mean_square():
    # E ||U_R^T W V_R||_F^2 = k^2 ||W||_F^2 / (out * n) for independent uniformly random
    # k-dimensional subspaces; the mean over 200 seeds is within 5 standard errors.
    from loratool.ops.amplification import random_projection_norm
    W = torch.randn(20, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sq = torch.tensor([random_projection_norm(W, 3, s, "q") ** 2 for s in range(200)])
    expect = 9 * float(W.norm()) ** 2 / (20 * 24)
    assert abs(float(sq.mean()) - expect) <= 5 * float(sq.std()) / math.sqrt(200)


def test_seed_changes_only_the_random_baseline(tmp_path, analysed):
    a, path, base = analysed
    bpath = str(tmp_path / "base.safetensors")
    save_file(base, bpath)
    r0, r1 = inspect(path, base=bpath), inspect(path, base=bpath, seed=1)
    assert r0["base"]["seed"] == 0
    for x, y in zip(r0["modules"], r1["modules"]):
        x, y = x["amplification"], y["amplification"]
        assert x["random_projection_norm"] != y["random_projection_norm"]
        assert {k: v for k, v in x.items() if k != "random_projection_norm"} == \
               {k: v for k, v in y.items() if k != "random_projection_norm"}
    with pytest.raises(LoraToolError) as e:
        inspect(path, base=bpath, seed=-1)
    assert e.value.code == "LT536"


def test_zero_delta_has_no_amplification(tmp_path):
    m = module("q", rank=2, seed=1)
    m.B = torch.zeros_like(m.B)
    path = str(tmp_path / "z.safetensors")
    save_adapter(adapter(m), path)
    bpath = str(tmp_path / "base.safetensors")
    save_file(base_for(adapter(m)), bpath)
    row = inspect(path, base=bpath)["modules"][0]["amplification"]
    assert row["rank"] == 0 and row["projection_norm"] == 0.0 and row["amplification"] is None
    assert row["top_projection_norm"] == 0.0 and row["random_projection_norm"] == 0.0


def test_unmatched_or_misshapen_modules_are_one_error(tmp_path, analysed):
    a, path, base = analysed
    del base["q.weight"]
    base["conv.weight"] = torch.zeros(6, 3, 5, 5)
    bpath = str(tmp_path / "base.safetensors")
    save_file(base, bpath)
    with pytest.raises(LoraToolError) as e:
        inspect(path, base=bpath)
    assert e.value.code == "LT411"
    assert "`q`" in e.value.message and "`conv`" in e.value.message


def test_dora_modules_are_listed_not_analyzed(tmp_path):
    plain, dora = module("q", seed=1), module("v", seed=2, magnitude=True)
    ad = adapter(plain, dora)
    path = str(tmp_path / "d.safetensors")
    save_adapter(ad, path)
    bpath = str(tmp_path / "base.safetensors")
    save_file(base_for(ad), bpath)
    report = inspect(path, base=bpath)
    rows = {r["name"]: r for r in report["modules"]}
    assert rows["v"]["amplification"] is None and report["base"]["dora_not_analyzed"] == ["v"]
    assert rows["q"]["amplification"]["rank"] == 4


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_compare_subspace_json_and_table(tmp_path):
    a, b = pair()
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_adapter(a, pa)
    save_adapter(b, pb)
    runner = CliRunner()
    res = runner.invoke(main, ["compare", pa, pb, "--subspace", "--on", "delta", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["subspace"]["on"] == "delta"
    assert report == json.loads(json.dumps(compare(pa, pb, subspace=True, on="delta")))
    res = runner.invoke(main, ["compare", pa, pb, "--subspace"])
    assert res.exit_code == 0, res.output
    assert "phi(k,k)" in res.stdout and "subspace similarity on A matrices" in res.stdout
    for args in (["--plot", str(tmp_path / "x.png")], ["--on", "a"]):
        res = runner.invoke(main, ["compare", pa, pb, *args])
        assert res.exit_code == 2 and "need --subspace" in res.output


@pytest.mark.parametrize("on", ["a", "delta"])
def test_cli_plot_writes_a_png_that_opens(tmp_path, examples_dir, on):
    import matplotlib.image as mpimg
    png = str(tmp_path / "phi.png")
    ex = os.path.join(examples_dir, "adapter.safetensors")
    style = os.path.join(examples_dir, "adapter_style.safetensors")
    res = CliRunner().invoke(main, ["compare", ex, style, "--subspace", "--on", on,
                                    "--plot", png])
    assert res.exit_code == 0, res.output
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.05  # not a blank image
    # two module groups (q_proj, v_proj): a wider figure than tall; delta adds a row
    assert (img.shape[0] > img.shape[1] / 2) == (on == "delta")
    res = CliRunner().invoke(main, ["compare", ex, style, "--subspace", "--plot", png])
    assert res.exit_code == 1 and "[LT503]" in res.output
    res = CliRunner().invoke(main, ["compare", ex, style, "--subspace", "--plot", png,
                                    "--overwrite"])
    assert res.exit_code == 0, res.output


def test_missing_matplotlib_names_the_extra(tmp_path, examples_dir, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises
    png = str(tmp_path / "phi.png")
    ex = os.path.join(examples_dir, "adapter.safetensors")
    res = CliRunner().invoke(main, ["compare", ex, ex, "--subspace", "--plot", png])
    assert res.exit_code == 1
    assert "[LT537]" in res.output and "pip install 'loratool[plot]'" in res.output
    assert not os.path.exists(png)


def test_cli_inspect_base(tmp_path, examples_dir):
    ex = os.path.join(examples_dir, "adapter.safetensors")
    base = os.path.join(examples_dir, "base.safetensors")
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", ex, "--base", base, "--seed", "5", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["base"]["seed"] == 5
    assert report == json.loads(json.dumps(inspect(ex, base=base, seed=5)))
    assert all(r["amplification"]["rank"] == 8 for r in report["modules"])
    res = runner.invoke(main, ["inspect", ex, "--base", base])
    assert res.exit_code == 0, res.output
    assert "amplification against" in res.stdout and "seed 0" in res.stdout
    res = runner.invoke(main, ["inspect", ex, "--seed", "3"])
    assert res.exit_code == 2 and "--seed needs --base" in res.output


def test_cli_inspect_base_reads_kohya_names_against_the_base(examples_dir):
    kohya = os.path.join(examples_dir, "kohya_adapter.safetensors")
    base = os.path.join(examples_dir, "base.safetensors")
    report = inspect(kohya, base=base)
    assert {r["amplification"]["base_tensor"] for r in report["modules"]} == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
