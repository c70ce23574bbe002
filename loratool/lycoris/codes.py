"""Rule codes of the LyCORIS reader (spec/lycoris.md, block LT230-LT249).

Kept here until the lead merges them into ``loratool.rules.RULES``; the summaries below are the
rows to add there, word for word.
"""

from __future__ import annotations

from ..errors import TensorError

MUST = "MUST"

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

# code: (level, summary): the rows for loratool.rules.RULES
LYCORIS_RULES: dict[str, tuple[str, str]] = {
    UNKNOWN_PARAMS: (MUST, "a LyCORIS module's parameter names identify exactly one family"),
    UNSUPPORTED_FAMILY: (MUST, "the LyCORIS family is one loratool reads (LoCon, LoHa, LoKr, "
                               "full); IA3, GLoRA, OFT, BOFT and norms are refused by name"),
    MISSING_TENSOR: (MUST, "a LyCORIS module has every tensor its family needs, in one form"),
    BAD_NDIM: (MUST, "each LyCORIS tensor has the number of dimensions of its role"),
    RANK_MISMATCH: (MUST, "paired LyCORIS factors agree on the rank"),
    BAD_TUCKER_CORE: (MUST, "a Tucker core (lora_mid, hada_t*, lokr_t2) is (r, r, *kernel) "
                            "for its factors"),
    LOHA_TERMS_DIFFER: (MUST, "the two Hadamard terms of a LoHa module have the same shape"),
    LOKR_BAD_SHAPE: (MUST, "a LoKr module's kron(w1, w2) has the base weight's shape"),
    BAD_ALPHA: (MUST, "a LyCORIS alpha is one finite number"),
    BAD_DORA_SCALE: (MUST, "dora_scale has shape (out, 1, ...) or (1, in, ...)"),
    BAD_DIFF: (MUST, "diff has the weight's shape and diff_b the shape (out,)"),
    SHAPE_MISMATCH: (MUST, "a LyCORIS module's delta fits the base weight's shape"),
    NEED_BASE_SHAPE: (MUST, "a conv module stored with flattened factors is given the base "
                            "weight's shape"),
    NO_LORA_FORM: (MUST, "only modules with a low-rank form convert to plain LoRA (not DoRA; "
                         "full diff only as a requested SVD)"),
    ZERO_DIMENSION: (MUST, "every rank and dimension of a LyCORIS module is at least 1"),
}


class LycorisError(TensorError):
    """A LyCORIS module that cannot be read or converted; ``code`` is one of LT230-LT244."""

    code = UNKNOWN_PARAMS


def fail(code: str, module: str, message: str) -> LycorisError:
    """The error to raise, with the module name in front of the message."""
    return LycorisError(f"LyCORIS module {module!r}: {message}", code=code, module=module)
