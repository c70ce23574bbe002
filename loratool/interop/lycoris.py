"""LyCORIS files (LoCon with Tucker, LoHa, LoKr, full/diff, LyCORIS DoRA): spec/lycoris.md.

Names are kohya's (``lora_unet_...``, ``lora_te*_...``) or the generic wrapper's
(``lycoris_...``), ``<module>.<param>``; the family is detected from the parameter names
(``loratool.lycoris.parse``). A file of plain kohya LoRA modules only is the kohya format's;
this format claims a file as soon as one module has a LyCORIS-only parameter, and then reads
its plain modules as LoCon.

Reading gives each module's exact plain-LoRA form (``lycoris.modules``); the header-only paths
(``read_info``, ``validate`` without data) check every shape from the safetensors header and
import no torch. IA3, GLoRA, OFT, BOFT and norm modules are refused naming the family and the
module [LT231]; a file with no module is refused [LT230].

Writing (``--to lycoris``) writes each module read from LyCORIS with its original tensors
(bit-exact round trip) and plain modules as kohya LoCon (``lora_down``/``lora_up``/``alpha``).
"""

from __future__ import annotations

import os

from ..errors import InteropError, LoraToolError
from ..format import KIND_CONV, KIND_LINEAR
from ..model import Adapter, AdapterInfo
from ..rules import Finding
from ..variants import FullDiff, Lora, LycorisDora
from . import _common as C
from ._underscored import UnderscoredNames
from .base import NAMES, Capabilities, LoadResult, Probe, ReaderOptions

NAME = "lycoris"
CAPABILITIES = Capabilities(kinds=frozenset({KIND_LINEAR, KIND_CONV}),
                            variants=frozenset({Lora.name, LycorisDora.name, FullDiff.name}),
                            per_module_alpha=True,
                            reads=frozenset({"base", "name_map"}))

PREFIXES = ("lora_", "lycoris_")
# parameters only LyCORIS writes (a plain kohya file has lora_down/lora_up/alpha only)
_LYCORIS_PARAMS = {"lora_mid.weight", "diff", "diff_b", "dora_scale", "oft_blocks", "rescale",
                   "on_input", "w_norm", "b_norm", "weight",
                   *(f"{p}.weight" for p in ("a1", "a2", "b1", "b2", "bm"))}


def _is_lycoris_name(name: str) -> bool:
    module, _, param = name.partition(".")
    if not module.startswith(PREFIXES):
        return False
    return (module.startswith("lycoris_") or param in _LYCORIS_PARAMS
            or param.startswith(("hada_", "lokr_")))


def detect(probe: Probe) -> int:
    # Above kohya (NAMES + 1): kohya reads plain LoRA only and claims hada_/lokr_ names just
    # to refuse them.
    if probe.is_dir:
        return 0
    return NAMES + 2 if any(_is_lycoris_name(n) for n in probe.names) else 0


class _Plan:
    """Names, shapes and records of every module, from the header (no tensor data but the
    alphas)."""

    def __init__(self, path: str, options: ReaderOptions, *, collect: bool = False):
        from ..lycoris import LycorisError, parse_module, split_state_dict
        from ..lycoris.modules import HeaderTensor
        self.path = path
        self.source = C.TensorSource(path)
        self.notes: list[str] = []
        self.details: dict = {}
        self.errors: list[LoraToolError] = []
        stubs = {n: HeaderTensor(d, s, (lambda n=n: self.source.scalar(n)))
                 for n, (d, s) in self.source.entries.items()}
        groups = split_state_dict(stubs)
        if not groups:
            raise InteropError(f"{path} holds no LyCORIS module", code="LT230", path=path)
        self.names = self._names(sorted(groups), options)
        shapes = C.base_shapes(options) or {}
        self.records = {}
        for lora in sorted(groups):
            shape = shapes.get(self.base_keys.get(lora, ""))
            try:
                self.records[lora] = parse_module(lora, groups[lora], shape=shape)
            except LycorisError as e:
                e.path = path
                if not collect:
                    raise
                self.errors.append(e)
        fams: dict[str, int] = {}
        for rec in self.records.values():
            key = rec.family.value + ("+dora" if rec.dora is not None else "")
            fams[key] = fams.get(key, 0) + 1
        self.details["lycoris_families"] = ", ".join(f"{k}: {v}" for k, v in sorted(fams.items()))
        for key in ("ss_network_module", "ss_network_args"):
            if self.source.metadata.get(key):
                self.details[key] = self.source.metadata[key]

    def _names(self, loras, options) -> dict[str, str]:
        """LyCORIS name -> module path, as the kohya reader does: ``lora_unet_x_y`` ->
        ``unet.x_y`` and ``lycoris_x_y`` -> ``x_y``, dotted from the base when given."""
        def split(lora):
            if not lora.startswith(PREFIXES) or lora in PREFIXES:
                raise InteropError(f"LyCORIS module name {lora[:80]!r} does not start with "
                                   "lora_ or lycoris_", code="LT307", path=self.path,
                                   module=lora[:80])
            if lora.startswith("lycoris_"):
                rest = lora[len("lycoris_"):]
                return rest, [("", rest)]
            full = lora[len("lora_"):]
            part, sep, rest = full.partition("_")
            return (f"{part}.{rest}" if sep and rest else full), [("", full), (f"{part}.", rest)]
        resolved = UnderscoredNames(loras, options, split=split, fmt="LyCORIS",
                                      path=self.path)
        self.base_keys = resolved.base_keys
        self.notes.extend(resolved.notes)
        self.details["names"] = resolved.how
        return resolved.names

    def info(self, lora: str):
        from ..lycoris.native import module_info
        rec = self.records[lora]
        return module_info(self.names[lora], rec, {p: self.source.entries[f"{lora}.{p}"]
                                                   for p in rec.tensors})


def read_info(path: str, options: ReaderOptions) -> AdapterInfo:
    plan = _Plan(path, options)
    modules = {plan.names[lora]: plan.info(lora) for lora in sorted(plan.records)}
    alphas = [m.alpha for m in modules.values()]
    return AdapterInfo(path=path, format_version=None, modules=dict(sorted(modules.items())),
                       alpha=float(C.most_common(alphas) or 1.0),
                       extra_metadata=dict(plan.source.metadata), source_format=NAME,
                       tensor_bytes=plan.source.tensor_bytes, details=dict(plan.details))


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    """Every module in its plain-LoRA form (float64 factors, exact), the record kept."""
    from ..lycoris import parse_module
    from ..lycoris.native import as_module
    from ..lycoris.records import Full
    plan = _Plan(path, options)
    modules, ranks = {}, []
    for lora, head in sorted(plan.records.items()):
        tensors = {}
        for p in head.tensors:
            t = plan.source.get(f"{lora}.{p}")
            if options.check_values and p != "alpha":
                C.check_finite(t, f"{lora}.{p}", path, lora, options)
            tensors[p] = t
        shape = head.shape if head.shape_known else None
        rec = parse_module(lora, tensors, shape=shape)
        name = plan.names[lora]
        modules[name] = as_module(name, rec)
        if not isinstance(rec, Full):
            ranks.append(f"{name}: {rec.family.value} -> rank {modules[name].rank}")
    notes = list(plan.notes)
    if ranks:
        shown = "; ".join(ranks[:12]) + (f"; ... ({len(ranks)} in all)" if len(ranks) > 12
                                         else "")
        notes.append(f"LyCORIS modules read in their exact plain-LoRA form (float64 factors): "
                     f"{shown}")
    adapter = Adapter(modules=modules, alpha=float(C.most_common(
        m.alpha for m in modules.values()) or 1.0), extra_metadata=dict(plan.source.metadata),
        source_format=NAME)
    return LoadResult(adapter, notes, [])


def load(path: str, options: ReaderOptions) -> Adapter:
    return load_report(path, options).adapter


def validate(path: str, options: ReaderOptions, *, data: bool = True) -> list[Finding]:
    """Every LT23x problem of every module (header only); with ``data``, NaN/Inf."""
    plan = _Plan(path, options, collect=True)
    findings = [Finding(e.code, e.message, path, e.module) for e in plan.errors]
    if data:
        findings += plan.source.scan([n for n in plan.source.entries])
    return findings


def save(adapter: Adapter, path: str, options: ReaderOptions) -> list[str]:
    """A LyCORIS file: modules read from LyCORIS keep their tensors verbatim (name suffix,
    dtype, shape and bytes), plain modules are written as kohya LoCon."""
    from ..stfile import SafetensorsWriter
    from ..tensors import st_dtype, to_bytes
    from .kohya import ALPHA, DOWN, UP, _alpha_tensor, kohya_name
    tensors, seen, verbatim = {}, {}, 0
    for name, m in adapter.modules.items():
        rec = getattr(m, "record", None)
        key = kohya_name(name)
        if rec is not None and rec.name.startswith("lycoris_") and \
                rec.name[len("lycoris_"):] == name.replace(".", "_"):
            key = rec.name
        if key in seen:
            raise InteropError(f"modules {seen[key]!r} and {name!r} both become LyCORIS name "
                               f"{key!r}; rename one with --map", code="LT307", module=name)
        seen[key] = name
        if rec is not None:
            tensors.update({f"{key}.{p}": t.contiguous() for p, t in rec.tensors.items()})
            verbatim += 1
            continue
        if m.kind not in CAPABILITIES.kinds or m.magnitude is not None or m.bias is not None:
            what = ", ".join([m.kind] + ["DoRA"] * (m.magnitude is not None)
                             + ["lora_bias"] * (m.bias is not None))
            raise InteropError(f"module {name!r} ({what}) has no LyCORIS form loratool "
                               "writes; convert to PEFT or loratool",
                               code="LT306", module=name)
        tensors[key + DOWN] = m.A.contiguous()
        tensors[key + UP] = m.B.contiguous()
        tensors[key + ALPHA] = _alpha_tensor(m.scale * m.rank, m.A)
    tensors = dict(sorted(tensors.items()))
    meta = {k: v for k, v in adapter.extra_metadata.items() if not k.startswith("loratool.")}
    entries = [(n, st_dtype(t), tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(os.fspath(path), entries, meta or None,
                           overwrite=options.overwrite) as w:
        for n, t in tensors.items():
            w.write(n, to_bytes(t))
        w.commit()
    notes = []
    if verbatim:
        notes.append(f"{verbatim} LyCORIS module(s) written with their original tensors")
    if len(adapter.modules) > verbatim:
        notes.append(f"{len(adapter.modules) - verbatim} plain module(s) written as kohya LoCon "
                     "(lora_down/lora_up/alpha)")
    return notes
