"""PEFT LoRA adapters: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``), or the weights file alone with the config beside it.

Mapping to the canonical model (spec/interop.md, "PEFT"):
  ``base_model.model.<m>.lora_A.weight`` [r, in, *k] -> ``<m>`` A; ``lora_B.weight`` -> B;
  ``lora_embedding_A`` / ``lora_embedding_B`` -> an embedding module (same shapes);
  ``lora_B.bias`` -> ``bias``; ``lora_magnitude_vector`` ([out], conv [1, out, 1, ...]) ->
  ``magnitude``. Per-module alpha and rank come from ``alpha_pattern``/``rank_pattern`` resolved
  exactly as PEFT does (``get_pattern_key``: first key, in file order, that matches the module
  path as ``(.*\\.)?(key)$``); the rank is the shape's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import InteropError
from ..format import (KIND_CONV, KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, LAYOUT_OUT_IN,
                      SCALING_RSLORA, SCALING_STANDARD)
from ..model import Adapter, AdapterInfo, LoraModule
from . import _common as C
from ._peft_config import CONFIG_NAME, check_config, get_pattern_key  # noqa: F401
from ..variants import Dora, Lora
from .base import (DECLARED, NAMES, Capabilities, LoadResult, ModuleRecord, Probe,
                   ReaderOptions)

NAME = "peft"
CAPABILITIES = Capabilities(
    kinds=frozenset({KIND_LINEAR, KIND_CONV, KIND_EMBEDDING}),
    variants=frozenset({Lora.name, Dora.name}), bias=True,
    rslora=True, per_module_alpha=True,
    reads=frozenset({"alpha", "fan_in_fan_out", "base", "name_map"}))

WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# PEFT config options whose adapters are not plain LoRA deltas: refused (LT308).
_UNSUPPORTED = {
    "use_qalora": "QALoRA pools the input; its delta is not a weight delta",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA only applies after invocation tokens",
    "layer_replication": "layer replication duplicates base layers the adapter refers to",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts)",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# role of a key suffix
_SUFFIXES = (
    (".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
    (".lora_B.bias", "bias", False),
    (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True),
    (".lora_magnitude_vector", "magnitude", None),
    (".lora_magnitude_vector.weight", "magnitude", None),
)


def detect(probe: Probe) -> int:
    if probe.is_dir:
        return DECLARED if (probe.beside(CONFIG_NAME) or any(
            probe.beside(n) for n in WEIGHTS_NAMES)) else 0
    if probe.is_pickle and probe.beside(CONFIG_NAME):
        return DECLARED
    # kohya names are checked first (NAMES + 1): a file with both is kohya, as it always was
    return NAMES if any(n.endswith((".lora_A.weight", ".lora_B.weight"))
                        or ".lora_embedding_A" in n for n in probe.names) else 0


def locate(path: str) -> tuple[str | None, str]:
    """(config path or None, weights path) of a PEFT adapter given as a directory or file."""
    if os.path.isdir(path):
        config = os.path.join(path, CONFIG_NAME)
        for name in WEIGHTS_NAMES:
            weights = os.path.join(path, name)
            if os.path.exists(weights):
                return (config if os.path.exists(config) else None), weights
        raise InteropError(f"PEFT directory {path} has no {' or '.join(WEIGHTS_NAMES)}",
                           code="LT302", path=path)
    config = os.path.join(os.path.dirname(path) or ".", CONFIG_NAME)
    return (config if os.path.exists(config) else None), path


def _split(name: str):
    for suffix, role, emb in _SUFFIXES:
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            if module.startswith(PREFIX):
                module = module[len(PREFIX):]
            return module, role, emb
    return None


@dataclass
class _Record(ModuleRecord):
    embedding: bool | None = None  # lora_embedding_A/B names (None: not known yet)


class _Plan:
    """Everything the header (and config) say: modules with their tensor names and facts."""

    def __init__(self, path: str, options: ReaderOptions, strict: bool):
        self.path = path
        self.config_path, self.weights = locate(path)
        self.source = C.TensorSource(self.weights)
        self.notes: list[str] = []
        self.details: dict = {}
        self.config = self._config(options, strict)
        self.modules: dict[str, _Record] = {}
        self.unknown: list[str] = []
        self._group()
        self._facts(options)

    def _config(self, options, strict) -> dict:
        if self.config_path is None:
            alpha = C.get_alpha(options, fmt="peft", strict=strict, why=(
                f"{self.weights} has no {CONFIG_NAME} beside it, so lora_alpha is unknown"))
            self.details["peft_config"] = "none (alpha from --alpha)" if alpha else "none"
            return {"peft_type": "LORA", "lora_alpha": alpha, "r": None}
        cfg = C.read_json_config(self.config_path)
        self.details["peft_config"] = self.config_path
        if options.alpha is not None:
            self.notes.append(f"ignored --alpha: {CONFIG_NAME} gives lora_alpha")
        check_config(cfg, self.path)
        for key, what in _UNSUPPORTED.items():
            if cfg.get(key):
                raise InteropError(f"{CONFIG_NAME} sets {key} ({what}): such an adapter is not "
                                   "a plain low-rank weight delta and has no loratool form",
                                   code="LT308", path=self.path)
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            note = (f"init_lora_weights={init!r}: unless it was converted when saved, this "
                    "adapter applies to the base model as modified at initialization, not to "
                    "the original base")
            self.notes.append(note)
            self.details["init_lora_weights"] = init
        return cfg

    def _group(self):
        for name, (dtype, shape) in self.source.entries.items():
            split = _split(name)
            if split is None:
                self.unknown.append(name)
                continue
            module, role, emb = split
            C.check_module_name(module, self.path, "PEFT")
            rec = self.modules.setdefault(module, _Record(module))
            if role in rec.tensors:
                raise InteropError(f"module {module!r} has two {role} tensors", code="LT305",
                                   path=self.path, module=module)
            rec.tensors[role] = name
            if emb is not None:
                if rec.embedding is not None and rec.embedding != emb:
                    raise InteropError(f"module {module!r} mixes lora_A/lora_B and "
                                       "lora_embedding_A/B tensors", code="LT305",
                                       path=self.path, module=module)
                rec.embedding = emb

    def _facts(self, options):
        cfg = self.config
        default_r = cfg.get("r", 8)
        default_alpha = cfg.get("lora_alpha", 8)
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        scaling = SCALING_RSLORA if cfg.get("use_rslora") else SCALING_STANDARD
        fif = options.fan_in_fan_out
        if fif is None:
            fif = bool(cfg.get("fan_in_fan_out", False))
        default_layout = LAYOUT_IN_OUT if fif else LAYOUT_OUT_IN
        shapes = C.base_shapes(options)
        base_of = C.resolve_base(self.modules, options) if shapes is not None else {}
        use_dora = bool(cfg.get("use_dora"))
        for module, rec in sorted(self.modules.items()):
            t = rec.tensors
            if "A" not in t or "B" not in t:
                missing = "lora_A" if "A" not in t else "lora_B"
                raise InteropError(f"module {module!r} has no {missing} tensor", code="LT305",
                                   path=self.path, module=module)
            a_dtype, a = self.source.entries[t["A"]]
            _, b = self.source.entries[t["B"]]
            if rec.embedding:
                kind = KIND_EMBEDDING
                ok = len(a) == 2 and len(b) == 2
            elif len(a) >= 3:
                kind = KIND_CONV
                ok = len(a) == len(b) <= 5 and all(d == 1 for d in b[2:])
            else:
                kind = KIND_LINEAR
                ok = len(a) == 2 and len(b) == 2
            if not ok or a[0] != b[1]:
                why = ("a grouped conv (groups > 1) or a lora_B kernel larger than 1 has no "
                       "loratool form" if kind == KIND_CONV else
                       "the ranks or dimensions do not agree")
                raise InteropError(f"module {module!r}: lora_A {list(a)} and lora_B {list(b)}: "
                                   f"{why}", code="LT305", path=self.path, module=module)
            C.check_factors(module, {role: self.source.entries[k][0] for role, k in t.items()},
                            a, b, self.path)
            rank = a[0]
            r_key = get_pattern_key(rank_pattern.keys(), module)
            want_r = rank_pattern.get(r_key, default_r)
            if want_r is not None and int(want_r) != rank:
                raise InteropError(
                    f"module {module!r}: the config gives rank {want_r} (r / rank_pattern) but "
                    f"lora_A has rank {rank}; PEFT cannot load this adapter either. Fix r or "
                    f"rank_pattern in {CONFIG_NAME}", code="LT305", path=self.path, module=module)
            a_key = get_pattern_key(alpha_pattern.keys(), module)
            alpha = alpha_pattern.get(a_key, default_alpha)
            if alpha is None:  # no config and no --alpha (read_info only): scale 1 shown
                alpha = float(rank) if scaling == SCALING_STANDARD else rank ** 0.5
            out, in_ = b[0], a[1]
            base_key = base_of.get(module)
            base_shape = shapes.get(base_key) if base_key else None
            if kind == KIND_LINEAR:
                layout = C.layout_for(module, out, in_, base_shape, default_layout, self.path)
            else:
                layout = LAYOUT_IN_OUT if kind == KIND_EMBEDDING else LAYOUT_OUT_IN
                want = (in_, out) if kind == KIND_EMBEDDING else (out, in_, *a[2:])
                C.check_base_shape(module, want, base_shape, self.path)
            if "magnitude" in t:
                _, mshape = self.source.entries[t["magnitude"]]
                ok_m = (mshape == (out,) or (kind == KIND_CONV and mshape == (1, out) + (1,) * (
                    len(a) - 2)))
                if not ok_m:
                    raise InteropError(f"module {module!r}: lora_magnitude_vector has shape "
                                       f"{list(mshape)}; expected [{out}]", code="LT305",
                                       path=self.path, module=module)
                if not use_dora:
                    raise InteropError(f"module {module!r} has a DoRA magnitude but "
                                       f"{CONFIG_NAME} does not set use_dora", code="LT305",
                                       path=self.path, module=module)
            elif use_dora:
                raise InteropError(f"{CONFIG_NAME} sets use_dora but module {module!r} has no "
                                   "lora_magnitude_vector", code="LT305", path=self.path,
                                   module=module)
            if "bias" in t and self.source.entries[t["bias"]][1] != (out,):
                raise InteropError(f"module {module!r}: lora_B.bias has shape "
                                   f"{list(self.source.entries[t['bias']][1])}; expected [{out}]",
                                   code="LT305", path=self.path, module=module)
            rec.kind, rec.layout, rec.alpha, rec.scaling = kind, layout, float(alpha), scaling
            rec.a_shape, rec.b_shape, rec.dtype = tuple(a), tuple(b), a_dtype
        self.default_alpha = float(default_alpha) if default_alpha is not None else (
            float(C.most_common(r.alpha for r in self.modules.values()) or 1.0))
        tm = cfg.get("target_modules")
        if tm is not None:
            text = tm if isinstance(tm, str) else ", ".join(map(str, tm))
            self.details["target_modules"] = text if len(text) <= 120 else text[:117] + "..."
        for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
            if cfg.get(key):
                self.details[key] = True
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                self.details[key] = f"{len(cfg[key])} pattern(s)"
        if cfg.get("task_type"):
            self.details["task_type"] = cfg["task_type"]
        if self.weights.endswith(".bin"):
            self.details["weights"] = os.path.basename(self.weights) + " (weights-only pickle)"

    @property
    def extra_metadata(self) -> dict[str, str]:
        meta = dict(self.source.metadata)
        if meta.get("format") == "pt":
            del meta["format"]  # what PEFT always writes; the PEFT writer adds it back
        return {k: v for k, v in meta.items() if not k.startswith("loratool.")}

    def check_unknown(self, options) -> list[str]:
        return C.check_unknown(
            self.unknown, options, path=self.path, fmt="PEFT",
            hint="(modules_to_save, saved embedding layers and trainable biases are full "
                 "weights, not LoRA factors.)")


def read_info(path: str, options: ReaderOptions) -> AdapterInfo:
    plan = _Plan(path, options, strict=False)
    details = dict(plan.details)
    if plan.unknown:
        details["unknown_tensors"] = ", ".join(sorted(plan.unknown))
    modules = {name: r.info() for name, r in sorted(plan.modules.items())}
    return AdapterInfo(path=path, format_version=None, modules=modules,
                       alpha=plan.default_alpha, base_model=plan.config.get(
                           "base_model_name_or_path"),
                       extra_metadata=plan.extra_metadata, source_format="peft",
                       tensor_bytes=plan.source.tensor_bytes, details=details)


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    plan = _Plan(path, options, strict=True)
    notes = list(plan.notes) + plan.check_unknown(options)
    modules = {}
    for name, r in sorted(plan.modules.items()):
        tensors = C.read_tensors(plan, r, path, options)
        mag = tensors.get("magnitude")
        if mag is not None:
            mag = mag.reshape(-1)
        modules[name] = LoraModule(name, r.kind, r.layout, tensors["A"], tensors["B"],
                                   r.alpha, r.scaling, mag, tensors.get("bias"))
    adapter = Adapter(modules=modules, alpha=plan.default_alpha,
                      base_model=plan.config.get("base_model_name_or_path"),
                      extra_metadata=plan.extra_metadata, source_format="peft")
    return LoadResult(adapter, notes, sorted(plan.unknown) if options.allow_unknown else [])


def load(path: str, options: ReaderOptions) -> Adapter:
    return load_report(path, options).adapter


def validate(path: str, options: ReaderOptions, *, data: bool = True):
    """Valid when it reads into the canonical model; with ``data``, NaN/Inf and zero B."""
    # strict as load is: what merge/convert refuse (alpha unknown: LT304) is not valid
    plan = _Plan(path, options, strict=True)
    plan.check_unknown(options)  # what load refuses (LT303), validate refuses with its code
    return C.scan_plan(plan) if data else []


# --- writing -------------------------------------------------------------------------------

def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _patterns(values: dict, default) -> dict:
    """A rank/alpha pattern giving each module its value under PEFT's first-match rule.

    Keys are escaped full module paths, longest first; a module whose value is the default
    still gets its own key when a shorter key (a dotted suffix of its path) would capture it.
    """
    names = sorted(values, key=lambda n: (-len(n), n))
    chosen = {n for n in names if values[n] != default}
    while True:
        pattern = {re.escape(n): values[n] for n in names if n in chosen}
        wrong = {n for n in names if n not in chosen
                 and pattern.get(get_pattern_key(pattern, n), default) != values[n]}
        if not wrong:
            return pattern
        chosen |= wrong


def save(adapter: Adapter, path: str, options: ReaderOptions) -> list[str]:
    """Write a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern`` (escaped full module
    paths, longest first, so PEFT's first-match rule picks each module's own entry).
    """
    import torch

    from ..atomic import AtomicDir
    from ..stfile import SafetensorsWriter
    from ..tensors import st_dtype, to_bytes
    path = os.fspath(path)
    if path.lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".json")):
        raise InteropError(f"a PEFT adapter is a directory; give -o a directory path, not "
                           f"{os.path.basename(path)}", code="LT306", path=path)
    mods = list(adapter.modules.values())
    if not mods:
        raise InteropError("the adapter has no modules", code="LT306")
    notes: list[str] = []
    dora = {m.variant is Dora for m in mods}
    if len(dora) > 1:
        raise InteropError("some modules have a DoRA magnitude and others do not; PEFT's "
                           "use_dora applies to every module of an adapter. Split the adapter",
                           code="LT306")
    use_dora = dora.pop()
    has_bias = any(m.bias is not None for m in mods)
    if has_bias and use_dora:
        raise InteropError("PEFT does not support lora_bias together with DoRA", code="LT306")
    if has_bias and any(m.kind == KIND_EMBEDDING for m in mods):
        raise InteropError("PEFT does not support lora_bias on embedding modules; this adapter "
                           "has both", code="LT306")
    scalings = {m.scaling for m in mods}
    use_rslora = scalings == {SCALING_RSLORA}
    if len(scalings) > 1:
        notes.append("modules mix rsLoRA and standard scaling; rsLoRA modules were written with "
                     "the standard alpha giving the same scale (alpha_pattern)")
    alphas = {}
    for m in mods:
        if m.scaling == SCALING_RSLORA and not use_rslora:
            alphas[m.name] = m.scale * m.rank
        else:
            alphas[m.name] = float(m.alpha)
    r = C.most_common(m.rank for m in mods)
    alpha = float(adapter.alpha) if float(adapter.alpha) in alphas.values() else C.most_common(
        alphas.values())
    rank_pattern = _patterns({m.name: m.rank for m in mods}, r)
    alpha_pattern = _patterns({n: _number(a) for n, a in alphas.items()}, _number(alpha))
    linear_layouts = {m.layout for m in mods if m.kind == KIND_LINEAR}
    fan_in_fan_out = linear_layouts == {LAYOUT_IN_OUT}
    if len(linear_layouts) > 1:
        notes.append("linear modules mix layouts (nn.Linear and GPT-2 Conv1D); PEFT's "
                     "fan_in_fan_out is global and written false: PEFT detects Conv1D layers "
                     "itself when loading")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(m.name for m in mods),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "lora_bias": has_bias,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for m in mods:
        key = PREFIX + m.name
        if m.kind == KIND_EMBEDDING:
            tensors[key + ".lora_embedding_A"] = m.A
            tensors[key + ".lora_embedding_B"] = m.B
        else:
            tensors[key + ".lora_A.weight"] = m.A
            tensors[key + ".lora_B.weight"] = m.B
        if has_bias:
            tensors[key + ".lora_B.bias"] = (m.bias if m.bias is not None else
                                             torch.zeros(m.B.shape[0], dtype=m.B.dtype))
        if m.magnitude is not None:
            mag = m.magnitude
            if m.kind == KIND_CONV:  # PEFT keeps the conv magnitude as [1, out, 1, ...]
                mag = mag.reshape((1, -1) + (1,) * (m.A.dim() - 2))
            tensors[key + ".lora_magnitude_vector"] = mag
    if has_bias and any(m.bias is None for m in mods):
        notes.append("lora_bias is global in PEFT: modules without a bias got a zero lora_B.bias")
    tensors = dict(sorted(tensors.items()))
    meta = {k: v for k, v in adapter.extra_metadata.items() if not k.startswith("loratool.")}
    meta["format"] = "pt"
    entries = [(n, st_dtype(t), tuple(t.shape)) for n, t in tensors.items()]
    with AtomicDir(path, overwrite=options.overwrite) as tmp:
        with SafetensorsWriter(os.path.join(tmp, WEIGHTS_NAMES[0]), entries, meta) as w:
            for name, t in tensors.items():
                w.write(name, to_bytes(t))
            w.commit()
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return notes

