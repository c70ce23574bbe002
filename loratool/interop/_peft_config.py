"""PEFT's ``adapter_config.json``: vetting it before use, and PEFT's pattern-key rule.

Split from ``peft.py`` (the format plug-in) to keep each module readable in one go.
"""

from __future__ import annotations

import re

from ..errors import InteropError
from ..format import SCALING_RSLORA, SCALING_STANDARD

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # of every module key in a PEFT state dict
# diffusers' save_lora_weights: the LoraConfig of each component (unet, text_encoder...) as one
# flat JSON object in the weights file's metadata, keys "<component>.<config key>"
DIFFUSERS_METADATA = "lora_adapter_metadata"


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """PEFT's own rule (peft.utils.other.get_pattern_key): the first matching pattern wins."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def rank_alpha(cfg: dict, key: str) -> tuple:
    """(r, lora_alpha, scaling) of module (or parameter) ``key`` under config ``cfg`` as PEFT
    resolves them: ``rank_pattern``/``alpha_pattern`` (first matching key), else ``r`` and
    ``lora_alpha`` (PEFT's defaults: 8 and 8; a None stays None); rsLoRA by ``use_rslora``."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), cfg.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key),
                              cfg.get("lora_alpha", 8))
    return r, alpha, SCALING_RSLORA if cfg.get("use_rslora") else SCALING_STANDARD


try:  # the regex parser, to vet patterns from files before running them
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore

MAX_PATTERN = 256
MAX_PATTERN_REPEATS = 3


def _vet_pattern(key: str, where: str, path: str) -> None:
    """Refuse regexes that could backtrack for ages on a module name (LT302): nested
    repetition, repeated alternation, more than a few unbounded repeats."""
    def bad(why):
        return InteropError(f"{CONFIG_NAME}: {where} key {key[:60]!r} {why}", code="LT302",
                            path=path)

    if not isinstance(key, str) or len(key) > MAX_PATTERN:
        raise bad(f"must be a string of at most {MAX_PATTERN} characters")
    try:
        parsed = _sre_parse.parse(key)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise bad(f"is not a valid regular expression ({e})") from None
    repeats = 0

    def walk(items, inside_repeat: bool):
        nonlocal repeats
        for op, av in items:
            name = str(op)
            if name.endswith("REPEAT"):
                lo, hi, sub = av
                if hi != 1:
                    if inside_repeat:
                        raise bad("nests repetition (catastrophic backtracking)")
                    repeats += 1
                walk(sub, inside_repeat or hi != 1)
            elif name == "SUBPATTERN":
                walk(av[-1], inside_repeat)
            elif name == "BRANCH":
                if inside_repeat:
                    raise bad("repeats an alternation (catastrophic backtracking)")
                for sub in av[1]:
                    walk(sub, inside_repeat)
            elif name in ("ASSERT", "ASSERT_NOT"):
                walk(av[1], inside_repeat)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                raise bad("uses a backreference")

    walk(parsed, False)
    if repeats > MAX_PATTERN_REPEATS:
        raise bad(f"has more than {MAX_PATTERN_REPEATS} unbounded repeats")


def check_config(cfg: dict, path: str) -> None:
    """Types and ranges of the config keys loratool uses (LT302); PEFT would reject these too."""
    def bad(key, why):
        return InteropError(f"{CONFIG_NAME}: {key} is {_short(cfg.get(key))}; {why}",
                            code="LT302", path=path)

    ptype = cfg.get("peft_type", "LORA")
    if ptype != "LORA":
        raise InteropError(f"{CONFIG_NAME} has peft_type {_short(ptype)}; loratool reads LoRA "
                           "adapters (peft_type LORA) only", code="LT302", path=path)
    if "r" in cfg and not _is_rank(cfg["r"]):
        raise bad("r", "expected a positive integer rank")
    if "lora_alpha" in cfg and not _is_alpha(cfg["lora_alpha"]):
        raise bad("lora_alpha", "expected a finite non-zero number")
    for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "expected true or false")
    for key, check, what in (("rank_pattern", _is_rank, "a positive integer rank"),
                             ("alpha_pattern", _is_alpha, "a finite non-zero number")):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(key, "expected an object of regex -> value")
        for k, v in pattern.items():
            _vet_pattern(k, key, path)
            if not check(v):
                raise InteropError(f"{CONFIG_NAME}: {key}[{k[:60]!r}] is {_short(v)}; expected "
                                   f"{what}", code="LT302", path=path)
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, str) and not (
            isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        raise bad("target_modules", "expected a regex string or a list of module names")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only", None):
        raise bad("bias", "expected \"none\", \"all\" or \"lora_only\"")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**31


def _is_alpha(v) -> bool:
    import math
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2**1023
            and math.isfinite(float(v)) and v != 0)


def diffusers_components(text: str, path: str) -> dict[str, dict]:
    """``lora_adapter_metadata`` -> ``{component: LoraConfig dict}``, each vetted (LT302)."""
    import json

    from ..guards import reject_duplicate_keys
    try:
        flat = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise InteropError(f"{DIFFUSERS_METADATA} metadata is not JSON: {str(e)[:200]}",
                           code="LT302", path=path) from None
    if not isinstance(flat, dict):
        raise InteropError(f"{DIFFUSERS_METADATA} metadata is not a JSON object", code="LT302",
                           path=path)
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, dot, name = key.partition(".")
        if not dot or not comp or not name:
            raise InteropError(f"{DIFFUSERS_METADATA} key {key[:60]!r} is not "
                               "<component>.<config key>", code="LT302", path=path)
        out.setdefault(comp, {})[name] = value
    for cfg in out.values():
        check_config(cfg, path)
    return out


def init_record(value) -> dict | None:
    """``Adapter.init`` of a PEFT ``init_lora_weights`` that changes the base (None if not)."""
    from ..format import RESIDUAL_INITS
    if not isinstance(value, str):
        return None
    low = value.lower()
    method = next((m for m in RESIDUAL_INITS if low.startswith(m)), None)
    return None if method is None else {"method": method, "init_lora_weights": value}
