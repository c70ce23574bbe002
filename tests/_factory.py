"""The one factory of test adapters: seeded random factors, modules of every kind, adapters.

Every helper that builds adapters calls this module: ``conftest.make_adapter`` and
``_hostile_helpers.make_loratool_adapter`` (``four_kinds``), ``_merge_helpers.mixed_adapter``
and ``_lowrank_helpers.module``/``adapter`` (``random_module``, ``adapter``). A change to the
model (a new field, a new variant) is made here once. The random streams are the ones the
helpers drew before they shared this code (same generator, draw order and draw dtype, the
scale applied before the cast), so no test's data changed.
"""

from __future__ import annotations

import torch

from loratool.model import Adapter, LoraModule


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape, scale=1.0, dtype=torch.float32,
          draw=torch.float32) -> torch.Tensor:
    """Normal values drawn in ``draw`` precision, multiplied by ``scale`` (a number or a
    tensor that broadcasts), then cast to ``dtype``."""
    return (torch.randn(*shape, generator=g, dtype=draw) * scale).to(dtype)


def random_module(g: torch.Generator, name: str, *, out: int, inp: int, rank: int,
                  alpha: float, kind: str = "linear", layout: str = "out_in",
                  kernel: tuple = (), scaling: str = "standard", dtype=torch.float32,
                  draw=torch.float32, b_scale=1.0, decay: float | None = None) -> LoraModule:
    """A module with A [rank, inp, *kernel] then B [out, rank, 1...] drawn from ``g``.

    ``b_scale`` multiplies B; ``decay`` also scales B's columns by decay**i (a decaying
    spectrum). Embeddings are always ``in_out``.
    """
    ones = [1] * len(kernel)
    A = randn(g, rank, inp, *kernel, dtype=dtype, draw=draw)
    scale = b_scale
    if decay is not None:
        scale = scale * (decay ** torch.arange(rank, dtype=draw)).reshape(1, rank, *ones)
    B = randn(g, out, rank, *ones, scale=scale, dtype=dtype, draw=draw)
    if kind == "embedding":
        layout = "in_out"
    return LoraModule(name, kind, layout, A, B, alpha, scaling)


def adapter(*modules: LoraModule, alpha: float | None = None, **facts) -> Adapter:
    """An Adapter of ``modules``; its default alpha is the first module's unless given."""
    return Adapter(modules={m.name: m for m in modules},
                   alpha=alpha if alpha is not None else modules[0].alpha, **facts)


# The four-kind adapter of the CLI and adversarial tests: one module of each kind, shaped to
# fit _hostile_helpers.BASE_SHAPES (name: kind, layout, out, in, kernel).
FOUR_KINDS = {
    "linear": ("layers.0.q_proj", "linear", "out_in", 10, 12, ()),
    "in_out": ("h.0.attn.c_attn", "linear", "in_out", 36, 12, ()),
    "conv": ("conv1", "conv", "out_in", 6, 3, (3, 3)),
    "embedding": ("embed", "embedding", "in_out", 8, 20, ()),
}


def four_kinds(seed: int = 0, *, rank: int = 4, alpha: float = 8.0, dtype=None,
               kinds=tuple(FOUR_KINDS), b_scale: float = 1.0) -> Adapter:
    """A small adapter with one module of each requested kind (``FOUR_KINDS``)."""
    g = generator(seed)
    mods = [random_module(g, name, kind=kind, layout=layout, out=out, inp=inp, rank=rank,
                          kernel=kernel, alpha=alpha, dtype=dtype or torch.float32,
                          b_scale=b_scale)
            for key, (name, kind, layout, out, inp, kernel) in FOUR_KINDS.items()
            if key in kinds]
    return Adapter(modules={m.name: m for m in mods}, alpha=alpha)
