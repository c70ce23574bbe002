"""``loratool inspect`` and ``loratool validate`` through Click's CliRunner, plus the
subprocess checks: ``python -m loratool --version`` and no torch import on the fast paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from _vector_helpers import REPO, VECTORS, index, vectors
from loratool import __version__
from loratool.cli import main
from loratool.ops.inspect import inspect

V = os.path.join(VECTORS, "valid")
ALL_KINDS = os.path.join(V, "all_kinds.safetensors")
RANK_MISMATCH = os.path.join(VECTORS, "invalid", "rank_mismatch.safetensors")
ZERO_B = os.path.join(VECTORS, "warn", "zero_B.safetensors")
NAN = os.path.join(VECTORS, "invalid", "nan_f32.safetensors")
HASH_WRONG = os.path.join(VECTORS, "invalid", "tensor_hash_wrong.safetensors")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- inspect -------------------------------------------------------------------------------

def test_inspect_text():
    res = run("inspect", ALL_KINDS)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "loratool format 1.0" in out and "standard, default alpha 8" in out
    assert "4 (conv 1, embedding 1, linear 2)" in out
    for name in ("model.embed_tokens", "model.layers.0.self_attn.q_proj",
                 "transformer.h.0.attn.c_attn", "unet.conv_in"):
        assert name in out
    assert "linear (T)" in out and "conv 3x3" in out
    assert res.stderr == ""


def test_inspect_json_is_the_library_report():
    res = run("inspect", "--json", ALL_KINDS)
    assert res.exit_code == 0
    assert json.loads(res.stdout) == inspect(ALL_KINDS)


def test_inspect_other_metadata_and_optional_keys():
    report = json.loads(run("inspect", "--json", os.path.join(V, "linear_full.safetensors"))
                        .stdout)
    assert report["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert report["provenance"].endswith("caf\u00e9 \u2615")
    report = json.loads(run("inspect", "--json", os.path.join(V, "other_tools_keys.safetensors"))
                        .stdout)
    assert report["other_metadata"]["ss_network_dim"] == "2"


def test_inspect_stats_against_dense_svd(tmp_path):
    import torch

    from loratool.adapter import load_adapter
    res = run("inspect", "--stats", "--json", ALL_KINDS)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    adapter = load_adapter(ALL_KINDS)
    for row in report["modules"]:
        m = adapter.modules[row["name"]]
        dense = m.delta_matrix(torch.float64)
        S = torch.linalg.svdvals(dense)
        stats = row["stats"]
        assert stats["norm"] == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-12)
        assert stats["singular_values"] == pytest.approx(S[: m.rank].tolist(), rel=1e-10)
        assert stats["effective_rank"] == m.rank and stats["flags"] == []
    text = run("inspect", "--stats", ALL_KINDS).stdout
    assert "eff. rank" in text


def test_inspect_stats_effective_rank_and_flags(tmp_path):
    import torch

    from loratool.adapter import save_adapter
    from loratool.model import Adapter, LoraModule
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 1, generator=g)
    A = torch.randn(3, 8, generator=g)
    # B = [b, 2b, -b]: delta = b (a1 + 2 a2 - a3), numerically rank 1 although r = 3.
    low = LoraModule("low", "linear", "out_in", A, torch.cat([b, 2 * b, -b], 1), 3.0)
    path = tmp_path / "low.safetensors"
    save_adapter(Adapter(modules={"low": low}, alpha=3.0), path)
    stats = json.loads(run("inspect", "--stats", "--json", path).stdout)["modules"][0]["stats"]
    assert stats["effective_rank"] == 1
    assert stats["singular_values"][1] < 1e-6 * stats["singular_values"][0]

    zero = json.loads(run("inspect", "--stats", "--json", ZERO_B).stdout)["modules"][0]
    assert zero["stats"]["flags"] == ["zero_B"] and zero["stats"]["effective_rank"] == 0
    nan = json.loads(run("inspect", "--stats", "--json", NAN).stdout)["modules"][0]
    assert nan["stats"] == {"norm": None, "singular_values": [], "effective_rank": None,
                            "flags": ["nonfinite"]}


def test_inspect_invalid_file_is_an_error_not_a_traceback():
    res = run("inspect", RANK_MISMATCH)
    assert res.exit_code == 1
    assert res.stdout == ""
    assert res.stderr.startswith(f"Error: [LT205] {RANK_MISMATCH}: module ")
    assert "Traceback" not in res.output


def test_inspect_usage_errors_exit_2(tmp_path):
    assert run("inspect").exit_code == 2
    assert run("inspect", tmp_path / "missing.safetensors").exit_code == 2
    assert run("inspect", "--bogus", ALL_KINDS).exit_code == 2


# --- validate ------------------------------------------------------------------------------

def test_validate_text():
    res = run("validate", ALL_KINDS, ZERO_B)
    assert res.exit_code == 0, res.output
    assert f"ok  {ALL_KINDS} (loratool)" in res.stdout
    assert "warning LT210" in res.stdout
    assert "2 file(s), 0 error(s), 1 warning(s)" in res.stdout

    res = run("validate", ALL_KINDS, RANK_MISMATCH)
    assert res.exit_code == 1
    assert f"INVALID  {RANK_MISMATCH}" in res.stdout
    assert "error LT205" in res.stdout and "has rank 2 but lora_B [4, 3] has rank 3" in (
        res.stdout.replace("\n", " "))
    assert "2 file(s), 1 error(s), 0 warning(s)" in res.stdout


@pytest.mark.parametrize("flag", [["--json"], ["--format", "json"]])
def test_validate_json(flag):
    res = run("validate", *flag, ALL_KINDS, RANK_MISMATCH, ZERO_B)
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["valid"] is False
    assert data["summary"] == {"files": 3, "errors": 1, "warnings": 1}
    files = {f["path"]: f for f in data["files"]}
    assert files[ALL_KINDS] == {"path": ALL_KINDS, "source_format": "loratool", "valid": True,
                                "findings": []}
    (f,) = files[RANK_MISMATCH]["findings"]
    assert (f["code"], f["level"], f["severity"], f["module"]) == (
        "LT205", "MUST", "error", "model.layers.0.self_attn.q_proj")
    (w,) = files[ZERO_B]["findings"]
    assert (w["code"], w["level"], w["severity"]) == ("LT210", "SHOULD", "warning")
    assert files[ZERO_B]["valid"] is True


def test_validate_github_annotations():
    res = run("validate", "--format", "github", RANK_MISMATCH, ZERO_B)
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"::error file={RANK_MISMATCH},title=LT205::[LT205] module ")
    assert lines[1].startswith(f"::warning file={ZERO_B},title=LT210::[LT210] ")
    assert lines[2] == "2 file(s), 1 error(s), 1 warning(s)"


def test_validate_directories():
    res = run("validate", "--json", V)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["summary"]["files"] == len(vectors("valid"))
    assert sorted(f["path"] for f in data["files"]) == sorted(vectors("valid"))

    res = run("validate", "--json", VECTORS)  # every vector, recursively
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["summary"]["files"] == len(index())
    assert data["summary"]["errors"] >= len(vectors("invalid"))
    assert data["summary"]["warnings"] == len(vectors("warning"))


def test_validate_header_only_skips_the_data_rules():
    assert run("validate", HASH_WRONG).exit_code == 1
    assert run("validate", NAN).exit_code == 1
    assert run("validate", "--header-only", HASH_WRONG).exit_code == 0
    assert run("validate", "--header-only", NAN).exit_code == 0
    assert run("validate", "--header-only", RANK_MISMATCH).exit_code == 1


def test_validate_files_that_are_not_adapters(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_bytes(b"not a safetensors file at all")  # the first 8 bytes read as 2**63-ish
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    res = run("validate", "--json", text, empty)
    assert res.exit_code == 1
    found = [f["findings"] for f in json.loads(res.stdout)["files"]]
    assert [[f["code"] for f in x] for x in found] == [["LT002"], ["LT001"]]


@pytest.mark.parametrize("args", [[], ["--format", "xml", ALL_KINDS], ["/no/such/file"],
                                  ["--bogus", ALL_KINDS]])
def test_validate_usage_errors_exit_2(args):
    res = run("validate", *args)
    assert res.exit_code == 2
    assert "Usage:" in res.stderr


# --- the process: version, imports ---------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_python_m_loratool_version():
    res = subprocess.run([sys.executable, "-m", "loratool", "--version"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"loratool {__version__} (adapter format 1.2)"


NO_TORCH = """
import sys
from loratool.cli import main
try:
    main({args!r}, prog_name="loratool")
except SystemExit as e:
    code = e.code
assert code == {code}, code
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not leaked, leaked[:5]
print("ok")
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["inspect", ALL_KINDS], 0),
    (["inspect", "--json", ALL_KINDS], 0),
    (["inspect", RANK_MISMATCH], 1),
    (["validate", ALL_KINDS, RANK_MISMATCH, ZERO_B, NAN], 1),
    (["validate", "--format", "github", V], 0),
    (["validate", "--help"], 0),
], ids=lambda x: "-".join(os.path.basename(str(a)) for a in x) if isinstance(x, list) else None)
def test_fast_paths_do_not_import_torch(args, code):
    res = _python(NO_TORCH.format(args=args, code=code))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.endswith("ok\n")
