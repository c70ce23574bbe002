"""LyCORIS modules (LoCon, LoHa, LoKr, full, DoRA): parsing, exact deltas, exact plain-LoRA
conversion (spec/lycoris.md). Parsing (``parse``, ``records``, ``codes``) reads shapes only
and imports no torch, so header-only commands can use it; the numeric names below import torch
when first used.

    Example::

        from loratool import lycoris
        for name, params in lycoris.split_state_dict(state_dict).items():
            rec = lycoris.parse_module(name, params, shape=base[name].shape)
            dW = lycoris.delta(rec)                  # float64, the base's layout
            f = lycoris.to_lora(rec)                 # exact: f.rank, f.up(), f.down(), f.alpha
            g = lycoris.truncate(f, rank=64)         # g.retained: Frobenius fraction kept
"""

from .codes import LYCORIS_RULES, LycorisError
from .parse import KOHYA_PREFIXES, check_shape, detect_family, parse_module, split_state_dict
from .records import (SUPPORTED, Dora, DoraAxis, Family, Full, LoCon, LoHa, LoKr,
                      LycorisModule)

_LAZY = {  # name -> submodule; these import torch
    **dict.fromkeys(("LoraFactors", "face_split", "khatri_rao", "lora_rank", "to_lora",
                     "truncate"), "convert"),
    **dict.fromkeys(("DORA_EPS", "bias_delta", "delta", "merged_weight"), "deltas"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LYCORIS_RULES", "LycorisError", "LoraFactors", "face_split", "khatri_rao", "lora_rank",
    "to_lora", "truncate", "DORA_EPS", "bias_delta", "delta", "merged_weight",
    "KOHYA_PREFIXES", "check_shape", "detect_family", "parse_module", "split_state_dict",
    "SUPPORTED", "Dora", "DoraAxis", "Family", "Full", "LoCon", "LoHa", "LoKr",
    "LycorisModule",
]
