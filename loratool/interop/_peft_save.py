"""Writing PEFT LoRA adapters (``peft.save``): a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` that PEFT loads (spec/interop.md, "PEFT")."""

from __future__ import annotations

import json
import os
import re

from ..errors import InteropError
from ..format import KIND_CONV, KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, SCALING_RSLORA
from ..model import Adapter
from ..variants import Dora
from . import _common as C
from . import _peft_extras as X
from ._peft_config import CONFIG_NAME, PREFIX, WEIGHTS_NAMES, get_pattern_key
from .base import ReaderOptions

WEIGHTS_NAME = WEIGHTS_NAMES[0]  # what we write


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
    if not mods and not adapter.replacements:
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
    r = C.most_common((m.rank for m in mods), 8)
    alpha = float(adapter.alpha) if float(adapter.alpha) in alphas.values() else C.most_common(
        alphas.values(), float(adapter.alpha))
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
        "lora_dropout": 0.0,
        **X.config_fields(adapter),
        # Never a base-changing init here: PEFT would re-run it at load and change the
        # (already residual) base again. The init is kept as loratool.init in the weights.
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
    tensors.update(X.tensors(adapter, PREFIX))
    tensors = dict(sorted(tensors.items()))
    meta = {k: v for k, v in adapter.extra_metadata.items() if not k.startswith("loratool.")}
    meta["format"] = "pt"
    if adapter.init:
        from ..format import KEY_INIT, canonical_json
        meta[KEY_INIT] = canonical_json(adapter.init)
        notes.append(f"init {adapter.init['method']}: written as init_lora_weights true (PEFT "
                     "re-runs a base-changing init at load) and kept as loratool.init in "
                     f"{WEIGHTS_NAME}; load it onto the residual model")
    entries = [(n, st_dtype(t), tuple(t.shape)) for n, t in tensors.items()]
    with AtomicDir(path, overwrite=options.overwrite) as tmp:
        with SafetensorsWriter(os.path.join(tmp, WEIGHTS_NAME), entries, meta) as w:
            for name, t in tensors.items():
                w.write(name, to_bytes(t))
            w.commit()
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return notes

