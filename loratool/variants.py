"""Module variants: one class per way a module turns its tensors into a weight update.

A plain LoRA module adds ``s * B @ A`` to its base weight; a DoRA module rescales the
updated weight's rows to a learned magnitude, so it has no additive delta. Code that must
treat them differently asks ``module.variant`` (``LoraModule`` and ``ModuleInfo`` both have it)
instead of testing ``magnitude is not None`` at each site. A new module kind (LyCORIS LoHa,
LoKr, a full-tensor replacement) is one new class here plus the readers that produce it.
No torch here.
"""

from __future__ import annotations

from typing import ClassVar


class ModuleVariant:
    """What a variant means to every operation; subclasses only set the class attributes."""

    name: ClassVar[str]
    #: extra tensor roles beyond ``A``/``B`` that the variant needs (spec role names)
    roles: ClassVar[tuple[str, ...]] = ()
    #: the update is ``W += s * B @ A``: linear in the adapter, so it can be resized,
    #: composed, subtracted (unmerge) and applied without reading the base weight
    additive: ClassVar[bool] = True
    #: how a refusal names it ("a DoRA magnitude")
    described: ClassVar[str] = ""


class Lora(ModuleVariant):
    name = "lora"
    described = "a plain LoRA module"


class Dora(ModuleVariant):
    """DoRA (weight-decomposed LoRA): ``W' = m / ||W + s B A||_row * (W + s B A)``."""

    name = "dora"
    roles = ("magnitude",)
    additive = False
    described = "a DoRA magnitude"


class LycorisDora(ModuleVariant):
    """LyCORIS DoRA (spec/lycoris.md section 4): ``dora_scale`` with its own axis and epsilon;
    merged through ``lycoris.merged_weight``, with no plain-LoRA form."""

    name = "lycoris_dora"
    roles = ("dora_scale",)
    additive = False
    described = "a LyCORIS DoRA scale (dora_scale)"


class FullDiff(ModuleVariant):
    """A LyCORIS full weight difference (``diff``): additive, but of full rank; plain-LoRA
    writers refuse it (a dense SVD is asked for explicitly)."""

    name = "full_diff"
    roles = ("diff",)
    described = "a LyCORIS full weight difference (diff)"


# Variants the loratool format stores (format 1.x); the LyCORIS ones are read, not stored.
VARIANTS: dict[str, type[ModuleVariant]] = {v.name: v for v in (Lora, Dora)}


def variant_of(has_magnitude: bool) -> type[ModuleVariant]:
    """The variant of a module from the roles it has (today: whether it has a magnitude)."""
    return Dora if has_magnitude else Lora


class ParamLora(ModuleVariant):
    """LoRA on a parameter (PEFT ``target_parameters``): a low-rank delta per expert of a
    stacked parameter (``loratool.experts``). Additive (merge and unmerge), but its factors
    are per expert: the loratool format and the other writers do not store it yet, and
    resize/compose, which rewrite plain factors, refuse it."""

    name = "param_lora"
    described = "a LoRA on a parameter (PEFT target_parameters, per-expert factors)"
