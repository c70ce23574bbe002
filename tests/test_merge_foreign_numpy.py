"""merge's torch-free reading of foreign safetensors adapters (PEFT, kohya): the numpy loader
gives the same output bytes, report and adapter identity as the torch loader, its NaN/Inf
check refuses what torch's refuses, and a merge of such adapters never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _merge_helpers import base_for, mixed_adapter
from safetensors.torch import load_file, save_file

from loratool.errors import LoraToolError
from loratool.interop import get_format
from loratool.interop.base import ReaderOptions
from loratool.ops.merge import adapter_identity, npadapter
from loratool.ops.merge.job import Engines, run_with
from loratool.ops.merge.plan import reader_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _adapter(seed: int, dtype, *, bias: bool):
    ad = mixed_adapter(seed, dtype=dtype, bias=bias)
    # PEFT has no lora_bias on embeddings, kohya no embeddings at all
    ad.modules = {n: m for n, m in ad.modules.items() if n != "embed_tokens"}
    return ad


def _files(tmp_path, dtype, adapter_dtype):
    peft_ad = _adapter(1, adapter_dtype, bias=True)
    kohya_ad = _adapter(2, adapter_dtype, bias=False)
    base = str(tmp_path / "base.safetensors")
    save_file(base_for(peft_ad, dtype), base)
    peft_dir = str(tmp_path / "peft")
    get_format("peft").save(peft_ad, peft_dir, ReaderOptions())
    kohya = str(tmp_path / "kohya.safetensors")
    get_format("kohya").save(kohya_ad, kohya, ReaderOptions())
    return base, peft_dir, kohya


def _merge_both(tmp_path, base, adapters, **kw):
    out, reports = [], []
    for use_numpy in (True, False):
        path = str(tmp_path / f"out-{use_numpy}.safetensors")
        rep = run_with(Engines(numpy_loader=use_numpy), "merge", base, adapters, output=path,
                       device="cpu", overwrite=True, **kw)
        d = rep.to_dict()
        for k in ("seconds", "stream_seconds", "output"):
            d.pop(k)
        reports.append(d)
        out.append(open(path, "rb").read())
    return out, reports


def test_whole_merge_same_bytes_with_every_kernel(tmp_path):
    """End to end (reader, engine, writer): the compiled kernel (when built), the numpy fast
    kernel and the reference kernel write the same file (one adapter: the fast kernels run)."""
    from loratool.ops.merge.exact import EXTENSION
    base, peft_dir, kohya = _files(tmp_path, torch.bfloat16, torch.bfloat16)
    kernels = [Engines(compiled=False), Engines(fast=False)]
    if EXTENSION is not None:
        kernels.append(Engines(compiled=True))
    for out_dtype in ("keep", "fp16", "fp32"):
        outs = set()
        for k, engines in enumerate(kernels):
            path = str(tmp_path / f"k{k}.safetensors")
            run_with(engines, "merge", base, [(peft_dir, 0.7)], output=path,
                     device="cpu", dtype=out_dtype)
            outs.add(open(path, "rb").read())
            os.remove(path)
        assert len(outs) == 1, out_dtype


@pytest.mark.parametrize("out_dtype", ["keep", "bf16", "fp16"])
@pytest.mark.parametrize("base_dtype,adapter_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_peft_and_kohya_numpy_bytes_equal_torch(tmp_path, base_dtype, adapter_dtype,
                                                 out_dtype):
    base, peft_dir, kohya = _files(tmp_path, base_dtype, adapter_dtype)
    # linear out_in and in_out (Conv1D, from the base's shape), conv 1x1 / 3x3, rsLoRA,
    # lora_bias; both adapters into one base, each with its own scale
    (bn, bt), (rn, rt) = _merge_both(tmp_path, base, [(peft_dir, 0.7), (kohya, -1.3)],
                                     dtype=out_dtype)
    assert bn == bt
    assert rn == rt
    assert [a["source_format"] for a in rn["adapters"]] == ["peft", "kohya"]


def test_identity_equals_torch_identity(tmp_path):
    base, peft_dir, kohya = _files(tmp_path, torch.float32, torch.bfloat16)
    for src, fmt in ((peft_dir, "peft"), (kohya, "kohya")):
        opts = reader_options(fmt, base, None, None)
        assert npadapter.header_allows_numpy(src, opts)
        np_ad, _ = npadapter.load_foreign_numpy(src, fmt, opts)
        torch_ad = get_format(fmt).load(src, opts)
        assert np_ad.identity == adapter_identity(torch_ad)
        for name, m in torch_ad.modules.items():  # the factors: the stored values, exactly
            B2, A2 = m.factors(torch.float64)
            nB, nA = np_ad.modules[name].factors()
            assert np.array_equal(np.asarray(nB, np.float64), B2.numpy())
            assert np.array_equal(np.asarray(nA, np.float64), A2.numpy())


def test_not_numpy_for_dora_and_pickles(tmp_path):
    dora_ad = mixed_adapter(3, dora=True)
    dora_ad.modules = {n: m for n, m in dora_ad.modules.items() if m.magnitude is not None
                       and n != "embed_tokens"}
    base = str(tmp_path / "base.safetensors")
    save_file(base_for(_adapter(3, torch.float32, bias=False)), base)
    opts = reader_options("peft", base, None, None)
    dora = str(tmp_path / "dora")
    get_format("peft").save(dora_ad, dora, ReaderOptions())
    assert not npadapter.header_allows_numpy(dora, opts)
    # a PEFT directory whose weights are a pickle: torch reads it
    plain = _adapter(4, torch.float32, bias=False)
    pdir = tmp_path / "pickled"
    get_format("peft").save(plain, str(pdir), ReaderOptions())
    weights = load_file(str(pdir / "adapter_model.safetensors"))
    torch.save(weights, str(pdir / "adapter_model.bin"))
    os.remove(str(pdir / "adapter_model.safetensors"))
    assert npadapter.header_allows_numpy(str(tmp_path / "plain"), opts) is False  # missing
    assert not npadapter.header_allows_numpy(str(pdir), opts)
    for src in (dora, str(pdir)):
        with pytest.raises(LoraToolError) as e:
            run_with(Engines(numpy_loader=True), "merge", base, [src], device="cpu",
                     output=str(tmp_path / "o.safetensors"), overwrite=True)
        assert e.value.code == "LT522"
        # the default picks the torch loader for them, and merges
        rep = run_with(Engines(), "merge", base, [src], device="cpu", overwrite=True,
                       output=str(tmp_path / "o.safetensors"))
        assert rep.modules_merged == len(get_format("peft").read_info(src, opts).modules)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_nan_in_adapter_refused_like_torch(tmp_path, fmt):
    base, peft_dir, kohya = _files(tmp_path, torch.float32, torch.bfloat16)
    path = os.path.join(peft_dir, "adapter_model.safetensors") if fmt == "peft" else kohya
    tensors = load_file(path)
    meta = json.loads(open(path, "rb").read()[8:8 + int.from_bytes(
        open(path, "rb").read(8), "little")]).get("__metadata__")
    key = sorted(k for k in tensors if "lora_B" in k or "lora_up" in k)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, path, metadata=meta)
    codes = []
    for use_numpy in (True, False):
        with pytest.raises(LoraToolError) as e:
            run_with(Engines(numpy_loader=use_numpy), "merge", base,
                     [peft_dir if fmt == "peft" else kohya], device="cpu",
                     output=str(tmp_path / "o.safetensors"))
        codes.append((e.value.code, str(e.value)))
    assert codes[0] == codes[1] and codes[0][0] == "LT209"
    assert not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.slow
def test_merge_of_real_peft_and_kohya_adapters_does_not_import_torch(tmp_path):
    pytest.importorskip("peft")
    from _interop_helpers import randomize_lora, save_state_dict, tiny_llama
    from peft import LoraConfig, get_peft_model
    model = tiny_llama()
    base = save_state_dict(model, str(tmp_path / "base.safetensors"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize_lora(peft_model, seed=5)
    peft_dir = str(tmp_path / "peft")
    peft_model.save_pretrained(peft_dir)
    kohya = str(tmp_path / "kohya.safetensors")
    get_format("kohya").save(get_format("peft").load(peft_dir, ReaderOptions()), kohya,
                             ReaderOptions())
    for src in (peft_dir, kohya):
        out = str(tmp_path / "np.safetensors")
        code = f"""
import sys
from loratool.ops.merge import merge
rep = merge({base!r}, [({src!r}, 0.5)], output={out!r}, device="cpu", overwrite=True,
            dtype="bf16")
assert rep.modules_merged == 14, rep.modules_merged
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not leaked, leaked[:5]
print("ok")
"""
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
        ref = str(tmp_path / "torch.safetensors")
        run_with(Engines(numpy_loader=False), "merge", base, [(src, 0.5)], output=ref,
                 device="cpu", overwrite=True, dtype="bf16")
        assert open(out, "rb").read() == open(ref, "rb").read()
