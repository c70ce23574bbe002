"""The Python API takes what people pass (issue 10, item 18): one ``(adapter, scale)`` pair
instead of a list, and an in-memory ``Adapter`` wherever a path is; anything else is a
``LoraToolError`` with a code, never a raw TypeError."""

from __future__ import annotations

import pytest
import torch
from _merge_helpers import base_for, mixed_adapter
from safetensors.torch import load_file, save_file

from loratool.adapter import load_adapter, save_adapter
from loratool.errors import LoraToolError
from loratool.model import Adapter
from loratool.ops.compose import compare, compose
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge, unmerge
from loratool.ops.resize import resize


@pytest.fixture
def setup(tmp_path):
    full = mixed_adapter(0)
    ad = Adapter(modules={n: full.modules[n] for n in ("model.layers.0.q_proj",
                                                        "h.0.attn.c_attn")}, alpha=full.alpha)
    base = str(tmp_path / "base.safetensors")
    save_file(base_for(ad), base)
    ap = str(tmp_path / "a.safetensors")
    save_adapter(ad, ap)
    return ad, ap, base, tmp_path


def _same(p, q):
    a, b = load_file(p), load_file(q)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_unmerge_take_one_pair_and_adapters(setup):
    ad, ap, base, tmp = setup
    ref = merge(base, [(ap, 0.5)], output=str(tmp / "ref.safetensors")).output
    one = merge(base, (ap, 0.5), output=str(tmp / "one.safetensors")).output
    mem = merge(base, (ad, 0.5), output=str(tmp / "mem.safetensors")).output
    mem_list = merge(base, [(ad, 0.5)], output=str(tmp / "mem2.safetensors")).output
    assert _same(ref, one) and _same(ref, mem) and _same(ref, mem_list)
    back = unmerge(ref, (ad, 0.5), output=str(tmp / "back.safetensors")).output
    back2 = unmerge(ref, (ap, 0.5), output=str(tmp / "back2.safetensors")).output
    assert _same(back, back2)


@pytest.mark.parametrize("bad", [42, [(b"x", 1.0)], [("a", "x")], [("a", 1.0, 2.0)], {"a": 1}])
def test_merge_refuses_bad_adapter_arguments_with_a_code(setup, bad):
    _, _, base, tmp = setup
    with pytest.raises(LoraToolError) as e:
        merge(base, bad, output=str(tmp / "x.safetensors"))
    assert e.value.code == "LT520"


def test_compose_takes_one_pair_and_adapters(setup):
    ad, ap, _, _ = setup
    one = compose((ap, 0.5)).adapter
    ref = compose([(ad, 0.5)]).adapter
    for n, m in ref.modules.items():
        torch.testing.assert_close(one.modules[n].delta(torch.float64),
                                   m.delta(torch.float64), rtol=0, atol=0)
    with pytest.raises(LoraToolError) as e:
        compose(3.0)
    assert e.value.code == "LT534"


def test_other_operations_take_adapters(setup):
    ad, ap, _, tmp = setup
    assert resize(ad, rank=2).report["summary"] == resize(ap, rank=2).report["summary"]
    s = compare(ad, ap)["summary"]
    assert s == compare(ap, ap)["summary"]
    rep = convert(ad, str(tmp / "kohya.safetensors"), to="kohya")
    assert rep.source_format == "loratool" and rep.modules == 2
    rep = convert(ad, str(tmp / "copy.safetensors"))
    back = load_adapter(str(tmp / "copy.safetensors"))
    for n, m in ad.modules.items():
        assert torch.equal(back.modules[n].delta(torch.float64), m.delta(torch.float64))
    info = inspect(ad)
    assert info["totals"]["modules"] == 2 and info["path"] == "<in memory>"
    assert [r["name"] for r in info["modules"]] == [r["name"] for r in inspect(ap)["modules"]]
    stats = inspect(ad, stats=True)
    assert stats["modules"][0]["stats"]["norm"] == pytest.approx(
        inspect(ap, stats=True)["modules"][0]["stats"]["norm"])
    with pytest.raises(LoraToolError) as e:
        resize(42, rank=2)
    assert e.value.code == "LT520"
