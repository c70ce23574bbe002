"""kohya / sd-scripts LoRA files (also written by LyCORIS' LoCon, ComfyUI, A1111 tooling).

Tensors: ``<lora_name>.lora_down.weight`` [r, in, *k] -> A, ``<lora_name>.lora_up.weight``
[out, r, 1, ...] -> B, ``<lora_name>.alpha`` (a scalar; missing means alpha = r). Scale is
alpha / r. Every ``__metadata__`` key (``ss_*``, ``modelspec.*``, ``sshs_*``...) is kept.

Names (spec/interop.md, "kohya names"): a kohya name is ``lora_`` + the module path with dots
turned into underscores, the first segment naming the model part (``unet``, ``te``, ``te1``,
``te2``, ``te3``: ``MODEL_PARTS``). loratool keeps the invariant

    kohya name == "lora_" + canonical name with "." replaced by "_"

so that kohya -> loratool -> kohya gives the same names. Reading turns the underscore after a model part
into a dot (``lora_unet_down_blocks_0_proj_in`` -> ``unet.down_blocks_0_proj_in``) and keeps any
other name verbatim (``lora_lm_head`` -> ``lm_head``); with a base
checkpoint, the rest is dotted as the base tensor whose path, underscored, equals it
(``unet.down_blocks.0.proj_in``).
"""

from __future__ import annotations

import math
import os

from ..errors import InteropError
from ..format import (KIND_CONV, KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, LAYOUT_OUT_IN,
                      SCALING_STANDARD)
from ..model import Adapter, AdapterInfo, LoraModule
from . import _common as C
from ._underscored import UnderscoredNames
from ..variants import Lora
from ._peft_config import DIFFUSERS_METADATA
from .base import NAMES, Capabilities, LoadResult, ModuleRecord, Probe, ReaderOptions

NAME = "kohya"
CAPABILITIES = Capabilities(kinds=frozenset({KIND_LINEAR, KIND_CONV}),
                            variants=frozenset({Lora.name}), per_module_alpha=True,
                            reads=frozenset({"fan_in_fan_out", "base", "name_map"}))

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PREFIX = "lora_"
# sd-scripts' model parts: the first segment of its names (SD 1/2: unet, te; SDXL: te1, te2;
# SD3: te3). Read as ``unet.<rest>``; every other name is kept verbatim without a base.
MODEL_PARTS = frozenset({"unet", "te", "te1", "te2", "te3"})
# LyCORIS and other variants whose tensors loratool cannot represent
_VARIANT_HINTS = {".hada_": "LoHa", ".lokr_": "LoKr", ".lora_mid.": "LoCon with Tucker "
                  "decomposition (lora_mid)", ".dora_scale": "LyCORIS DoRA", ".oft_": "OFT",
                  ".diff": "a full weight difference", ".on_input": "IA3"}


def underscored(name: str) -> str:
    return name.replace(".", "_")


def kohya_name(module: str, parts: dict[str, str] | None = None) -> str:
    """The kohya name of a canonical module path; ``parts`` renames a diffusers component
    (``text_encoder.`` -> ``te``: see ``diffusers_parts``)."""
    comp, dot, rest = module.partition(".")
    if dot and parts and comp in parts:
        return PREFIX + parts[comp] + "_" + underscored(rest)
    return PREFIX + underscored(module)


def diffusers_parts(modules) -> dict[str, str]:
    """sd-scripts' model part of each diffusers text-encoder component among ``modules``
    (diffusers' kohya loader reads ``lora_te_``/``lora_te1_``/``lora_te2_``; ``unet`` is
    already its own name)."""
    comps = {m.partition(".")[0] for m in modules}
    if "text_encoder_2" in comps:
        return {"text_encoder": "te1", "text_encoder_2": "te2"}
    return {"text_encoder": "te"} if "text_encoder" in comps else {}


def detect(probe: Probe) -> int:
    # LyCORIS LoHa/LoKr names are claimed too: the reader then names them as unsupported.
    # One above PEFT's score: a file with both kinds of names has always been read as kohya.
    return NAMES + 1 if any(n.endswith((DOWN, UP)) or ".hada_" in n or ".lokr_" in n
                            for n in probe.names) else 0


def _split(name: str):
    for suffix, role in ((DOWN, "A"), (UP, "B"), (ALPHA, "alpha")):
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


class _Plan:
    def __init__(self, path: str, options: ReaderOptions):
        self.path = path
        self.source = C.TensorSource(path)
        self.notes: list[str] = []
        self.details: dict = {}
        self.unknown: list[str] = []
        groups: dict[str, dict] = {}
        for name in self.source.entries:
            split = _split(name)
            if split is None:
                self.unknown.append(name)
                continue
            lora, role = split
            groups.setdefault(lora, {})[role] = name
        for lora, t in list(groups.items()):
            if "A" not in t and "B" not in t:  # a stray alpha (e.g. of a LoHa module)
                self.unknown.extend(t.values())
                del groups[lora]
            elif "A" not in t or "B" not in t:
                missing = "lora_down" if "A" not in t else "lora_up"
                raise InteropError(f"kohya module {lora!r} has no {missing}.weight tensor",
                                   code="LT305", path=path, module=lora)
        self.names = self._names(sorted(groups), options)
        self.modules: dict[str, ModuleRecord] = {}
        shapes = C.base_shapes(options)
        # kohya files do not record the layout: it comes from the base or the options
        layouts = C.LinearLayouts(options, path, declared=None, what="the kohya file")
        mismatched = layouts.mismatched
        no_alpha = 0
        for lora in sorted(groups):
            t = groups[lora]
            module = self.names[lora]
            a_dtype, a = self.source.entries[t["A"]]
            _, b = self.source.entries[t["B"]]
            if len(a) == 2 and len(b) == 2:
                kind = KIND_LINEAR
            elif 3 <= len(a) <= 5 and len(b) == len(a) and all(d == 1 for d in b[2:]):
                kind = KIND_CONV
            else:
                raise InteropError(f"kohya module {lora!r}: lora_down {list(a)} and lora_up "
                                   f"{list(b)} are neither linear ([r, in], [out, r]) nor conv "
                                   "([r, in, *k], [out, r, 1, ...])", code="LT305", path=path,
                                   module=lora)
            if a[0] != b[1]:
                raise InteropError(f"kohya module {lora!r}: lora_down {list(a)} has rank {a[0]} "
                                   f"but lora_up {list(b)} has rank {b[1]}", code="LT305",
                                   path=path, module=lora)
            C.check_factors(lora, {r: self.source.entries[t[r]][0] for r in ("A", "B")}, a, b,
                            path, what="lora_down/lora_up")
            rank = a[0]
            if "alpha" in t:
                alpha = self.source.scalar(t["alpha"])
                if not math.isfinite(alpha) or alpha == 0:
                    raise InteropError(f"kohya module {lora!r}: alpha is {alpha}; it must be a "
                                       "finite non-zero number", code="LT305", path=path,
                                       module=lora)
            else:
                alpha = float(rank)
                no_alpha += 1
            base_key = self.base_keys.get(lora)
            base_shape = shapes.get(base_key) if (shapes and base_key) else None
            if kind == KIND_LINEAR:
                layout = layouts(module, b[0], a[1], base_shape)
            else:
                layout = LAYOUT_OUT_IN
                why = C.base_shape_mismatch(module, (b[0], a[1], *a[2:]), base_shape)
                if why:
                    mismatched.append(why)
            self.modules[module] = ModuleRecord(
                module, dict(t), kind, layout, tuple(a), tuple(b), alpha,
                SCALING_STANDARD, a_dtype)
        C.check_mismatches(mismatched, options, path)
        self.notes.extend(layouts.notes())
        if no_alpha:
            self.details["missing_alpha"] = f"{no_alpha} module(s): alpha = rank"
        self.default_alpha = float(C.most_common(m.alpha for m in self.modules.values())
                                   or 1.0)
        prefixes = sorted({lora.split("_")[1] for lora in groups if lora.count("_") >= 2
                           and lora.split("_")[1] in MODEL_PARTS})
        if prefixes:
            self.details["model_parts"] = ", ".join(prefixes)
        if self.source.metadata.get("ss_network_module"):
            self.details["network_module"] = self.source.metadata["ss_network_module"]

    def _names(self, loras, options) -> dict[str, str]:
        """kohya name -> canonical module path (see the module docstring)."""
        def split(lora):
            if not lora.startswith(PREFIX) or len(lora) == len(PREFIX):
                raise InteropError(f"kohya module name {lora!r} does not start with "
                                   f"{PREFIX!r}; loratool reads sd-scripts names "
                                   "(lora_unet_..., lora_te_...)", code="LT307",
                                   path=self.path, module=lora)
            full = lora[len(PREFIX):]
            part, sep, rest = full.partition("_")
            # Only sd-scripts' model parts become a dotted first segment: any other name is
            # kept verbatim (``lora_lm_head`` is ``lm_head``, never ``lm.head``).
            fallback = f"{part}.{rest}" if sep and rest and part in MODEL_PARTS else full
            return fallback, [("", full), (f"{part}.", rest)]
        resolved = UnderscoredNames(loras, options, split=split, fmt="kohya", path=self.path)
        self.base_keys = resolved.base_keys
        self.notes.extend(resolved.notes)
        self.details["names"] = resolved.how
        return resolved.names

    def check_unknown(self, options) -> list[str]:
        hints = sorted({what for n in self.unknown for key, what in _VARIANT_HINTS.items()
                        if key in n})
        hint = (f"They look like {', '.join(hints)}, which has no LoRA (B @ A) form."
                if hints else "")
        return C.check_unknown(self.unknown, options, path=self.path, fmt="kohya", hint=hint)


def read_info(path: str, options: ReaderOptions) -> AdapterInfo:
    plan = _Plan(path, options)
    details = dict(plan.details)
    if plan.unknown:
        details["unknown_tensors"] = ", ".join(sorted(plan.unknown))
    modules = {n: r.info() for n, r in sorted(plan.modules.items())}
    return AdapterInfo(path=path, format_version=None, modules=modules,
                       alpha=plan.default_alpha, extra_metadata=dict(plan.source.metadata),
                       source_format="kohya", tensor_bytes=plan.source.tensor_bytes,
                       details=details)


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    plan = _Plan(path, options)
    notes = list(plan.notes) + plan.check_unknown(options)
    modules = {}
    for name, r in sorted(plan.modules.items()):
        t = C.read_tensors(plan, r, path, options)
        modules[name] = LoraModule(name, r.kind, r.layout, t["A"], t["B"], r.alpha, r.scaling)
    adapter = Adapter(modules=modules, alpha=plan.default_alpha,
                      extra_metadata=dict(plan.source.metadata), source_format="kohya")
    return LoadResult(adapter, notes, sorted(plan.unknown) if options.allow_unknown else [])


def load(path: str, options: ReaderOptions) -> Adapter:
    return load_report(path, options).adapter


def validate(path: str, options: ReaderOptions, *, data: bool = True):
    """Valid when it reads into the canonical model; with ``data``, NaN/Inf and zero B."""
    plan = _Plan(path, options)
    plan.check_unknown(options)  # what load refuses (LT303), validate refuses too
    return C.scan_plan(plan) if data else []


# --- writing -------------------------------------------------------------------------------

def _alpha_tensor(alpha: float, like):
    """``alpha`` as a 0-dim tensor in the dtype of lora_down when that holds it exactly
    (what sd-scripts writes), else float32, else float64."""
    import torch
    for dtype in (like.dtype, torch.float32, torch.float64):
        t = torch.tensor(alpha, dtype=dtype)
        if float(t) == alpha:
            return t
    return torch.tensor(alpha, dtype=torch.float64)


def save(adapter: Adapter, path: str, options: ReaderOptions) -> list[str]:
    """Write a kohya/sd-scripts ``.safetensors`` file; metadata other than ``loratool.*`` kept."""
    C.refuse_replacements(adapter, "kohya")
    from ..stfile import SafetensorsWriter
    from ..tensors import st_dtype, to_bytes
    path = os.fspath(path)
    notes: list[str] = []
    tensors = {}
    seen: dict[str, str] = {}
    transposed = []
    rs = 0
    parts = diffusers_parts(adapter.modules)
    for name, m in adapter.modules.items():
        if m.kind == KIND_EMBEDDING:
            raise InteropError(f"module {name!r} is an embedding; kohya LoRA files have no "
                               "embedding modules. Convert to loratool or PEFT instead",
                               code="LT306", module=name)
        if m.variant.name not in CAPABILITIES.variants:
            raise InteropError(f"module {name!r} has {m.variant.described}; the kohya LoRA format "
                               "cannot store it (merge it into the base with `loratool merge` "
                               "or convert to PEFT/loratool)", code="LT306", module=name)
        if m.bias is not None:
            raise InteropError(f"module {name!r} has a lora_bias; the kohya LoRA format cannot "
                               "store it", code="LT306", module=name)
        k = kohya_name(name, parts)
        if k in seen:
            raise InteropError(f"modules {seen[k]!r} and {name!r} both become kohya name {k!r}; "
                               "rename one with --map", code="LT307", module=name)
        seen[k] = name
        alpha = float(m.alpha)
        if m.scaling != SCALING_STANDARD:
            alpha = m.scale * m.rank  # same scale under kohya's alpha / r
            rs += 1
        if m.kind == KIND_LINEAR and m.layout == LAYOUT_IN_OUT:
            transposed.append(name)
        tensors[k + DOWN] = m.A.contiguous()
        tensors[k + UP] = m.B.contiguous()
        tensors[k + ALPHA] = _alpha_tensor(alpha, m.A)
    if rs:
        notes.append(f"{rs} rsLoRA module(s): alpha written as scale * rank (kohya scales by "
                     "alpha / rank)")
    if transposed:
        notes.append(f"{len(transposed)} linear module(s) apply to transposed (Conv1D-style) "
                     "weights; kohya files do not record this: read them back with "
                     "--fan-in-fan-out or --base")
    tensors = dict(sorted(tensors.items()))
    meta = {k: v for k, v in adapter.extra_metadata.items() if not k.startswith("loratool.")}
    if meta.pop(DIFFUSERS_METADATA, None) is not None:
        # the alphas are in the .alpha tensors; diffusers refuses a file with both
        notes.append(f"dropped the {DIFFUSERS_METADATA} metadata (its alphas are written as "
                     "kohya .alpha tensors; diffusers refuses a file with both)")
    if parts:
        notes.append("diffusers components written as sd-scripts model parts: " + ", ".join(
            f"{c}. -> lora_{p}_" for c, p in sorted(parts.items())))
    entries = [(n, st_dtype(t), tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, entries, meta or None,
                           overwrite=options.overwrite) as w:
        for n, t in tensors.items():
            w.write(n, to_bytes(t))
        w.commit()
    if adapter.init:
        notes.append(f"init {adapter.init['method']} not recorded (kohya files have no place "
                     "for it): the adapter still applies only to the residual model made at "
                     "initialisation; merge it into that model")
    return notes
