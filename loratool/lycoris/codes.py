"""Rule codes of the LyCORIS reader (spec/lycoris.md, block LT230-LT249).

The summaries live in ``loratool.rules.RULES`` (the single list of codes); this module names
the codes for the parser.
"""

from __future__ import annotations

from ..errors import TensorError
from ..rules import RULES

UNKNOWN_PARAMS = "LT230"
UNSUPPORTED_FAMILY = "LT231"
MISSING_TENSOR = "LT232"
BAD_NDIM = "LT233"
RANK_MISMATCH = "LT234"
BAD_TUCKER_CORE = "LT235"
LOHA_TERMS_DIFFER = "LT236"
LOKR_BAD_SHAPE = "LT237"
BAD_ALPHA = "LT238"
BAD_DORA_SCALE = "LT239"
BAD_DIFF = "LT240"
SHAPE_MISMATCH = "LT241"
NEED_BASE_SHAPE = "LT242"
NO_LORA_FORM = "LT243"
ZERO_DIMENSION = "LT244"

# code: (level, summary), as listed in loratool.rules.RULES (the single list of codes)
LYCORIS_RULES: dict[str, tuple[str, str]] = {
    code: RULES[code] for code in (
        UNKNOWN_PARAMS, UNSUPPORTED_FAMILY, MISSING_TENSOR, BAD_NDIM, RANK_MISMATCH,
        BAD_TUCKER_CORE, LOHA_TERMS_DIFFER, LOKR_BAD_SHAPE, BAD_ALPHA, BAD_DORA_SCALE,
        BAD_DIFF, SHAPE_MISMATCH, NEED_BASE_SHAPE, NO_LORA_FORM, ZERO_DIMENSION)}


class LycorisError(TensorError):
    """A LyCORIS module that cannot be read or converted; ``code`` is one of LT230-LT244."""

    code = UNKNOWN_PARAMS


def fail(code: str, module: str, message: str) -> LycorisError:
    """The error to raise, with the module name in front of the message."""
    return LycorisError(f"LyCORIS module {module!r}: {message}", code=code, module=module)
