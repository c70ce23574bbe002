"""Rule codes of the GGUF support (block LT320-LT339; spec/gguf.md documents each).

They live here until the lead folds them into ``loratool.rules.RULES``; the summaries are
written in the same form as that table so they can be moved as they are.
"""

from __future__ import annotations

MUST = "MUST"

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

RULES: dict[str, tuple[str, str]] = {
    GGUF_MISSING: (MUST, "GGUF support needs the optional `gguf` package "
                         "(pip install 'loratool[gguf]')"),
    NOT_GGUF: (MUST, "file is a regular little-endian GGUF file, version 2 or 3"),
    GGUF_TRUNCATED: (MUST, "every length, count and offset of the header lies inside the "
                           "file and under the reader's caps"),
    GGUF_BAD_KV: (MUST, "metadata values have a known type, arrays are not nested, strings "
                        "are UTF-8, no key appears twice"),
    GGUF_BAD_TENSOR: (MUST, "tensor infos have 1-4 positive dims, a known type, rows a "
                            "multiple of the block size, aligned non-overlapping in-file data, "
                            "distinct names"),
    GGUF_NOT_ADAPTER: (MUST, "a GGUF LoRA has general.type \"adapter\", adapter.type "
                             "\"lora\" and a finite adapter.lora.alpha"),
    GGUF_BAD_PAIR: (MUST, "every <name>.lora_a has a <name>.lora_b of matching rank and no "
                          "other suffix appears"),
    GGUF_ARCH: (MUST, "the architecture is known to gguf, head counts are known where q/k "
                      "rows are permuted, and whether they are permuted is known"),
    GGUF_NAME: (MUST, "every module has a GGUF tensor name for the architecture (and back)"),
    GGUF_UNSUPPORTED: (MUST, "a GGUF LoRA holds only low-rank linear/embedding deltas (no "
                             "DoRA magnitude, bias, full tensor or conv)"),
    GGUF_OUT_TYPE: (MUST, "the output type is one gguf can write for that tensor"),
    GGUF_BASE_MISMATCH: (MUST, "every adapted module exists in the base with the delta's "
                               "shape"),
    GGUF_SPLIT: (MUST, "a split GGUF set has all its parts, numbered consistently"),
    GGUF_NONFINITE: (MUST, "factors are finite and the merged result fits the output type"),
    GGUF_SCALE: (MUST, "each module's scale is a finite non-zero number"),
}
