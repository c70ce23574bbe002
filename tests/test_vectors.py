"""Conformance vectors (spec/vectors): one test per vector, and the vectors against the rules.

Invalid vectors break exactly one MUST rule: ``validate`` reports exactly that code and
``loratool validate`` exits 1. Warn vectors break one SHOULD rule and still exit 0. Valid
vectors validate clean and ``inspect`` matches their expected report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from _vector_helpers import (SPEC, VECTORS, expected_code, index, sidecar, vector_id,
                             vectors)
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.ops.inspect import inspect
from loratool.ops.validate import validate
from loratool.rules import MUST, RULES, SHOULD
from loratool.lycoris.codes import LYCORIS_RULES
from loratool.stfile import read_header

VALID = vectors("valid")
WARN = vectors("warning")
INVALID = vectors("invalid")

# MUST rules no file can break on its own (none at present).
NOT_SHOWABLE: set[str] = set()
# Rules about LyCORIS modules (LT230-LT244): each code is produced by a malformed LyCORIS
# module in tests/test_lycoris_core.py (test_every_lycoris_code_is_tested...); some also have
# vectors, as LyCORIS kinds of the loratool format (1.2).
LYCORIS_FILE_RULES: set[str] = set(LYCORIS_RULES)


def _codes(report) -> list[str]:
    return sorted({f.code for f in report.findings})


# --- the set of vectors ----------------------------------------------------------------------

def test_index_matches_folders():
    listed = {os.path.join(VECTORS, v["path"]) for v in index()}
    on_disk = {os.path.join(VECTORS, d, f) for d in ("valid", "warn", "invalid")
               for f in os.listdir(os.path.join(VECTORS, d)) if f.endswith(".safetensors")}
    assert listed == on_disk
    assert len(VALID) >= 15 and len(INVALID) >= 40 and len(WARN) == 4


def test_every_rule_has_a_vector():
    must = {c for c, (level, _) in RULES.items() if level == MUST}
    should = {c for c, (level, _) in RULES.items() if level == SHOULD}
    invalid_codes = {expected_code(p) for p in INVALID}
    warn_codes = {expected_code(p) for p in WARN}
    # LyCORIS rules have vectors where a loratool file's LyCORIS kinds (1.2) break them
    assert must - NOT_SHOWABLE - LYCORIS_FILE_RULES <= invalid_codes
    assert invalid_codes - LYCORIS_FILE_RULES == must - NOT_SHOWABLE - LYCORIS_FILE_RULES
    assert warn_codes == should


def test_vectors_are_tiny():
    for v in index():
        assert os.path.getsize(os.path.join(VECTORS, v["path"])) < 4096, v["path"]


def test_generator_reproduces_the_committed_bytes(tmp_path):
    script = os.path.join(VECTORS, "generate.py")
    run = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    produced = sorted(os.path.relpath(os.path.join(root, f), tmp_path)
                      for root, _, files in os.walk(tmp_path) for f in files)
    committed = sorted(os.path.relpath(os.path.join(root, f), VECTORS)
                       for root, _, files in os.walk(VECTORS) for f in files
                       if f.endswith((".safetensors", ".json")))
    assert produced == committed
    for rel in produced:
        with open(tmp_path / rel, "rb") as a, open(os.path.join(VECTORS, rel), "rb") as b:
            assert a.read() == b.read(), f"{rel} differs: run python spec/vectors/generate.py"


# --- valid -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", VALID, ids=vector_id)
def test_valid_vector(path):
    report = validate(path)
    assert report.ok and report.findings == []
    got = inspect(path)
    assert got.pop("path") == path
    assert got == sidecar(path, ".inspect.json")


@pytest.mark.parametrize("path", VALID, ids=vector_id)
def test_valid_vector_cli(path):
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", "--json", path])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    got.pop("path")
    assert got == sidecar(path, ".inspect.json")
    res = runner.invoke(main, ["validate", path])
    assert res.exit_code == 0, res.output
    assert "0 error(s), 0 warning(s)" in res.stdout


CANONICAL = [os.path.join(VECTORS, v["path"]) for v in index()
             if v["expect"] == "valid" and v["canonical"]]


@pytest.mark.parametrize("path", CANONICAL, ids=vector_id)
def test_canonical_vector_is_what_save_adapter_writes(path, tmp_path):
    # The generator does not import loratool: this checks save_adapter against the spec's
    # byte rules (name order, canonical JSON, padding, alpha spelling, tensor hash).
    from loratool.adapter import load_adapter, save_adapter
    out = tmp_path / "resaved.safetensors"
    save_adapter(load_adapter(path), out)
    with open(path, "rb") as f:
        assert out.read_bytes() == f.read()


def test_newer_minor_version_is_read_and_rewritten_as_1_0(tmp_path):
    from loratool.adapter import load_adapter, save_adapter
    path = os.path.join(VECTORS, "valid", "newer_minor_1_7.safetensors")
    assert read_header(path).metadata["loratool.future_option"]
    out = tmp_path / "rewritten.safetensors"
    save_adapter(load_adapter(path), out)
    meta = read_header(out).metadata
    assert meta["loratool.format_version"] == "1.0"
    assert "loratool.future_option" not in meta  # unknown loratool.* keys are dropped
    assert "dropout" not in meta["loratool.modules"]


# --- warnings and invalid files --------------------------------------------------------------

@pytest.mark.parametrize("path", WARN, ids=vector_id)
def test_warn_vector(path):
    code = expected_code(path)
    report = validate(path)
    assert _codes(report) == [code]
    assert report.ok, "a SHOULD finding is a warning: the file stays valid"
    res = CliRunner().invoke(main, ["validate", path])
    assert res.exit_code == 0, res.output
    assert f"warning {code}" in res.stdout


@pytest.mark.parametrize("path", INVALID, ids=vector_id)
def test_invalid_vector(path):
    code = expected_code(path)
    report = validate(path)
    assert _codes(report) == [code], [f.message for f in report.findings]
    assert not report.ok
    res = CliRunner().invoke(main, ["validate", "--format", "json", path])
    assert res.exit_code == 1, res.output
    found = json.loads(res.stdout)["files"][0]["findings"]
    assert {f["code"] for f in found} == {code}
    assert all(f["level"] == "MUST" and f["severity"] == "error" for f in found)


@pytest.mark.parametrize("path", INVALID, ids=vector_id)
def test_invalid_vector_refused_by_load_adapter(path):
    from loratool.adapter import load_adapter
    with pytest.raises(LoraToolError) as e:
        load_adapter(path)
    assert e.value.code == expected_code(path)
    assert "Traceback" not in str(e.value)


# --- the JSON schema of __metadata__ ---------------------------------------------------------

def _schema():
    with open(os.path.join(SPEC, "metadata.schema.json"), encoding="utf-8") as f:
        return json.load(f)


def _schema_errors(metadata: dict) -> list[str]:
    """Errors of the metadata against the schema, the JSON-in-string values included."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    v = jsonschema.Draft202012Validator(schema)
    errors = [e.message for e in v.iter_errors(metadata)]
    for key in ("loratool.target_modules", "loratool.modules"):
        if key not in metadata:
            continue
        try:
            decoded = json.loads(metadata[key])
        except ValueError:
            errors.append(f"{key} is not JSON")
            continue
        sub = dict(schema["properties"][key]["contentSchema"], **{"$defs": schema["$defs"]})
        errors += [e.message for e in jsonschema.Draft202012Validator(sub).iter_errors(decoded)]
    return errors


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(_schema())


@pytest.mark.parametrize("path", VALID + WARN, ids=vector_id)
def test_schema_accepts_valid_metadata(path):
    assert _schema_errors(read_header(path).metadata) == []


# Vectors the schema cannot reject: 1e400 and a 400-digit integer are well-formed numbers that
# overflow float64, and Python's re (which the jsonschema package uses) lets "$" match before
# a final newline.
SCHEMA_BLIND = {"alpha_overflow", "alpha_record_huge_integer", "version_trailing_newline",
                "base_model_hash_trailing_newline", "module_name_trailing_newline"}
SCHEMA_CODES = {"LT101", "LT102", "LT103", "LT104", "LT105", "LT106", "LT107", "LT109"}


@pytest.mark.parametrize(
    "path", [p for p in INVALID if expected_code(p) in SCHEMA_CODES
             and vector_id(p) not in SCHEMA_BLIND], ids=vector_id)
def test_schema_rejects_invalid_metadata(path):
    assert _schema_errors(read_header(path).metadata)


def test_schema_lists_every_known_key():
    from loratool import format as F
    assert set(_schema()["properties"]) == set(F.KNOWN_KEYS)
    assert set(_schema()["required"]) == {F.KEY_FORMAT, F.KEY_VERSION, F.KEY_SCALING,
                                          F.KEY_ALPHA, F.KEY_TARGETS, F.KEY_MODULES}
