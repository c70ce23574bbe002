"""merge / unmerge containers and surfaces: sharded directories, .pt bases, inspect, the CLI,
atomicity, and the unmerge(merge(W)) property."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest
import torch
from _merge_helpers import NAMES, base_for, bits, check_rounded_once, mixed_adapter, ref_merge
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool import format as F
from loratool.adapter import save_adapter
from loratool.checkpoint import SIDECAR_SUFFIX, list_tensors, load_pickle_state_dict
from loratool.cli import main
from loratool.errors import LoraToolError
from loratool.model import Adapter, LoraModule
from loratool.ops.inspect import inspect
from loratool.ops.merge import adapter_identity, merge, unmerge

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def _adapter_file(tmp_path, ad, name="adapter.safetensors") -> str:
    p = str(tmp_path / name)
    save_adapter(ad, p, overwrite=True)
    return p


def _sharded(tmp_path, base: dict, name="model") -> str:
    """A Hugging Face style directory: two shards, an index with total_size, config files."""
    root = tmp_path / name
    root.mkdir()
    names = list(base)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in parts.items():
        save_file({k: base[k] for k in keys}, str(root / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    total = sum(t.numel() * t.element_size() for t in base.values())
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text('{"model_type": "tiny"}')
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return str(root)


def _check_exact(out: dict, base: dict, adapters) -> None:
    for name, (value, bound) in ref_merge(base, adapters, with_error=True).items():
        check_rounded_once(bits(out[name]), value, bound, out[name].dtype, name)


# --- sharded directories ---------------------------------------------------------------------

def test_sharded_round_trip(tmp_path):
    ad = mixed_adapter(30, bias=True)
    base = base_for(ad, torch.bfloat16)
    root = _sharded(tmp_path, base)
    ap = _adapter_file(tmp_path, ad)
    report = merge(root, [(ap, 0.5)], device="cpu")
    assert report.output == root + "-merged" and report.output_format == "sharded"
    out_root = report.output
    assert sorted(os.listdir(out_root)) == sorted(os.listdir(root))
    assert open(os.path.join(out_root, "config.json")).read() == '{"model_type": "tiny"}'
    assert os.path.exists(os.path.join(out_root, "tokenizer", "vocab.txt"))
    index = json.load(open(os.path.join(out_root, "model.safetensors.index.json")))
    old = json.load(open(os.path.join(root, "model.safetensors.index.json")))
    assert index["weight_map"] == old["weight_map"]
    assert index["metadata"]["total_size"] == old["metadata"]["total_size"]
    records = json.loads(index["metadata"][F.KEY_MERGED])
    assert records[0]["adapters"][0]["identity"] == adapter_identity(ad)
    for shard in set(old["weight_map"].values()):
        with safe_open(os.path.join(out_root, shard), "pt") as f:
            assert f.metadata()[F.KEY_MERGED] == index["metadata"][F.KEY_MERGED]
            assert f.metadata()["format"] == "pt"
            assert set(f.keys()) == {k for k, v in old["weight_map"].items() if v == shard}
    merged = {n: t for shard in set(old["weight_map"].values())
              for n, t in load_file(os.path.join(out_root, shard)).items()}
    _check_exact(merged, base, [(ad, 0.5)])
    # inspect shows the record, header-only
    rep = inspect(out_root)
    assert rep["source_format"] == "merged-checkpoint" and rep["checkpoint"] == "sharded"
    assert rep["merged"] == records and rep["tensors"] == len(base)
    # unmerge back; dtype change updates total_size
    back = unmerge(out_root, [(ap, 0.5)], device="cpu", dtype="fp32")
    index2 = json.load(open(os.path.join(back.output, "model.safetensors.index.json")))
    assert F.KEY_MERGED not in index2["metadata"]
    assert index2["metadata"]["total_size"] == sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in base.values())
    restored = {n: t for shard in set(old["weight_map"].values())
                for n, t in load_file(os.path.join(back.output, shard)).items()}
    for n, w in base.items():
        if w.is_floating_point():
            W, M = w.double(), merged[n].double()
            U = restored[n].double()
            bound = EPS[torch.bfloat16] * (W.abs() + M.abs()) * 1.0001 + TINY[torch.bfloat16]
            assert bool(((U - W).abs() <= bound).all()), n


def test_sharded_failure_leaves_nothing(tmp_path):
    ad = mixed_adapter(31)
    base = base_for(ad, torch.float16)
    root = _sharded(tmp_path, base)
    ap = _adapter_file(tmp_path, ad)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(Exception, match="NaN/Inf"):
        merge(root, [(ap, 1e7)], device="cpu")
    assert sorted(os.listdir(tmp_path)) == before


# --- .pt bases ---------------------------------------------------------------------------------

def test_pt_base_to_pt_and_safetensors(tmp_path):
    ad = mixed_adapter(32, bias=True)
    base = base_for(ad, torch.float32)
    pt = str(tmp_path / "model.pt")
    torch.save(base, pt)
    ap = _adapter_file(tmp_path, ad)
    report = merge(pt, [(ap, 1.5)], device="cpu")
    assert report.output == str(tmp_path / "model-merged.pt") and report.output_format == "pt"
    out = load_pickle_state_dict(report.output)
    assert list(out) == list(base)
    _check_exact(out, base, [(ad, 1.5)])
    side = json.load(open(report.output + SIDECAR_SUFFIX))
    assert json.loads(side[F.KEY_MERGED])[0]["adapters"][0]["scale"] == 1.5
    assert inspect(report.output)["merged"][0]["adapters"][0]["identity"] == \
        adapter_identity(ad)
    # unmerge reads the record from the sidecar
    back = unmerge(report.output, [(ap, 1.5)], device="cpu")
    assert not os.path.exists(back.output + SIDECAR_SUFFIX)
    # asked for safetensors by suffix (a .pt base can become safetensors)
    st_out = merge(pt, [(ap, 1.5)], device="cpu", output=str(tmp_path / "m.safetensors"))
    assert st_out.output_format == "safetensors"
    assert load_file(st_out.output).keys() == out.keys()
    # and by --output-format, next to the base
    r3 = merge(pt, [(ap, 1.5)], device="cpu", output_format="safetensors")
    assert r3.output == str(tmp_path / "model-merged.safetensors")
    # a safetensors base written as .pt
    sbase = str(tmp_path / "s.safetensors")
    save_file(base, sbase)
    r4 = merge(sbase, [(ap, 1.5)], device="cpu", output_format="pt")
    assert r4.output == str(tmp_path / "s-merged.pt")
    assert set(load_pickle_state_dict(r4.output)) == set(base)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".loratool-tmp")]


# --- property: unmerge(merge(W)) == W within the spec's bound ---------------------------------

@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(list(NAMES.values())),
       out_f=st.integers(1, 9), in_f=st.integers(1, 9), rank=st.integers(1, 4),
       scale=st.floats(-4, 4, allow_nan=False).filter(lambda s: abs(s) > 1e-3),
       wmag=st.sampled_from([1e-3, 1.0, 30.0]), dmag=st.sampled_from([1e-4, 1.0, 10.0]),
       seed=st.integers(0, 2**16))
def test_unmerge_merge_round_trip_property(dtype, out_f, in_f, rank, scale, wmag, dmag, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, in_f, generator=g)
    B = torch.randn(out_f, rank, generator=g) * dmag
    ad = Adapter(modules={"m": LoraModule("m", "linear", "out_in", A, B, float(rank))},
                 alpha=float(rank))
    W = (torch.randn(out_f, in_f, generator=g) * wmag).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        bp = os.path.join(d, "b.safetensors")
        save_file({"m.weight": W}, bp)
        ap = os.path.join(d, "a.safetensors")
        save_adapter(ad, ap)
        merged = merge(bp, [(ap, scale)], device="cpu")
        back = unmerge(merged.output, [(ap, scale)], device="cpu")
        M = load_file(merged.output)["m.weight"].double()
        U = load_file(back.output)["m.weight"].double()
    W = W.double()
    # spec/merge.md: |U - W| <= u (|W| + |M|) + tiny, u the unit roundoff of the dtype
    bound = EPS[dtype] * (W.abs() + M.abs()) * 1.0001 + TINY[dtype]
    assert bool(((U - W).abs() <= bound).all())
    if dtype == torch.float32:  # and, in ulps of W, a few when the delta is not larger than W
        small = (M.abs() <= 2 * W.abs()) & (W != 0)
        ulps = (U - W).abs()[small] / (W.abs()[small] * 2.0**-23)
        assert bool((ulps <= 3).all())


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_merge_unmerge_inspect(tmp_path):
    ad = mixed_adapter(33)
    base = base_for(ad)
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    ap = _adapter_file(tmp_path, ad)
    r = CliRunner().invoke(main, ["merge", bp, f"{ap}:0.5", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["output"] == str(tmp_path / "base-merged.safetensors")
    assert data["adapters"][0]["scale"] == 0.5 and data["modules_merged"] == 6
    for key in ("tensors_copied", "bytes_read", "bytes_written", "seconds", "records"):
        assert key in data
    r = CliRunner().invoke(main, ["merge", bp, f"{ap}:0.5", "--device", "cpu"])
    assert r.exit_code == 1 and "[LT503]" in r.stderr and "--overwrite" in r.stderr
    r = CliRunner().invoke(main, ["merge", bp, f"{ap}:0.5", "--device", "cpu", "--overwrite",
                                  "-q"])
    assert r.exit_code == 0 and "Merged" in r.stdout and "identity" in r.stdout
    r = CliRunner().invoke(main, ["unmerge", data["output"], ap, "--device", "cpu"])
    assert r.exit_code == 1 and "[LT413]" in r.stderr and f"{ap}:0.5" in r.stderr
    r = CliRunner().invoke(main, ["unmerge", data["output"], f"{ap}:0.5", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert os.path.exists(tmp_path / "base-merged-unmerged.safetensors")
    r = CliRunner().invoke(main, ["unmerge", data["output"], ap, "--device", "cpu", "--force",
                                  "-o", str(tmp_path / "forced.safetensors")])
    assert r.exit_code == 0 and "did not match" in r.stderr
    r = CliRunner().invoke(main, ["inspect", data["output"]])
    assert r.exit_code == 0 and "merged safetensors checkpoint" in r.stdout
    assert "scale 0.5" in r.stdout
    r = CliRunner().invoke(main, ["inspect", data["output"], "--json"])
    assert json.loads(r.stdout)["merged"][0]["adapters"][0]["scale"] == 0.5


def test_cli_errors(tmp_path):
    ad = mixed_adapter(34)
    base = base_for(ad)
    del base["embed_tokens.weight"]
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    ap = _adapter_file(tmp_path, ad)
    r = CliRunner().invoke(main, ["merge", bp, ap, "--device", "cpu"])
    assert r.exit_code == 1 and "[LT411]" in r.stderr and "embed_tokens" in r.stderr
    r = CliRunner().invoke(main, ["merge", bp, ap, "--device", "cpu", "--allow-missing"])
    assert r.exit_code == 0 and "skipped" in r.stderr and "embed_tokens" in r.stderr
    r = CliRunner().invoke(main, ["merge", bp, ap + ":abc"])
    assert r.exit_code == 2 and "trailing :NUMBER" in r.stderr
    r = CliRunner().invoke(main, ["merge", bp, ap, "--dtype", "fp8"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["merge", bp, ap, "-o", bp, "--overwrite", "--device", "cpu"])
    assert r.exit_code == 1 and "[LT502]" in r.stderr
    r = CliRunner().invoke(main, ["merge", bp, ap, "--map", "nonsense", "--device", "cpu"])
    assert r.exit_code == 1 and "[LT404]" in r.stderr


def test_cli_map_and_help(tmp_path):
    ad = Adapter(modules={"q": LoraModule("q", "linear", "out_in", torch.randn(2, 5),
                                          torch.randn(3, 2), 2.0)}, alpha=2.0)
    bp = str(tmp_path / "base.safetensors")
    save_file({"model.attn.q_proj.weight": torch.randn(3, 5)}, bp)
    ap = _adapter_file(tmp_path, ad)
    r = CliRunner().invoke(main, ["merge", bp, ap, "--device", "cpu"])
    assert r.exit_code == 1 and "`q`" in r.stderr
    r = CliRunner().invoke(main, ["merge", bp, ap, "--device", "cpu", "--map",
                                  "q=model.attn.q_proj", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["modules_merged"] == 1
    for cmd in ("merge", "unmerge"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "ADAPTER[:SCALE]" in r.stdout and "Examples" in r.stdout


def test_inspect_plain_checkpoint_is_not_merged(tmp_path):
    bp = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, bp)
    from loratool.ops.merge.provenance import merged_checkpoint_report
    assert merged_checkpoint_report(bp) is None
    assert list_tensors(bp)["w"].shape == (2,)


def test_write_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    # A full disk (or any write error) on the writer thread: the error reaches the caller,
    # the temporary file is removed, no output appears.
    from loratool.checkpoint import _writer_class
    ad = mixed_adapter(35)
    base = base_for(ad)
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    ap = _adapter_file(tmp_path, ad)
    calls = []
    write = _writer_class().write

    def boom(self, name, data):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write(self, name, data)

    monkeypatch.setattr(_writer_class(), "write", boom)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises((OSError, LoraToolError), match="No space left"):
        merge(bp, [ap], device="cpu")
    assert sorted(os.listdir(tmp_path)) == before
    calls.clear()
    r = CliRunner().invoke(main, ["merge", bp, ap, "--device", "cpu"])
    assert r.exit_code == 1 and "No space left" in r.stderr
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_stream_writer_positions_any_order(tmp_path, monkeypatch, kernel_copy):
    """The merge's writer puts each tensor at its offset: written in any order, unchanged ones
    copied in parts (by the kernel, or read and written where there is no copy_file_range),
    the file equals the one written in order; a tensor missing, written twice or of the wrong
    size is refused (nothing is left behind)."""
    import random
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)

    from loratool import checkpoint
    from loratool.errors import ContainerError
    from loratool.stfile import SafetensorsWriter
    rng = random.Random(5)
    entries = [(f"t{i}", "F32", (i % 3 + 1, 5)) for i in range(7)] + [("empty", "F32", (0,))]
    data = {n: os.urandom(4 * (int(s[0]) * (s[1] if len(s) > 1 else 1))) for n, _, s in entries}
    meta = {"k": "v"}
    want = str(tmp_path / "want.safetensors")
    with SafetensorsWriter(want, entries, meta) as w:
        for n, _, _ in entries:
            w.write(n, data[n])
        w.commit()
    src = str(tmp_path / "src.bin")
    with open(src, "wb") as f:
        f.write(b"".join(data[n] for n, _, _ in entries))
    offsets, pos = {}, 0
    for n, _, _ in entries:
        offsets[n], pos = pos, pos + len(data[n])
    got = str(tmp_path / "got.safetensors")
    order = [n for n, _, _ in entries]
    rng.shuffle(order)
    fd = os.open(src, os.O_RDONLY)
    try:
        with checkpoint.StreamWriter(got, entries, meta) as w:
            for i, n in enumerate(order):
                if i % 2:
                    w.write(n, data[n])
                else:  # copied in parts of 7 bytes, last part first
                    size = len(data[n])
                    for start in reversed(range(0, max(size, 1), 7)):
                        w.copy_from_fd(n, fd, offsets[n], size, start, min(size, start + 7))
            w.commit()
        with open(want, "rb") as a, open(got, "rb") as b:
            assert a.read() == b.read()
        for bad, code in (("missing", "LT008"), ("twice", "LT008"), ("size", "LT007")):
            dest = str(tmp_path / f"{bad}.safetensors")
            with pytest.raises(ContainerError) as e:
                with checkpoint.StreamWriter(dest, entries, meta) as w:
                    for n, _, _ in entries[: -2 if bad == "missing" else None]:
                        w.write(n, data[n] + (b"x" if bad == "size" else b""))
                    if bad == "twice":
                        w.write("t3", data["t3"])
                    w.commit()
            assert e.value.code == code
            assert not os.path.exists(dest)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["got.safetensors", "src.bin", "want.safetensors"]


def _base_with_untouched(tmp_path, seed: int):
    """(base file, adapter file, base tensors): the adapter's base plus a tensor it leaves."""
    ad = mixed_adapter(seed)
    base = base_for(ad)
    base["unrelated.weight"] = torch.randn(33, 17)
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    return bp, _adapter_file(tmp_path, ad), base


def test_merge_copies_unchanged_tensors_in_parts(tmp_path, monkeypatch):
    """Unchanged tensors copied in many small parts, between the merged tensors' writes: the
    output is the same file as with whole-tensor copies."""
    from loratool import checkpoint
    bp, ap, base = _base_with_untouched(tmp_path, 36)
    whole, parts = str(tmp_path / "whole.safetensors"), str(tmp_path / "parts.safetensors")
    merge(bp, [ap], output=whole, device="cpu")
    monkeypatch.setattr(checkpoint, "COPY_STEP", 12)
    merge(bp, [ap], output=parts, device="cpu")
    with open(whole, "rb") as a, open(parts, "rb") as b:
        assert a.read() == b.read()
    out = load_file(parts)
    assert torch.equal(out["unrelated.weight"], base["unrelated.weight"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice: Linux")
def test_reader_thread_yields_to_engine_and_writer(tmp_path, monkeypatch):
    """The reader thread runs READER_NICE levels below the engine (this thread) and the writer;
    the caller's own priority is left alone."""
    import threading

    from loratool.checkpoint import SafetensorsSource
    from loratool.ops.merge import streaming
    bp, ap, _ = _base_with_untouched(tmp_path, 37)
    seen = []
    read_into = SafetensorsSource.read_into

    def spy(self, t, out):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return read_into(self, t, out)

    monkeypatch.setattr(SafetensorsSource, "read_into", spy)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    merge(bp, [ap], output=str(tmp_path / "out.safetensors"), device="cpu")
    assert seen and set(seen) == {min(19, mine + streaming.READER_NICE)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_copy_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """A full disk while an unchanged tensor is copied (part by part, on the writer thread):
    the error reaches the caller as a failed write, nothing is left behind."""
    from loratool import checkpoint
    from loratool.checkpoint import _writer_class
    bp, ap, _ = _base_with_untouched(tmp_path, 38)
    monkeypatch.setattr(checkpoint, "COPY_STEP", 64)
    calls = []
    copy = _writer_class().copy_from_fd

    def full(self, *args):
        calls.append(args[0])
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return copy(self, *args)

    monkeypatch.setattr(_writer_class(), "copy_from_fd", full)
    before = sorted(os.listdir(tmp_path))
    r = CliRunner().invoke(main, ["merge", bp, ap, "--device", "cpu", "-o",
                                  str(tmp_path / "out.safetensors")])
    assert r.exit_code == 1 and "[LT505]" in r.stderr and "No space left" in r.stderr, r.stderr
    assert len(calls) == 5
    assert sorted(os.listdir(tmp_path)) == before


def test_progress_reports_every_byte_and_its_errors_propagate(tmp_path):
    ad = mixed_adapter(36)
    base = base_for(ad)
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    ap = _adapter_file(tmp_path, ad)
    seen = []
    merge(bp, [ap], device="cpu", progress=lambda n, total: seen.append((n, total)))
    total = sum(t.numel() * t.element_size() for t in base.values())
    assert sum(n for n, _ in seen) == total and {t for _, t in seen} == {total}
    assert len(seen) == len(base)

    def fail(n, total):
        raise KeyboardInterrupt

    before = sorted(os.listdir(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        merge(bp, [ap], device="cpu", progress=fail, output=str(tmp_path / "x.safetensors"))
    assert sorted(os.listdir(tmp_path)) == before
