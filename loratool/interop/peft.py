"""PEFT LoRA adapters: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``), or the weights file alone with the config beside it.

Mapping to the canonical model (spec/interop.md, "PEFT"):
  ``base_model.model.<m>.lora_A.weight`` [r, in, *k] -> ``<m>`` A; ``lora_B.weight`` -> B;
  ``lora_embedding_A`` / ``lora_embedding_B`` -> an embedding module (same shapes);
  ``lora_B.bias`` -> ``bias``; ``lora_magnitude_vector`` ([out], conv [1, out, 1, ...]) ->
  ``magnitude``. Per-module alpha and rank come from ``alpha_pattern``/``rank_pattern`` resolved
  exactly as PEFT does (``get_pattern_key``: first key, in file order, that matches the module
  path as ``(.*\\.)?(key)$``); the rank is the shape's.
  ``target_parameters`` (LoRA on MoE expert parameters): ``_peft_params``. The writer is in
  ``_peft_save``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import InteropError
from ..format import KEY_INIT, parse_init
from ..format import (KIND_CONV, KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, LAYOUT_OUT_IN,
                      SCALING_STANDARD)
from ..model import Adapter, AdapterInfo, LoraModule, Replacement, ReplacementInfo
from . import _common as C
from . import _peft_extras as X
from . import _peft_params as P
from ._peft_config import (CONFIG_NAME, DIFFUSERS_METADATA, PREFIX, WEIGHTS_NAMES,  # noqa: F401
                           check_config, diffusers_components, get_pattern_key, init_record,
                           rank_alpha)
from ..variants import Dora, Lora
from .base import (DECLARED, NAMES, Capabilities, LoadResult, ModuleRecord, Probe,
                   ReaderOptions)

NAME = "peft"
CAPABILITIES = Capabilities(
    kinds=frozenset({KIND_LINEAR, KIND_CONV, KIND_EMBEDDING}),
    variants=frozenset({Lora.name, Dora.name}), bias=True,
    rslora=True, per_module_alpha=True, replacements=True,
    reads=frozenset({"alpha", "fan_in_fan_out", "base", "name_map"}))


# PEFT config options whose adapters are not plain LoRA deltas: refused (LT308).
_UNSUPPORTED = {
    "use_qalora": "QALoRA pools the input; its delta is not a weight delta",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA only applies after invocation tokens",
    "layer_replication": "layer replication duplicates base layers the adapter refers to",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


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
        # target_parameters: LoRA on nn.Parameters (MoE experts), read by _peft_params
        self.param_groups = (P.take(self.modules, P.targets(self.config, self.path), self.path)
                             if self.config.get("target_parameters") else {})
        self.full, self.rows, ignored, self.unknown = X.split_unknown(
            self.unknown, self.source.entries, self.config, self.path, PREFIX)
        for name, why in ignored:
            self.notes.append(f"ignored {name}: {why}")
        self._facts(options)

    def _config(self, options, strict) -> dict:
        self.components: dict[str, dict] = {}
        if self.config_path is None and DIFFUSERS_METADATA in self.source.metadata:
            return self._diffusers_config(options)
        if self.config_path is None:
            alpha = C.get_alpha(options, fmt="peft", strict=strict, why=(
                f"{self.weights} has no {CONFIG_NAME} beside it, so lora_alpha is unknown"))
            self.details["peft_config"] = "none (alpha from --alpha)" if alpha else "none"
            self.init = None
            return {"peft_type": "LORA", "lora_alpha": alpha, "r": None}
        cfg = C.read_json_config(self.config_path)
        self.details["peft_config"] = self.config_path
        if options.alpha is not None:
            self.notes.append(f"ignored --alpha: {CONFIG_NAME} gives lora_alpha")
        check_config(cfg, self.path)
        self._vet(cfg)
        self.init = init_record(cfg.get("init_lora_weights"))
        if self.init is None and KEY_INIT in self.source.metadata:  # written by loratool
            self.init = parse_init(self.source.metadata[KEY_INIT])
        if self.init is not None:
            # PEFT's converted saves (path_initial_model_for_weight_conversion) write
            # init_lora_weights true: those are plain LoRA of the original base.
            said = self.init.get("init_lora_weights", self.init["method"])
            self.notes.append(f"init {said!r}: this adapter applies to the residual model "
                              "made at initialisation, not to the original base (kept as "
                              "loratool.init)")
            self.details["init"] = (f"{said} (applies to the residual model made at "
                                    "initialisation, not the original base)")
        return cfg

    def _vet(self, cfg, where: str = CONFIG_NAME) -> None:
        for key, what in _UNSUPPORTED.items():
            if cfg.get(key):
                raise InteropError(f"{where} sets {key} ({what}): such an adapter is not "
                                   "a plain low-rank weight delta and has no loratool form",
                                   code="LT308", path=self.path)

    def _diffusers_config(self, options) -> dict:
        """diffusers' ``pytorch_lora_weights.safetensors``: one LoraConfig per component
        (``unet``, ``text_encoder``...) in its metadata; modules are ``<component>.<path>``."""
        self.components = diffusers_components(self.source.metadata[DIFFUSERS_METADATA],
                                               self.path)
        for comp, cfg in self.components.items():
            self._vet(cfg, f"{DIFFUSERS_METADATA} ({comp})")
            if init_record(cfg.get("init_lora_weights")):
                raise InteropError(f"{DIFFUSERS_METADATA} ({comp}) has init_lora_weights "
                                   f"{cfg['init_lora_weights']!r}, which changes the base",
                                   code="LT308", path=self.path)
        self.details["peft_config"] = (f"diffusers {DIFFUSERS_METADATA} ("
                                       + ", ".join(sorted(self.components)) + ")")
        if options.alpha is not None:
            self.notes.append(f"ignored --alpha: {DIFFUSERS_METADATA} gives lora_alpha")
        self.init = None
        first = self.components[sorted(self.components)[0]]
        return {**first, "peft_type": "LORA"}

    def _config_for(self, module: str) -> tuple[dict, str]:
        """The config of a module and its path as PEFT matches patterns against it (inside
        its diffusers component)."""
        comp, dot, rest = module.partition(".")
        if dot and comp in self.components:
            return self.components[comp], rest
        return self.config, module

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
        default_alpha = cfg.get("lora_alpha", 8)
        # PEFT's fan_in_fan_out is one flag that PEFT itself corrects per layer at load
        # (nn.Linear: False, Conv1D: True): each module's layout comes from the base.
        layouts = C.LinearLayouts(options, self.path, declared=bool(cfg.get(
            "fan_in_fan_out", False)) if self.config_path else None, what=CONFIG_NAME)
        mismatched = layouts.mismatched
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
            if self.components:
                mcfg, key = self._config_for(module)
                default_alpha = mcfg.get("lora_alpha", 8)  # the adapter's: the last component's
            else:
                mcfg, key = cfg, module
            want_r, alpha, scaling = rank_alpha(mcfg, key)
            if want_r is not None and int(want_r) != rank:
                raise InteropError(
                    f"module {module!r}: the config gives rank {want_r} (r / rank_pattern) but "
                    f"lora_A has rank {rank}; PEFT cannot load this adapter either. Fix r or "
                    f"rank_pattern in {CONFIG_NAME}", code="LT305", path=self.path, module=module)
            if alpha is None:  # no config and no --alpha (read_info only): scale 1 shown
                alpha = float(rank) if scaling == SCALING_STANDARD else rank ** 0.5
            out, in_ = b[0], a[1]
            base_key = base_of.get(module)
            base_shape = shapes.get(base_key) if base_key else None
            if kind == KIND_LINEAR:
                layout = layouts(module, out, in_, base_shape)
            else:
                layout = LAYOUT_IN_OUT if kind == KIND_EMBEDDING else LAYOUT_OUT_IN
                want = (in_, out) if kind == KIND_EMBEDDING else (out, in_, *a[2:])
                why = C.base_shape_mismatch(module, want, base_shape)
                if why:
                    mismatched.append(why)
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
        C.check_mismatches(mismatched, options, self.path)
        self.notes.extend(layouts.notes())
        if self.param_groups:
            for rec in P.resolve(self.param_groups, cfg, self.source.entries, options,
                                 self.path):
                self.modules[rec.name] = rec
            self.details["target_parameters"] = ", ".join(cfg["target_parameters"])[:120]
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
        for key in ("modules_to_save", "trainable_token_indices"):
            if cfg.get(key):
                self.details[key] = json.dumps(cfg[key])[:120]
        if cfg.get("bias") not in (None, "none"):
            self.details["bias"] = cfg["bias"]
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
            hint="(modules_to_save, saved embedding layers, trained biases and trainable "
                 "tokens are read as replacements; these are none of them.)")

    def replacement_infos(self) -> dict[str, ReplacementInfo]:
        out = {}
        for target, name in self.full.items():
            dtype, shape = self.source.entries[name]
            out[target] = ReplacementInfo(target, tuple(shape), dtype)
        for target, (name, idx) in self.rows.items():
            dtype, shape = self.source.entries[name]
            out[target] = ReplacementInfo(target, tuple(shape), dtype, len(idx))
        return dict(sorted(out.items()))

    def replacements(self, options) -> dict[str, Replacement]:
        out = {}
        for target, name in self.full.items():
            t = self.source.get(name)
            C.check_finite(t, name, self.path, target, options)
            out[target] = Replacement(target, t)
        for target, (name, idx) in self.rows.items():
            import torch  # here: an adapter without row replacements is read without torch
            t = self.source.get(name)
            C.check_finite(t, name, self.path, target, options)
            out[target] = Replacement(target, t, torch.tensor(idx, dtype=torch.int64))
        return out


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
                       init=plan.init, tensor_bytes=plan.source.tensor_bytes, details=details,
                       replacements=plan.replacement_infos())


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    plan = _Plan(path, options, strict=True)
    notes = list(plan.notes) + plan.check_unknown(options)
    modules = {}
    for name, r in sorted(plan.modules.items()):
        tensors = C.read_tensors(plan, r, path, options)
        mag = tensors.get("magnitude")
        if mag is not None:
            mag = mag.reshape(-1)
        if isinstance(r, P.ParamRecord):
            modules[name] = P.load_module(r, tensors)
            continue
        modules[name] = LoraModule(name, r.kind, r.layout, tensors["A"], tensors["B"],
                                   r.alpha, r.scaling, mag, tensors.get("bias"))
    adapter = Adapter(modules=modules, replacements=plan.replacements(options),
                      alpha=plan.default_alpha,
                      base_model=plan.config.get("base_model_name_or_path"),
                      extra_metadata=plan.extra_metadata, source_format="peft",
                      init=plan.init)
    return LoadResult(adapter, notes, sorted(plan.unknown) if options.allow_unknown else [])


def load(path: str, options: ReaderOptions) -> Adapter:
    return load_report(path, options).adapter


def validate(path: str, options: ReaderOptions, *, data: bool = True):
    """Valid when it reads into the canonical model; with ``data``, NaN/Inf and zero B."""
    # strict as load is: what merge/convert refuse (alpha unknown: LT304) is not valid
    plan = _Plan(path, options, strict=True)
    plan.check_unknown(options)  # what load refuses (LT303), validate refuses with its code
    return C.scan_plan(plan) if data else []


from ._peft_save import save  # noqa: E402,F401 - the format's writer
