"""What a format plug-in is: the ``Format`` protocol, typed reader options, typed module
records, and the ``Probe`` that detection looks at.

A format is one module of ``loratool.interop`` listed in the registry
(``loratool.interop.REGISTRY``); see docs/formats.md, "Adding a format". No torch here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import InteropError
from ..format import KIND_LINEAR, LAYOUT_OUT_IN, SCALING_STANDARD
from ..model import Adapter, AdapterInfo, ModuleInfo
from ..rules import Finding

# --- options -----------------------------------------------------------------------------------


def parse_enable_lora(value) -> list[bool] | None:
    """``"1,0,1"`` / ``[True, False, True]`` -> ``[True, False, True]``."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip().lower() for v in value.split(",") if v.strip()]
        table = {"1": True, "0": False, "true": True, "false": False, "t": True, "f": False}
        if not items or any(v not in table for v in items):
            raise InteropError(f"--enable-lora {value!r} is not a comma-separated list of 1/0 "
                               "(e.g. 1,0,1)", code="LT304")
        mask = [table[v] for v in items]
    else:
        mask = [bool(v) for v in value]
    if not mask or not any(mask):
        raise InteropError("--enable-lora needs at least one enabled (1) group", code="LT304")
    return mask


@dataclass(frozen=True)
class ReaderOptions:
    """Facts a file may not store, and how to read and write it (every field optional).

    ``alpha``: lora_alpha of loralib and config-less PEFT files (and the loralib writer's
    target alpha); ``enable_lora``: loralib MergedLinear mask; ``fan_in_fan_out``: linear
    weights stored [in, out] (GPT-2 Conv1D); ``base``: a checkpoint used to recover names,
    layouts and kinds; ``name_map``: ``{OLD: NEW}`` renames (``--map``); ``allow_unknown``:
    drop (and list) tensors that are not LoRA factors; ``check_values``: refuse NaN/Inf when
    loading; ``overwrite``: writers may replace an existing output; ``source_format``: skip
    detection; ``gguf_type``: tensor type of a GGUF writer (f32, f16, bf16, q8_0);
    ``permute_qk``: whether llama.cpp permuted the q/k rows (only for architectures loratool
    does not know);
    detection; ``defer_base_mismatch``: modules whose base tensor has another shape are read
    (``merge`` lists them with the other modules it cannot merge) instead of refused;
    ``base_is_residual``: the base given to ``merge`` is the residual model of a PiSSA/OLoRA/
    ... initialised adapter (``Adapter.init``); ``numpy``: readers that go through
    ``_common.read_tensors`` (PEFT, kohya) return the stored tensors of a safetensors file as
    numpy arrays (BF16 as uint16 bit patterns), so ``merge`` never imports torch for them.
    """

    alpha: float | None = None
    enable_lora: list[bool] | None = None
    fan_in_fan_out: bool | None = None
    base: str | None = None
    name_map: Mapping[str, str] | None = None
    allow_unknown: bool = False
    check_values: bool = True
    overwrite: bool = False
    source_format: str | None = None
    gguf_type: str | None = None
    permute_qk: bool | None = None
    defer_base_mismatch: bool = False
    base_is_residual: bool = False
    numpy: bool = False

    @classmethod
    def of(cls, options: ReaderOptions | Mapping | None = None, **kwargs) -> ReaderOptions:
        """Options from a ``ReaderOptions``, a dict and/or keywords; None values are absent.

        ``name_map`` may be ``["OLD=NEW", ...]`` and ``enable_lora`` ``"1,0,1"``. An unknown
        name is a TypeError (a misspelt option must not be silently ignored).
        """
        if isinstance(options, ReaderOptions):
            base = options
        else:
            base = cls()
            kwargs = {**dict(options or {}), **kwargs}
        given = {k: v for k, v in kwargs.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown adapter option(s): {', '.join(unknown)}")
        if isinstance(given.get("name_map"), (list, tuple)):
            from ..naming import parse_map
            given["name_map"] = parse_map(given["name_map"])
        if "enable_lora" in given:
            given["enable_lora"] = parse_enable_lora(given["enable_lora"])
        if "base" in given:
            given["base"] = os.fspath(given["base"])
        for flag in ("allow_unknown", "check_values", "overwrite", "defer_base_mismatch",
                     "base_is_residual", "numpy"):
            if flag in given:
                given[flag] = bool(given[flag])
        return dataclasses.replace(base, **given)

    def given(self) -> set[str]:
        """Names of the options that differ from their defaults."""
        return {f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    def replace(self, **changes) -> ReaderOptions:
        return dataclasses.replace(self, **changes)


# --- records -----------------------------------------------------------------------------------

@dataclass
class ModuleRecord:
    """One module as a reader planned it from names, shapes and config, before any data.

    ``tensors`` maps a role (``A``, ``B``, ``magnitude``, ``bias``) to the tensor's name in the
    source file. Readers with format-specific facts subclass it (``loralib``: layer class).
    """

    name: str
    tensors: dict[str, str] = field(default_factory=dict)
    kind: str = KIND_LINEAR
    layout: str = LAYOUT_OUT_IN
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()
    alpha: float = 1.0
    scaling: str = SCALING_STANDARD
    dtype: str = "F32"

    def info(self) -> ModuleInfo:
        return ModuleInfo(self.name, self.kind, self.layout, tuple(self.a_shape),
                          tuple(self.b_shape), float(self.alpha), self.scaling, self.dtype,
                          "magnitude" in self.tensors, "bias" in self.tensors)


@dataclass
class LoadResult:
    """What a reader produced: the adapter, notes on anything folded, tensors it dropped."""

    adapter: Adapter
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


# --- detection ---------------------------------------------------------------------------------

# How sure a format is that it can read a path (``Format.detect``); the highest wins, ties go
# to the format listed first in the registry.
DECLARED = 100  # the file says so (loratool metadata, a PEFT config beside it or a PEFT dir)
NAMES = 50      # its tensor names are this format's (kohya's are more specific than PEFT's)
FALLBACK = 1    # nothing else claims it: this format reads it and says what is missing


class Probe:
    """What detection may look at: the path's shape, and (lazily) metadata and tensor names.
    Never tensor values."""

    def __init__(self, path: str):
        self.path = path
        self.is_dir = os.path.isdir(path)
        self._header = None
        self._names = None

    @property
    def is_pickle(self) -> bool:
        from ..guards import is_pickle
        return not self.is_dir and is_pickle(self.path)

    @property
    def is_gguf(self) -> bool:
        """The file starts with the GGUF magic (other formats then see no metadata/names)."""
        if self.is_dir:
            return False
        try:
            with open(self.path, "rb") as f:
                return f.read(4) == b"GGUF"
        except OSError:
            return False

    def beside(self, name: str) -> bool:
        """Whether a file ``name`` exists in the directory of the path (or in it, for a dir)."""
        folder = self.path if self.is_dir else (os.path.dirname(self.path) or ".")
        return os.path.exists(os.path.join(folder, name))

    @property
    def metadata(self) -> dict[str, str]:
        """safetensors ``__metadata__`` (empty for pickles and directories)."""
        if self.is_pickle or self.is_dir or self.is_gguf:
            return {}
        return self._read_header().metadata

    @property
    def names(self) -> list[str]:
        """Tensor names (a pickle is loaded with the weights-only unpickler, cached)."""
        if self._names is None:
            if self.is_dir or self.is_gguf:  # PEFT looks in a directory itself; GGUF: gguf.py
                self._names = []
            elif self.is_pickle:
                self._names = list(load_pickle(self.path))
            else:
                self._names = list(self._read_header().tensors)
        return self._names

    def _read_header(self):
        if self._header is None:
            from ..stfile import read_header
            self._header = read_header(self.path)
        return self._header


_PICKLE_CACHE: dict = {}


def load_pickle(path: str) -> dict:
    """``checkpoint.load_pickle_state_dict``, caching the last file: detection and reading
    each need it."""
    from ..checkpoint import load_pickle_state_dict
    from ..guards import check_regular_file
    check_regular_file(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _PICKLE_CACHE:
        obj = load_pickle_state_dict(path)
        _PICKLE_CACHE.clear()
        _PICKLE_CACHE[key] = obj
    return _PICKLE_CACHE[key]


# --- the protocol ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Capabilities:
    """What a format can express; ``convert`` and the docs read it, writers enforce it."""

    kinds: frozenset[str]
    variants: frozenset[str] = frozenset({"lora"})  # names of variants.VARIANTS it can hold
    bias: bool = False
    rslora: bool = False
    per_module_alpha: bool = True
    replacements: bool = False  # whole-tensor and row replacements (format 1.1)
    reads: frozenset[str] = frozenset()   # ReaderOptions fields its reader uses
    writes: frozenset[str] = frozenset()  # ReaderOptions fields its writer uses


class Format(Protocol):
    """A format plug-in: a module of ``loratool.interop`` with these names.

    ``detect`` returns how sure it is (0: not this format; see DECLARED/NAMES/FALLBACK);
    ``read_info`` describes the adapter from headers only (no torch for safetensors);
    ``load_report`` loads it with notes and the dropped tensors; ``save`` writes it and
    returns notes on anything folded; ``check_data`` scans tensor values for ``validate``.
    """

    NAME: str
    CAPABILITIES: Capabilities

    def detect(self, probe: Probe) -> int: ...

    def read_info(self, path: str, options: ReaderOptions) -> AdapterInfo: ...

    def load_report(self, path: str, options: ReaderOptions) -> LoadResult: ...

    def load(self, path: str, options: ReaderOptions) -> Adapter: ...

    def save(self, adapter: Adapter, path: str, options: ReaderOptions) -> list[str]: ...

    def check_data(self, path: str, options: ReaderOptions) -> list[Finding]: ...
