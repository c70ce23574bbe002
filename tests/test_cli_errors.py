"""The CLI's one error translation (cli.LazyGroup.invoke): read failures are LT507, failed
writes of an output LT505, never the other way round (spec/README.md, "Codes of every
command")."""

from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from loratool.cli import main
from loratool.rules import COMMAND_CODES, READ_FAILED, WRITE_FAILED


def _run_with(monkeypatch, exc, tiny_adapter_path):
    import loratool.commands.inspect as cmd

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(cmd, "inspect", boom)
    return CliRunner().invoke(main, ["inspect", tiny_adapter_path])


@pytest.mark.parametrize("exc", [
    PermissionError(errno.EACCES, "Permission denied", "/data/adapter.safetensors"),
    OSError(errno.EIO, "Input/output error", "/data/base.safetensors"),
    OSError(errno.ENOENT, "No such file or directory"),
])
def test_an_oserror_reading_an_input_is_a_read_failure(monkeypatch, tiny_adapter_path, exc):
    r = _run_with(monkeypatch, exc, tiny_adapter_path)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: [{READ_FAILED}]"), r.stderr
    assert "cannot read" in r.stderr and exc.strerror in r.stderr
    if exc.filename:
        assert exc.filename in r.stderr


def test_an_oserror_on_a_temporary_output_is_a_write_failure(monkeypatch, tiny_adapter_path):
    exc = OSError(errno.EIO, "Input/output error", "/out/.loratool-tmp-abc.safetensors")
    r = _run_with(monkeypatch, exc, tiny_adapter_path)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: [{WRITE_FAILED}]"), r.stderr


def test_codes_are_documented():
    assert READ_FAILED == "LT507" and WRITE_FAILED == "LT505"
    import os
    spec = open(os.path.join(os.path.dirname(__file__), "..", "spec", "README.md")).read()
    for code in COMMAND_CODES:
        assert f"| {code} |" in spec, code
