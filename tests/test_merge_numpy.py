"""merge's torch-free path: loratool-format adapters loaded as numpy arrays give the same
bytes as the torch-loaded path, and `loratool merge` on such inputs never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _merge_helpers import NAMES, base_for, mixed_adapter
from safetensors.torch import save_file

from loratool.adapter import load_adapter, save_adapter
from loratool.errors import CheckpointError, LoraToolError, OperationError
from loratool.numerics import FLOAT_NP, as_float, round_into
from loratool.ops.merge import npadapter
from loratool.ops.merge.job import Engines, run_with
from loratool.ops.merge.options import cuda_may_exist
from loratool.ops.merge import adapter_identity, merge, unmerge
from loratool.tensors import round_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _files(tmp_path, base: dict, adapters) -> tuple[str, list[tuple[str, float]]]:
    base_path = str(tmp_path / "base.safetensors")
    save_file(base, base_path, metadata={"format": "pt"})
    paths = []
    for i, (ad, scale) in enumerate(adapters):
        p = str(tmp_path / f"adapter{i}.safetensors")
        save_adapter(ad, p, overwrite=True)
        paths.append((p, scale))
    return base_path, paths


def _both(tmp_path, base_path, paths, op=merge, **kw):
    """Run ``op`` with the adapters loaded by numpy and by torch; return both reports and
    the output bytes (directories: every file)."""
    reports, data = [], []
    for use_numpy in (True, False):
        out = str(tmp_path / f"out-{use_numpy}")
        if os.path.isfile(base_path):
            out += ".safetensors"
        rep = run_with(Engines(numpy_loader=use_numpy), op.__name__, base_path, paths,
                       output=out, device="cpu", **kw)
        reports.append(rep)
        if os.path.isdir(out):
            data.append({f: open(os.path.join(out, f), "rb").read()
                         for f in sorted(os.listdir(out))
                         if os.path.isfile(os.path.join(out, f))})
        else:
            data.append(open(out, "rb").read())
    return reports, data


def _same_report(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("seconds"), d.pop("stream_seconds"), d.pop("output")
    assert da == db


@pytest.mark.parametrize("out_dtype", list(OUT))
@pytest.mark.parametrize("base_dtype", list(NAMES))
def test_numpy_path_bytes_equal_torch_path(tmp_path, base_dtype, out_dtype):
    # every layer kind (linear out_in/in_out, conv 1x1 and 3x3, embedding, rsLoRA), lora_bias,
    # adapters stored in fp32, bf16 and fp16, three scales
    adapters = [(mixed_adapter(1, bias=True), 0.7),
                (mixed_adapter(2, dtype=torch.bfloat16), -1.3),
                (mixed_adapter(3, dtype=torch.float16, bias=True, rank=2), 0.25)]
    base = base_for(adapters[0][0], NAMES[base_dtype])
    base_path, paths = _files(tmp_path, base, adapters)
    (rn, rt), (bn, bt) = _both(tmp_path, base_path, paths, dtype=out_dtype)
    assert bn == bt
    _same_report(rn, rt)
    assert rn.tensors_merged == 8 and rn.modules_merged == 18


def test_numpy_path_matches_torch_sharded_and_unmerge(tmp_path):
    ad = mixed_adapter(4, bias=True)
    base = base_for(ad, torch.bfloat16)
    root = tmp_path / "model"
    root.mkdir()
    names = list(base)
    weight_map = {}
    for shard, keys in (("model-00001-of-00002.safetensors", names[: len(names) // 2]),
                        ("model-00002-of-00002.safetensors", names[len(names) // 2:])):
        save_file({k: base[k] for k in keys}, str(root / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    p = str(tmp_path / "a.safetensors")
    save_adapter(ad, p)
    (rn, rt), (bn, bt) = _both(tmp_path, str(root), [(p, 0.6)])
    assert bn == bt and len(bn) == 4
    _same_report(rn, rt)
    # unmerge of the merged file: the same on both paths too
    single = str(tmp_path / "one.safetensors")
    save_file(base, single)
    merged = merge(single, [(p, 0.6)], device="cpu").output
    (un, ut), (bn, bt) = _both(tmp_path, merged, [(p, 0.6)], op=unmerge)
    assert bn == bt
    _same_report(un, ut)


def test_identity_equals_torch_identity(tmp_path):
    for i, ad in enumerate((mixed_adapter(5, bias=True),
                            mixed_adapter(6, dtype=torch.bfloat16))):
        p = str(tmp_path / f"a{i}.safetensors")
        save_adapter(ad, p)
        assert npadapter.load_numpy(p).identity == adapter_identity(load_adapter(p))


def test_auto_chooses_numpy_only_when_it_can(tmp_path):
    ad = mixed_adapter(7)
    base = base_for(ad)
    base_path, paths = _files(tmp_path, base, [(ad, 1.0)])
    assert npadapter.header_allows_numpy(paths[0][0])
    dora = str(tmp_path / "dora.safetensors")
    save_adapter(mixed_adapter(7, dora=True), dora)
    assert not npadapter.header_allows_numpy(dora)
    with pytest.raises(OperationError) as e:
        run_with(Engines(numpy_loader=True), "merge", base_path, [dora], device="cpu")
    assert e.value.code == "LT522"
    # DoRA goes through the torch loader (and torch for the DoRA tensors) and still works
    rep = merge(base_path, [dora], device="cpu", output=str(tmp_path / "d.safetensors"))
    assert rep.tensors_merged > 0


def test_rounding_equals_torch_round_once():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, 20000),
        [1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 1 + 2**-8, 1 + 2**-11 + 2**-50,
         1 + 2**-24, 1 + 2**-24 + 2**-60, 2.0**-140, 2.0**-130, 2.0**-20, 6e-8, 65519.9,
         65520.0, 3.39e38, 3.3961e38, 3.4e38, 1e39, -1e300, 0.0, -0.0, np.inf, -np.inf],
        # midpoints of bf16/fp16/fp32 and a hair to either side
        [m + d for m in (1 + 2**-9, 1 + 2**-12, 1 + 2**-25) for d in (-2**-45, 0, 2**-45)],
    ]).astype(np.float64)
    for name, dt in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
        ref = round_once(torch.from_numpy(x.copy()), dt)
        ref_bits = ref.view({torch.float32: torch.int32, torch.float16: torch.int16,
                             torch.bfloat16: torch.int16}[dt]).numpy()
        dst = np.empty(x.shape, dtype=FLOAT_NP[name])
        round_into(dst, x, name)
        assert np.array_equal(dst.view(ref_bits.dtype), ref_bits), name
    nan = np.array([np.nan, -np.nan], dtype=np.float64)
    for name in ("F32", "F16", "BF16"):
        dst = np.empty(2, dtype=FLOAT_NP[name])
        round_into(dst, nan, name)
        assert np.isnan(as_float(dst, name)).all()


def test_numpy_path_errors(tmp_path):
    ad = mixed_adapter(8)
    base = base_for(ad, torch.float16)
    base_path, paths = _files(tmp_path, base, [(ad, 1.0)])
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError) as e:  # overflow of fp16: LT412, nothing written
        run_with(Engines(numpy_loader=True), "merge", base_path, [(paths[0][0], 1e6)],
                 output=out, device="cpu")
    assert e.value.code == "LT412" and not os.path.exists(out)
    # a tampered tensor byte: the tensor hash check of load_loratool, on the numpy loader
    raw = bytearray(open(paths[0][0], "rb").read())
    raw[-3] ^= 0x01
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(bytes(raw))
    with pytest.raises(LoraToolError) as e:
        npadapter.load_numpy(bad)
    assert e.value.code == "LT110"
    with pytest.raises(LoraToolError) as e:
        merge(base_path, [bad], output=out, device="cpu")
    assert e.value.code == "LT110" and not os.path.exists(out)


def test_cli_merge_does_not_import_torch(tmp_path):
    ad = mixed_adapter(9, bias=True)
    base_path, paths = _files(tmp_path, base_for(ad, torch.bfloat16), [(ad, 0.5)])
    out = str(tmp_path / "cli.safetensors")
    code = f"""
import sys
from loratool.cli import main
try:
    main(["merge", {base_path!r}, {paths[0][0] + ':0.5'!r}, "-o", {out!r}, "--quiet",
          "--device", "auto"], prog_name="loratool")
except SystemExit as e:
    assert e.code in (0, None), e.code
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not leaked, leaked[:5]
print("ok")
"""
    if cuda_may_exist():
        code = code.replace('"auto"', '"cpu"')
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr
    ref = run_with(Engines(numpy_loader=False), "merge", base_path, [(paths[0][0], 0.5)],
                   output=str(tmp_path / "ref.safetensors"), device="cpu")
    assert open(out, "rb").read() == open(ref.output, "rb").read()
