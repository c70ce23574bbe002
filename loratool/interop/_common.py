"""Pieces shared by the foreign-format readers and writers (PEFT, kohya, loralib).

A ``TensorSource`` gives one view of a safetensors file (header only until a tensor is asked
for: no torch import) or of a weights-only ``.pt``/``.bin`` state dict. Readers build a
``LoadResult`` (the adapter plus notes and the unknown tensors they dropped) so that
``convert`` can report what happened.
"""

from __future__ import annotations

from dataclasses import replace

import math
import os
from collections import Counter

import numpy as np

from ..errors import CheckpointError, InteropError, TensorError
from ..format import ADAPTER_DTYPES, LAYOUT_IN_OUT, LAYOUT_OUT_IN, MODULE_NAME_RE
from ..guards import TooLarge, is_pickle, read_capped, reject_duplicate_keys
from ..guards import require_regular_file as _require_regular
from ..naming import map_name
from ..rules import Finding
from .base import LoadResult, ModuleRecord, ReaderOptions, load_pickle  # noqa: F401

MAX_CONFIG_BYTES = 16 << 20
MAX_MODULE_NAME = 1024
_BASE_CACHE: dict = {}
# dtypes of a scalar (kohya alpha) that have one exact numeric value
_SCALAR_DTYPES = ("F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32",
                  "U64")


# --- tensor sources ------------------------------------------------------------------------

class TensorSource:
    """Names, dtypes and shapes of a file's tensors; data on request."""

    def __init__(self, path: str):
        self.path = path
        require_regular_file(path, "adapter file", code="LT001")
        self.metadata: dict[str, str] = {}
        self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.header = None
        self.state = None
        if is_pickle(path):
            from ..tensors import st_dtype
            self.state = load_pickle(path)
            self.entries = {n: (st_dtype(t), tuple(t.shape)) for n, t in self.state.items()}
        else:
            from ..stfile import read_header
            self.header = read_header(path)
            self.metadata = dict(self.header.metadata)
            self.entries = {n: (t.dtype, t.shape) for n, t in self.header.tensors.items()}

    @property
    def tensor_bytes(self) -> int:
        from ..stfile import DTYPE_SIZES
        return sum(math.prod(s) * DTYPE_SIZES.get(d, 0) for d, s in self.entries.values())

    def get(self, name: str):
        """The tensor as torch (imports torch)."""
        if self.state is not None:
            return self.state[name]
        from ..tensors import read_tensor
        return read_tensor(self.header, self.header.tensors[name])

    def get_numpy(self, name: str) -> np.ndarray:
        """The stored tensor as numpy (BF16 as its uint16 bit pattern); safetensors only."""
        if self.state is not None:
            raise InteropError(f"{self.path} is a pickle: its tensors are read with torch",
                               code="LT301", path=self.path)
        from ..stfile import read_numpy
        return read_numpy(self.header, self.header.tensors[name])

    def scalar(self, name: str) -> float:
        """A one-element numeric tensor (any float or integer dtype: diffusers writes kohya
        alphas as int64) as a Python float, read without torch for safetensors."""
        if self.state is not None:
            t = self.state[name]
            if t.numel() != 1:
                raise InteropError(f"tensor {name!r} has shape {list(t.shape)}; expected a "
                                   "scalar", code="LT305", path=self.path)
            from ..tensors import st_dtype
            if st_dtype(t) not in _SCALAR_DTYPES:
                raise InteropError(f"tensor {name!r} has dtype {t.dtype}; expected a float or "
                                   "integer scalar", code="LT305", path=self.path)
            return float(t.reshape(()).item())
        from ..stfile import read_scalar
        info = self.header.tensors[name]
        if info.numel != 1:
            raise InteropError(f"tensor {name!r} has shape {list(info.shape)}; expected a "
                               "scalar", code="LT305", path=self.path)
        if info.dtype not in _SCALAR_DTYPES:
            raise InteropError(f"tensor {name!r} has dtype {info.dtype}; expected a float or "
                               "integer scalar", code="LT305", path=self.path)
        return read_scalar(self.header, info)

    def scan(self, names, b_names=()) -> list[Finding]:
        """NaN/Inf (LT209) in ``names`` and all-zero tensors (LT210) among ``b_names``."""
        out: list[Finding] = []
        b_names = set(b_names)
        for name in names:
            bad, nonzero, numel = self._scan_one(name)
            if bad:
                out.append(Finding("LT209", f"tensor {name!r} holds {bad} NaN/Inf value(s) of "
                                            f"{numel}", self.path))
            if name in b_names and not nonzero and numel:
                out.append(Finding("LT210", f"tensor {name!r} (lora_B) is all zeros, so its "
                                            "module changes nothing (an untrained adapter?)",
                                   self.path))
        return out

    def _scan_one(self, name):
        if self.state is not None:
            t = self.state[name]
            if not t.is_floating_point():
                return 0, bool(t.any()), t.numel()
            return int((~t.isfinite()).sum()), bool(t.any()), t.numel()
        from ..numerics import any_nonzero, nonfinite_count
        from ..stfile import iter_chunks
        info = self.header.tensors[name]
        bad, nonzero = 0, False
        with open(self.path, "rb") as f:
            for part in iter_chunks(self.header, info, f):
                bad += nonfinite_count(part, info.dtype)
                if not nonzero:
                    nonzero = any_nonzero(part)
        return bad, nonzero, info.numel


# --- options -------------------------------------------------------------------------------

def get_alpha(options: ReaderOptions, *, fmt: str, strict: bool, why: str) -> float | None:
    """The user-supplied alpha; None when absent and not ``strict``, else an LT304 error."""
    alpha = options.alpha
    if alpha is None:
        if strict:
            raise InteropError(f"{why}; pass the alpha the adapter was trained with: --alpha A "
                               f"(alpha=A in Python)", code="LT304")
        return None
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha == 0:
        raise InteropError(f"--alpha {alpha!r} must be a finite non-zero number", code="LT304")
    return alpha


def check_unknown(unknown: list[str], options: ReaderOptions, *, path: str, fmt: str,
                  hint: str = "") -> list[str]:
    """Refuse tensors loratool cannot place (LT303) unless ``allow_unknown``; then note them."""
    if not unknown:
        return []
    unknown = sorted(unknown)
    shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown) - 12} more)"
                                       if len(unknown) > 12 else "")
    if not options.allow_unknown:
        raise InteropError(f"{len(unknown)} tensor(s) of this {fmt} adapter are not LoRA factors "
                           f"loratool can represent: {shown}.{(' ' + hint) if hint else ''} Pass "
                           "--allow-unknown (allow_unknown=True) to drop them; they are then "
                           "listed", code="LT303", path=path)
    return [f"dropped {len(unknown)} tensor(s) that are not LoRA factors: {shown}"]


def scan_plan(plan):
    """``check_data`` of a format whose plan lists each module's tensors (NaN/Inf, zero B)."""
    names = [k for r in plan.modules.values() for k in r.tensors.values()]
    names += list(getattr(plan, "full", {}).values())
    names += [name for name, _ in getattr(plan, "rows", {}).values()]
    b_names = [r.tensors["B"] for r in plan.modules.values()]
    return plan.source.scan(sorted(names), b_names)


def read_tensors(plan, record: ModuleRecord, path: str, options: ReaderOptions) -> dict:
    """Role -> tensor of one planned module as stored (torch; numpy with ``options.numpy``),
    NaN/Inf-checked (unless ``check_values`` is off)."""
    out = {}
    for role, key in record.tensors.items():
        if options.numpy:
            t = plan.source.get_numpy(key)
            check_finite(t, key, path, record.name, options,
                         dtype=plan.source.entries[key][0])
        else:
            t = plan.source.get(key)
            check_finite(t, key, path, record.name, options)
        out[role] = t
    return out


def check_finite(t, name: str, path: str, module: str | None, options: ReaderOptions, *,
                 dtype: str | None = None) -> None:
    """LT209 when float tensor ``t`` holds NaN/Inf; a numpy ``t`` is checked on its stored
    ``dtype`` (BF16 bits) by ``numerics``, without torch."""
    if not options.check_values:
        return
    if isinstance(t, np.ndarray):
        from ..numerics import nonfinite_count
        bad = nonfinite_count(t, dtype) > 0
    else:
        bad = t.is_floating_point() and not bool(t.isfinite().all())
    if bad:
        raise TensorError(f"tensor {name!r} holds NaN or Inf values", code="LT209", path=path,
                          module=module)


# --- base checkpoints ----------------------------------------------------------------------

def base_shapes(options: ReaderOptions) -> dict[str, tuple[int, ...]] | None:
    """``{tensor name: shape}`` of ``options.base`` (header only for safetensors), cached."""
    base = options.base
    if base is None:
        return None
    from ..checkpoint import list_tensors
    base = os.fspath(base)
    try:
        st = os.stat(base)
    except OSError:
        raise CheckpointError(f"base checkpoint {base} does not exist", code="LT401") from None
    key = (os.path.realpath(base), st.st_mtime_ns)
    if key not in _BASE_CACHE:
        _BASE_CACHE.clear()
        _BASE_CACHE[key] = {n: tuple(t.shape) for n, t in list_tensors(base).items()}
    return _BASE_CACHE[key]


def resolve_base(modules, options: ReaderOptions, *, suffixes=(".weight",)) -> dict[str, str]:
    """Adapter module -> base tensor name holding its weight (only the modules that match)."""
    shapes = base_shapes(options)
    if shapes is None:
        return {}
    from ..naming import resolve_modules
    name_map = options.name_map or {}
    out: dict[str, str] = {}
    left = []
    for m in modules:  # exact names first, for every suffix, before any suffix matching
        exact = None if map_name(m, name_map) is not None else next(
            (m + s for s in suffixes if m + s in shapes), None)
        if exact is None:
            left.append(m)
        else:
            out[m] = exact
    for suffix in suffixes:
        if not left:
            break
        mapping, left = resolve_modules(left, shapes, name_map, suffix=suffix)
        out.update({m: p + suffix for m, p in mapping.items()})
    return out


def squeeze_trailing(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def layout_for(name: str, out: int, in_: int, base_shape, default: str, path: str) -> str:
    """Linear layout from the base tensor's shape when it tells (not square), else ``default``."""
    if base_shape is None:
        return default
    base_shape = tuple(base_shape)
    if base_shape == (out, in_) and base_shape == (in_, out):
        return default
    if base_shape == (out, in_):
        return LAYOUT_OUT_IN
    if base_shape == (in_, out):
        return LAYOUT_IN_OUT
    raise InteropError(f"module {name!r}: the adapter needs a base weight [{out}, {in_}] (or "
                       f"[{in_}, {out}] transposed) but the base checkpoint has "
                       f"{list(base_shape)}; is it the right base model (or pass --map)?",
                       code="LT305", path=path, module=name)


# Hugging Face model types whose projections are transformers' Conv1D ([in, out] weights),
# and the module names that are Conv1D in them (their lm_head and embeddings are nn.Linear).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")
_CONFIG_CACHE: dict = {}


def base_config_dir(base: str) -> str:
    """The directory where a Hugging Face ``config.json`` of checkpoint ``base`` would be."""
    if os.path.isdir(base):
        return base
    from ..checkpoint import find_index
    index = find_index(base)
    return os.path.dirname(os.path.abspath(index or base))


def base_model_type(options: ReaderOptions) -> str | None:
    """``model_type`` of the base's ``config.json`` (None: no base or no config), cached."""
    if options.base is None:
        return None
    config = os.path.join(base_config_dir(os.fspath(options.base)), "config.json")
    if not os.path.isfile(config):
        return None
    key = (os.path.realpath(config), os.stat(config).st_mtime_ns)
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE.clear()
        model_type = read_json_config(config).get("model_type")
        _CONFIG_CACHE[key] = model_type if isinstance(model_type, str) else None
    return _CONFIG_CACHE[key]


def conv1d_named(module: str) -> bool:
    """Whether a module path (dotted or kohya-underscored) ends in a GPT-2 Conv1D name."""
    return any(module == n or module.endswith(("." + n, "_" + n)) for n in CONV1D_NAMES)


class LinearLayouts:
    """Decides each linear module's layout without guessing (spec/interop.md, "Linear
    layouts"): the base tensor's shape when it is not square, else the base's ``config.json``
    model type, else an explicit ``--fan-in-fan-out``/``--no-fan-in-fan-out``, else the
    file's own flag when the module's name agrees with it; otherwise LT309 naming the options.
    A file flag that the base contradicts is corrected, with a note (what PEFT does at load).
    """

    def __init__(self, options: ReaderOptions, path: str, *, declared: bool | None,
                 what: str):
        self.options, self.path, self.declared, self.what = options, path, declared, what
        self.model_type = base_model_type(options)
        self.corrected: list[str] = []
        self.mismatched: list[str] = []  # shape mismatches, reported by check_mismatches

    def __call__(self, name: str, out: int, in_: int, base_shape) -> str:
        declared = self.declared
        if base_shape is not None and tuple(base_shape) not in ((out, in_), (in_, out)):
            self.mismatched.append(f"module {name!r} needs a base weight [{out}, {in_}] (or "
                                   f"[{in_}, {out}] transposed); the base has "
                                   f"{list(base_shape)}")
            return LAYOUT_IN_OUT if declared else LAYOUT_OUT_IN
        if base_shape is not None and not (tuple(base_shape) == (out, in_) == (in_, out)):
            layout = layout_for(name, out, in_, base_shape, LAYOUT_OUT_IN, self.path)
        elif self.model_type is not None:
            conv1d = self.model_type in CONV1D_MODEL_TYPES and conv1d_named(name)
            layout = LAYOUT_IN_OUT if conv1d else LAYOUT_OUT_IN
        elif self.options.fan_in_fan_out is not None:
            return LAYOUT_IN_OUT if self.options.fan_in_fan_out else LAYOUT_OUT_IN
        elif declared is not None and declared == conv1d_named(name):
            return LAYOUT_IN_OUT if declared else LAYOUT_OUT_IN
        elif declared is None and not conv1d_named(name):
            return LAYOUT_OUT_IN
        else:
            said = ("is named like a GPT-2 Conv1D layer" if conv1d_named(name) else
                    "is not named like a GPT-2 Conv1D layer")
            flag = ("" if declared is None else
                    f" while {self.what} says fan_in_fan_out={str(declared).lower()}")
            shape = ("its base weight is square" if base_shape is not None else
                     "no base checkpoint shows its weight")
            raise InteropError(
                f"module {name!r} {said}{flag}, and {shape}: whether its weight is stored "
                "[out, in] (torch.nn.Linear) or [in, out] (transformers Conv1D) cannot be told. "
                "Pass --base with the model's config.json beside it, or --fan-in-fan-out "
                "(Conv1D) / --no-fan-in-fan-out (nn.Linear); in Python fan_in_fan_out=True/"
                "False", code="LT309", path=self.path, module=name)
        want = declared if self.options.fan_in_fan_out is None else self.options.fan_in_fan_out
        if want is not None and want != (layout == LAYOUT_IN_OUT):
            self.corrected.append(name)
        return layout

    def notes(self) -> list[str]:
        if not self.corrected:
            return []
        flag = self.options.fan_in_fan_out
        flag = self.declared if flag is None else flag
        shown = ", ".join(self.corrected[:5]) + (f" ({len(self.corrected) - 5} more)"
                                                 if len(self.corrected) > 5 else "")
        kind = "transformers Conv1D" if not flag else "torch.nn.Linear"
        return [f"fan_in_fan_out={str(flag).lower()} corrected for {len(self.corrected)} "
                f"module(s) whose base layers are {kind} (as PEFT does at load): {shown}"]


def base_shape_mismatch(name: str, want, base_shape) -> str | None:
    """Why the base tensor cannot take module ``name`` (None when it can or is unknown)."""
    if base_shape is None or squeeze_trailing(want) == squeeze_trailing(base_shape):
        return None
    return f"module {name!r} needs a base weight {list(want)}; the base has {list(base_shape)}"


def check_mismatches(mismatched: list[str], options: ReaderOptions, path: str) -> None:
    """One error listing every module whose base tensor has the wrong shape (LT305), unless
    ``options.defer_base_mismatch``: ``merge`` then lists them (LT411) with every other
    module it cannot merge, honouring ``--allow-missing``, the same for every format."""
    if not mismatched or options.defer_base_mismatch:
        return
    shown = "; ".join(mismatched[:10]) + (f"; ... ({len(mismatched) - 10} more)"
                                          if len(mismatched) > 10 else "")
    raise InteropError(f"{len(mismatched)} module(s) do not fit the base checkpoint: {shown}. "
                       "Is it the right base model (or pass --map)?", code="LT305", path=path)


def check_base_shape(name: str, want, base_shape, path: str) -> None:
    if base_shape is None:
        return
    if squeeze_trailing(want) != squeeze_trailing(base_shape):
        raise InteropError(f"module {name!r}: the adapter needs a base weight {list(want)} but "
                           f"the base checkpoint has {list(base_shape)}; is it the right base "
                           "model (or pass --map)?", code="LT305", path=path, module=name)


# --- adapters ------------------------------------------------------------------------------

def most_common(values, default=None):
    """The most frequent value (ties: the smallest); ``default`` when there is none."""
    counts = Counter(values)
    if not counts:
        return default
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def rename_modules(adapter, name_map: dict[str, str] | None):
    """Rename modules by ``name_map``: exact ``OLD=NEW``, or prefix ``OLD.=NEW.`` / ``OLD.=``."""
    if not name_map:
        return adapter, []
    renamed = {}
    changed = 0
    for name, m in adapter.modules.items():
        new = map_name(name, name_map)
        new = name if new is None else new
        if not MODULE_NAME_RE.match(new):
            raise InteropError(f"--map renames {name!r} to {new!r}, which is not dot-separated "
                               "segments of letters, digits, '_' and '-'", code="LT307",
                               module=name)
        if new in renamed:
            raise InteropError(f"--map sends two modules to {new!r}", code="LT307", module=new)
        changed += new != name
        renamed[new] = m.with_tensors(name=new)
    adapter.modules = dict(sorted(renamed.items()))
    reps = {}
    for target, r in adapter.replacements.items():
        new = map_name(target, name_map)
        new = target if new is None else new
        if not MODULE_NAME_RE.match(new) or new in reps:
            raise InteropError(f"--map renames replaced tensor {target!r} to {new!r}, which is "
                               "not a valid, distinct tensor name", code="LT307", module=target)
        changed += new != target
        reps[new] = replace(r, target=new)
    adapter.replacements = dict(sorted(reps.items()))
    return adapter, ([f"renamed {changed} module(s) by --map"] if changed else [])


def refuse_replacements(adapter, fmt: str) -> None:
    """A format without replacement entries refuses an adapter that has them (LT306), naming
    them: dropping them would change what the adapter does."""
    reps = list(adapter.replacements)
    if reps:
        shown = ", ".join(reps[:12]) + (f", ... ({len(reps) - 12} more)" if len(reps) > 12
                                        else "")
        raise InteropError(
            f"the {fmt} format cannot hold replaced tensors (PEFT modules_to_save, trained "
            f"biases, saved embeddings, trainable tokens); this adapter replaces {len(reps)}: "
            f"{shown}. Convert to loratool or peft instead", code="LT306")


def require_regular_file(path: str, what: str, code: str = "LT301") -> None:
    """``guards.require_regular_file`` raising an InteropError."""
    _require_regular(path, what, code=code, error=InteropError)


def read_json_config(path: str) -> dict:
    """A small JSON object file of a format (PEFT's adapter_config.json), size-capped."""
    import json
    name = os.path.basename(path)
    require_regular_file(path, name, code="LT302")
    try:
        raw = read_capped(path, MAX_CONFIG_BYTES)
    except TooLarge:
        raise InteropError(f"{name} is larger than {MAX_CONFIG_BYTES} bytes; an adapter "
                           "config is small JSON", code="LT302", path=path) from None
    except OSError as e:
        raise InteropError(f"cannot read {name} as JSON: {str(e)[:200]}", code="LT302",
                           path=path) from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise InteropError(f"cannot read {name} as JSON: {str(e)[:200]}", code="LT302",
                           path=path) from None
    if not isinstance(obj, dict):
        raise InteropError(f"{name} is not a JSON object", code="LT302", path=path)
    return obj


def check_factors(module: str, dtypes: dict, a, b, path: str, *, what: str = "lora_A/lora_B"
                  ) -> None:
    """Rank >= 1, no empty dimension, float dtypes (F16/BF16/F32/F64)."""
    if a[0] < 1 or any(d == 0 for d in (*a, *b)):
        raise InteropError(f"module {module!r}: {what} shapes {list(a)} and {list(b)} have an "
                           "empty dimension (rank must be at least 1)", code="LT305", path=path,
                           module=module)
    bad = {role: d for role, d in dtypes.items() if d not in ADAPTER_DTYPES}
    if bad:
        shown = ", ".join(f"{r} {d}" for r, d in sorted(bad.items()))
        raise InteropError(f"module {module!r}: {shown}; adapter tensors must be one of "
                           f"{', '.join(ADAPTER_DTYPES)}", code="LT305", path=path,
                           module=module)


def check_module_name(name: str, path: str, fmt: str) -> None:
    if len(name) > MAX_MODULE_NAME or not MODULE_NAME_RE.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InteropError(f"{fmt} module name {shown!r} is not dot-separated segments of "
                           f"letters, digits, '_' and '-' (at most {MAX_MODULE_NAME} "
                           "characters)", code="LT307", path=path)
