"""``--overwrite`` replaces a file by exchanging names (no flush on rename-over): the
destination is the old or the new file at every instant, and nothing is left behind."""

from __future__ import annotations

import os

from loratool import atomic
from loratool.atomic import AtomicFile, move_into_place


def test_overwrite_leaves_only_the_new_file(tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old" * 1000)
    with AtomicFile(dest, overwrite=True) as f:
        f.write(b"new")
    assert dest.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert oct(dest.stat().st_mode & 0o777) == "0o644"


def test_exchange_swaps_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"new")
    b.write_bytes(b"old")
    assert atomic._exchange(str(a), str(b))  # Linux, on the test's file system
    assert (a.read_bytes(), b.read_bytes()) == (b"old", b"new")


def test_fallback_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"new")
    b.write_bytes(b"old")
    move_into_place(str(a), str(b))
    assert b.read_bytes() == b"new" and not a.exists()
    c = tmp_path / "c"  # no destination yet: a plain rename
    b.rename(tmp_path / "t")
    move_into_place(str(tmp_path / "t"), str(c))
    assert c.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["c"]
