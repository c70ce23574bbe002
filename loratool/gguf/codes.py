"""Rule codes of the GGUF support (block LT320-LT339; spec/gguf.md documents each).

The summaries are ``loratool.rules.GGUF_CODES`` (the one list of codes); this module names
the codes for the code that raises them.
"""

from __future__ import annotations

from ..rules import GGUF_CODES

GGUF_MISSING = "LT320"        # the optional `gguf` package is not installed
NOT_GGUF = "LT321"            # bad magic, unsupported version, big-endian, not a regular file
GGUF_TRUNCATED = "LT322"      # a length, count or offset points past the end or over a cap
GGUF_BAD_KV = "LT323"         # unknown value type, nested array, bad UTF-8, duplicate key
GGUF_BAD_TENSOR = "LT324"     # bad dims, unknown type, unaligned/overlapping/out-of-range data
GGUF_NOT_ADAPTER = "LT325"    # general.type/adapter.type/adapter.lora.alpha wrong or missing
GGUF_BAD_PAIR = "LT326"       # unpaired lora_a/lora_b, unknown suffix, shape/rank mismatch
GGUF_ARCH = "LT327"           # unknown architecture, head counts missing, permutation unknown
GGUF_NAME = "LT328"           # a module has no GGUF tensor name (or the reverse)
GGUF_UNSUPPORTED = "LT329"    # DoRA, bias, full tensors, conv: not expressible in llama.cpp
GGUF_OUT_TYPE = "LT330"       # requested output type cannot be written
GGUF_BASE_MISMATCH = "LT331"  # adapter module missing in the base, or shapes differ
GGUF_SPLIT = "LT332"          # split GGUF set incomplete or inconsistent
GGUF_NONFINITE = "LT333"      # NaN/Inf in factors, or the result overflows the output type
GGUF_SCALE = "LT334"          # a module's scale is not a finite non-zero number

GGUF_UNMERGE = "LT335"       # unmerge from a quantized GGUF: not invertible

# The table itself lives with every other code in ``loratool.rules``.
RULES: dict[str, tuple[str, str]] = GGUF_CODES
