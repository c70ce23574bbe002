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
from ..interop._common import rename_modules
from ..interop.base import LoadResult, ReaderOptions
from ..model import Adapter

TARGETS = FORMATS

# Options reported as ignored when neither the source's reader nor the target's writer uses
# them (``Capabilities.reads``/``writes``).
_FLAGS = {"alpha": "--alpha", "enable_lora": "--enable-lora", "fan_in_fan_out":
          "--fan-in-fan-out", "base": "--base"}


@dataclass
class ConvertReport:
    """What ``convert`` did."""

    source: str
    destination: str
    source_format: str
    target_format: str
    modules: int
    notes: list[str] = field(default_factory=list)
    unknown_tensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination,
                "source_format": self.source_format, "target_format": self.target_format,
                "modules": self.modules, "notes": list(self.notes),
                "unknown_tensors": list(self.unknown_tensors)}


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def convert(src: str | os.PathLike | Adapter, dst: str | os.PathLike, *, to: str = "loratool",
            overwrite: bool = False, **options) -> ConvertReport:
    """Convert the adapter ``src`` (any format, detected) to format ``to`` at ``dst``.

    Options: ``alpha`` (loralib and config-less PEFT sources; the loralib target's lora_alpha),
    ``enable_lora`` (loralib MergedLinear mask, e.g. ``[True, False, True]`` or ``"1,0,1"``),
    ``fan_in_fan_out``, ``base`` (checkpoint for names, layouts, kinds), ``name_map``
    (``{OLD: NEW}`` renames, also used to find base tensors), ``allow_unknown``,
    ``source_format`` (skip detection).

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
        result = get_format(fmt).load_report(src, options)
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
    notes += target.save(adapter, dst, options)
    return ConvertReport(src, dst, fmt, to, len(adapter.modules), notes, list(result.unknown))
