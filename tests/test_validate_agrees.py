"""``validate`` and the readers agree (issue 10, item 9): for every invalid input we have (the
conformance vectors, the hostile suites' mutations of every format), what ``load_adapter``
(the reader ``merge``/``convert`` use) refuses, ``validate`` reports as an error with the same
code first, and what ``validate`` finds valid loads."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch
from _hostile_helpers import (build_seeds, kohya_mutations, loratool_metadata_mutations,
                              peft_dir_mutations, safetensors_mutations)

from safetensors.torch import load_file, save_file

from loratool.adapter import load_adapter
from loratool.errors import LoraToolError
from loratool.ops.validate import validate

VECTORS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec",
                       "vectors")
_SKIP_NAMES = ("fifo", "dev_zero", "huge_sparse")  # blocking/huge inputs: test_hostile's job


def _codes(path: str, **options) -> tuple[str | None, str | None]:
    """(validate's first error code, load_adapter's error code); None means "ok"."""
    rep = validate(path, **options)
    first = next((f.code for f in rep.findings if f.is_error), None)
    try:
        load_adapter(path, **options)
        loaded = None
    except LoraToolError as e:
        loaded = e.code
    return first, loaded


def _vector_cases():
    return sorted(p for p in glob.glob(os.path.join(VECTORS, "*", "*"))
                  if not p.endswith((".json", ".py", ".md")))


@pytest.mark.parametrize("path", _vector_cases(), ids=lambda p: os.path.relpath(p, VECTORS))
def test_vectors(path):
    first, loaded = _codes(path)
    assert first == loaded, (first, loaded)


@pytest.fixture(scope="module")
def mutated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("agree"))
    seeds = build_seeds(os.path.join(root, "seeds"))
    cases = []

    def write(name, blob, suffix=".safetensors"):
        p = os.path.join(root, name + suffix)
        with open(p, "wb") as f:
            f.write(blob)
        cases.append(p)

    for src, muts in ((seeds.loratool, safetensors_mutations),
                      (seeds.loratool, loratool_metadata_mutations),
                      (seeds.kohya, kohya_mutations)):
        data = open(src, "rb").read()
        tag = os.path.basename(src).split(".")[0]
        for name, blob in muts(data):
            write(f"{tag}-{muts.__name__}-{name}", blob)
    cases += [d for d in peft_dir_mutations(
        seeds.peft, lambda n: os.path.join(root, "peft-" + n))
        if not any(s in d for s in _SKIP_NAMES)]
    cases = [(c, {}) for c in cases]
    # what a reader needs from the user (alpha) or refuses unless told (unknown tensors)
    cases += [(seeds.loralib, {}), (seeds.loralib, {"alpha": 8.0})]
    bare = os.path.join(root, "peft_weights_without_config.safetensors")
    shutil.copy(os.path.join(seeds.peft, "adapter_model.safetensors"), bare)
    cases += [(bare, {}), (bare, {"alpha": 8.0})]
    tensors = load_file(seeds.kohya)
    tensors["lora_unet_x.hada_w1_a"] = torch.zeros(2, 2)
    extra = os.path.join(root, "kohya_with_loha_tensor.safetensors")
    save_file(tensors, extra)
    cases += [(extra, {}), (extra, {"allow_unknown": True})]
    extra_peft = os.path.join(root, "peft-extra")
    shutil.copytree(seeds.peft, extra_peft)
    w = os.path.join(extra_peft, "adapter_model.safetensors")
    tensors = load_file(w)
    tensors["base_model.model.score.weight"] = torch.zeros(2, 2)
    save_file(tensors, w)
    cases += [(extra_peft, {}), (extra_peft, {"allow_unknown": True})]
    return cases


@pytest.mark.slow
def test_mutations(mutated):
    disagree = []
    for path, options in mutated:
        first, loaded = _codes(path, **options)
        if first != loaded:
            disagree.append(f"{os.path.basename(path)} {options}: validate {first}, "
                            f"load {loaded}")
    assert not disagree, "\n".join(disagree)
