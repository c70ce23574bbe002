"""Shared fixtures: tiny seeded adapters and base checkpoints built in tmp_path."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI (CI=true) runs the same examples every time, so a red run is reproducible; developers get
# fresh random examples. No deadlines: the 2-core machines are shared and timing is noisy.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("LORATOOL_HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") else "dev"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


@pytest.fixture(autouse=True)
def _fresh_consoles():
    # CliRunner swaps sys.stdout per invocation; cached rich consoles would write to the old one.
    from loratool import console
    console.reset()
    yield
    console.reset()


@pytest.fixture
def examples_dir() -> str:
    return EXAMPLES


def make_adapter(seed: int = 0, *, rank: int = 4, alpha: float = 8.0, dtype=None,
                 kinds=("linear", "in_out", "conv", "embedding")):
    """A small adapter with one module of each requested kind (``_factory.four_kinds``)."""
    from _factory import four_kinds
    return four_kinds(seed, rank=rank, alpha=alpha, dtype=dtype, kinds=kinds)


@pytest.fixture
def tiny_adapter():
    return make_adapter()


@pytest.fixture
def tiny_adapter_path(tmp_path, tiny_adapter) -> str:
    from loratool.adapter import save_adapter
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(tiny_adapter, path)
    return path
