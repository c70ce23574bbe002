"""``convert``: read an adapter in any supported format and write it in another.

Lossless wherever the target can express the adapter; where it cannot, the writer folds what
it can exactly (per-module alpha into ``alpha_pattern`` or into the factors) and says so in the
report's notes, or refuses with an ``InteropError`` that names the module and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import InteropError, OperationError
from ..interop import FORMATS, detect_format, get_format
from ..interop._common import refuse_replacements, rename_modules
from ..interop.base import LoadResult, ReaderOptions
from ..model import Adapter

TARGETS = FORMATS

# Options reported as ignored when neither the source's reader nor the target's writer uses
# them (``Capabilities.reads``/``writes``).
# Why a LyCORIS variant has no plain-LoRA form (spec/lycoris.md sections 4 and 5).
_WHY = {"lycoris_dora": "LyCORIS DoRA renormalizes W + dW by a norm of the base weight, which "
                        "no plain LoRA expresses: merge it into the base with `loratool merge`.",
        "full_diff": "A full diff has no closed-form low-rank factors: pass --dense-svd to "
                     "factor it (with --rank/--fro to truncate; the error is reported), or "
                     "merge it into the base."}

_FLAGS = {"alpha": "--alpha", "enable_lora": "--enable-lora", "fan_in_fan_out":
          "--fan-in-fan-out", "base": "--base", "gguf_type": "--gguf-type",
          "permute_qk": "--permute-qk"}


@dataclass
class ConvertReport:
    """What ``convert`` did."""

    source: str
    destination: str
    source_format: str
    target_format: str
    modules: int
    notes: list[str] = field(default_factory=list)
    unknown_tensors: list[str] = field(default_factory=list)  # dropped (allow_unknown)
    replacements: list[str] = field(default_factory=list)  # replaced base tensors, kept

    def to_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination,
                "source_format": self.source_format, "target_format": self.target_format,
                "modules": self.modules, "notes": list(self.notes),
                "unknown_tensors": list(self.unknown_tensors),
                "replacements": list(self.replacements)}


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def convert(src: str | os.PathLike | Adapter, dst: str | os.PathLike, *, to: str = "loratool",
            overwrite: bool = False, rank: int | None = None, fro: float | None = None,
            sv_ratio: float | None = None, cumulative: float | None = None,
            dense_svd: bool = False, dtype: str | None = None, lycoris: str = "native",
            **options) -> ConvertReport:
    """Convert the adapter ``src`` (any format, detected) to format ``to`` at ``dst``.

    Options: ``alpha`` (loralib and config-less PEFT sources; the loralib target's lora_alpha),
    ``enable_lora`` (loralib MergedLinear mask, e.g. ``[True, False, True]`` or ``"1,0,1"``),
    ``fan_in_fan_out``, ``base`` (checkpoint for names, layouts, kinds), ``name_map``
    (``{OLD: NEW}`` renames, also used to find base tensors), ``allow_unknown``,
    ``source_format`` (skip detection); for GGUF (``to="gguf"`` or a GGUF source) ``base``
    is a GGUF base or the base's ``config.json`` (architecture, head counts), ``gguf_type``
    the written tensor type (f32, f16, bf16, q8_0) and ``permute_qk`` overrides whether the
    q/k rows are permuted (architectures loratool does not know).
    LyCORIS sources (spec/lycoris.md section 5) convert to their exact plain-LoRA form
    (``to="loratool"`` keeps them as the format's LyCORIS kinds unless ``lycoris="lora"``);
    one of ``rank``/``fro``/``sv_ratio``/``cumulative`` (the rules of ``resize``) truncates
    them (the retained Frobenius fraction is reported), ``dense_svd`` factors full ``diff``
    modules by an SVD and ``dtype`` (``fp64``, the default, ``fp32``, ``fp16``, ``bf16``) is
    the dtype of the plain-LoRA factors.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> convert("examples/peft_adapter", out + "/a.safetensors").source_format
    'peft'
    >>> convert(out + "/a.safetensors", out + "/kohya.safetensors", to="kohya").modules
    8
    """
    in_memory = isinstance(src, Adapter)
    src = src if in_memory else os.fspath(src)
    dst = os.fspath(dst)
    if to not in TARGETS:
        raise InteropError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}",
                           code="LT301")
    if not in_memory and not os.path.exists(src):
        raise InteropError(f"{src} does not exist", code="LT301", path=src)
    from ..atomic import check_destination
    options = ReaderOptions.of(**options).replace(overwrite=overwrite)
    check_destination(dst, overwrite=overwrite, inputs=[src, options.base])
    if not in_memory and _inside(src, dst):
        raise OperationError(f"input {src} is inside the output {dst}, which would replace it; "
                             "choose another -o path", code="LT502")
    if in_memory:  # an Adapter object: already canonical, nothing to read
        fmt, result = "loratool", LoadResult(src, [], [])
        src = "<in memory>"
    else:
        fmt = options.source_format or detect_format(src)
        # --to gguf: --base is the GGUF base or config.json of the target, not a checkpoint
        # the source's reader could resolve names against
        read_opts = options.replace(base=None) if to == "gguf" and fmt != "gguf" else options
        result = get_format(fmt).load_report(src, read_opts)
    source, target = get_format(fmt), get_format(to)
    adapter, rename_notes = rename_modules(result.adapter, options.name_map)
    notes = list(result.notes) + rename_notes
    used = source.CAPABILITIES.reads | target.CAPABILITIES.writes
    given = options.given()
    ignored = [_FLAGS[k] for k in _FLAGS if k in given and getattr(options, k) is not False
               and k not in used]
    if ignored:
        notes.append(f"ignored {', '.join(ignored)}: a {fmt} source"
                     f"{'' if to == fmt else f' and a {to} target'} do not use it")
    if lycoris not in ("native", "lora"):
        raise InteropError(f"lycoris={lycoris!r}: choose native (LyCORIS kinds of the loratool "
                           "format) or lora (the plain-LoRA form)", code="LT301")
    rule = dict(rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative)
    # LyCORIS modules stay LyCORIS for the LyCORIS writer and, unless told, the loratool one
    keep = to == "lycoris" or (to == "loratool" and lycoris == "native")
    variants = set(target.CAPABILITIES.variants)
    if keep and dtype and not any(v is not None for v in rule.values()):
        raise InteropError(f"--dtype rounds plain-LoRA factors; the {to} format keeps LyCORIS "
                           "modules with their own tensors" + (": add --lycoris lora" if
                                                                to == "loratool" else ""),
                           code="LT304")
    if any(v is not None for v in rule.values()) or dense_svd or dtype or not keep:
        from .lycoris_convert import to_plain
        notes += to_plain(adapter, rule=rule, dense_svd=dense_svd, dtype=dtype,
                          all_modules=not keep)
        if not keep:
            variants -= set(_WHY)
    refused = [(n, m.variant) for n, m in adapter.modules.items()
               if m.variant.name not in variants]
    if refused:
        name, variant = refused[0]
        raise InteropError(f"module {name!r} has {variant.described}; the {to} format cannot "
                           f"store it ({len(refused)} module(s) in all). " + _WHY.get(
                               variant.name, ""), code="LT243" if variant.name in _WHY
                           else "LT306", module=name)
    if not target.CAPABILITIES.replacements:
        refuse_replacements(adapter, to)
    # A GGUF source's --base only gives the architecture (GGUF base or config.json), not
    # checkpoint paths to rename modules to.
    if to == "peft" and options.base is not None and fmt != "gguf":
        adapter, base_notes = _to_base_paths(adapter, options)
        notes += base_notes
    notes += target.save(adapter, dst, options)
    return ConvertReport(src, dst, fmt, to, len(adapter.modules), notes, list(result.unknown),
                         list(adapter.replacements))


def _to_base_paths(adapter, options: ReaderOptions):
    """PEFT keys are paths inside the model PEFT wraps: with a base, a module whose base
    tensor's path is a dotted suffix of its name (kohya's ``unet.`` part, diffusers'
    component) takes that path."""
    from ..interop._common import resolve_base
    found = resolve_base(adapter.modules, options.replace(name_map=None))
    renames = {}
    for module, key in found.items():
        path = key[: -len(".weight")]
        if path != module and module.endswith("." + path):
            renames[module] = path
    if not renames:
        return adapter, []
    adapter, _ = rename_modules(adapter, renames)
    prefixes = sorted({m[: -len(p)] for m, p in renames.items()})
    return adapter, [f"{len(renames)} module(s) renamed to their base paths (PEFT keys are "
                     f"relative to the base model): dropped prefix {', '.join(prefixes)}"]
