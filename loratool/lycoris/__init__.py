"""LyCORIS modules (LoCon, LoHa, LoKr, full, DoRA): parsing, exact deltas, exact plain-LoRA
conversion (spec/lycoris.md). Imports torch. Usage (``state_dict`` a LyCORIS file's
tensors, ``base`` the base checkpoint's)::

    from loratool import lycoris
    for name, params in lycoris.split_state_dict(state_dict).items():
        rec = lycoris.parse_module(name, params, shape=base[name].shape)
        dW = lycoris.delta(rec)                  # float64, the base's layout
        f = lycoris.to_lora(rec)                 # exact: f.rank, f.up(), f.down(), f.alpha
        g = lycoris.truncate(f, rank=64)         # g.retained: Frobenius fraction kept
"""

from .codes import LYCORIS_RULES, LycorisError
from .convert import LoraFactors, face_split, khatri_rao, lora_rank, to_lora, truncate
from .delta import DORA_EPS, bias_delta, delta, merged_weight
from .parse import KOHYA_PREFIXES, check_shape, detect_family, parse_module, split_state_dict
from .records import (SUPPORTED, Dora, DoraAxis, Family, Full, LoCon, LoHa, LoKr,
                      LycorisModule)

__all__ = [
    "LYCORIS_RULES", "LycorisError", "LoraFactors", "face_split", "khatri_rao", "lora_rank",
    "to_lora", "truncate", "DORA_EPS", "bias_delta", "delta", "merged_weight",
    "KOHYA_PREFIXES", "check_shape", "detect_family", "parse_module", "split_state_dict",
    "SUPPORTED", "Dora", "DoraAxis", "Family", "Full", "LoCon", "LoHa", "LoKr",
    "LycorisModule",
]
