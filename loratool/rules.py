"""The numbered rules of the spec, and the finding type that reports a broken one.

The table below is the single list of rule codes: the spec documents each, ``validate``
reports them, error messages carry them, and the tests check every one of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MUST = "MUST"
SHOULD = "SHOULD"

# code: (level, summary)
RULES: dict[str, tuple[str, str]] = {
    # container (safetensors)
    "LT001": (MUST, "file is a complete safetensors file (8-byte length, header, data)"),
    "LT002": (MUST, "header length is at most 100,000,000 bytes"),
    "LT003": (MUST, "header is a UTF-8 JSON object, nesting at most 8 levels"),
    "LT004": (MUST, "no key appears twice in the header"),
    "LT005": (MUST, "__metadata__ is an object whose values are strings"),
    "LT006": (MUST, "each tensor entry has a known dtype, a shape of non-negative integers "
                    "and data_offsets"),
    "LT007": (MUST, "each tensor's byte span equals its shape times its dtype size"),
    "LT008": (MUST, "tensor data is contiguous, in range, without overlap, gap or trailing "
                    "bytes"),
    # metadata
    "LT101": (MUST, "loratool.format is \"loratool.adapter\""),
    "LT102": (MUST, "loratool.format_version is MAJOR.MINOR"),
    "LT103": (MUST, "the major format version is one this reader supports (1)"),
    "LT104": (MUST, "loratool.scaling is \"standard\" or \"rslora\""),
    "LT105": (MUST, "alpha values are finite, non-zero decimal numbers"),
    "LT106": (MUST, "loratool.target_modules is a JSON list of distinct valid module names"),
    "LT107": (MUST, "loratool.modules is a JSON object of module records with a valid kind "
                    "and layout"),
    "LT108": (MUST, "target_modules, the modules table and the tensors name the same modules"),
    "LT109": (MUST, "hash values are \"sha256:\" and 64 lowercase hex digits"),
    "LT110": (MUST, "loratool.tensor_hash, when present, matches the tensor data"),
    "LT111": (SHOULD, "loratool.tensor_hash is present"),
    "LT115": (MUST, "loratool.init, when present, is a JSON object with a \"method\" string"),
    # tensors
    "LT201": (MUST, "every tensor is named <module>.<role> with a known role"),
    "LT202": (MUST, "every module has both lora_A and lora_B"),
    "LT203": (MUST, "adapter tensors are F16, BF16, F32 or F64"),
    "LT204": (MUST, "A and B have the dimensions of the module's kind"),
    "LT205": (MUST, "A and B agree on the rank"),
    "LT206": (MUST, "the rank is at least 1"),
    "LT207": (MUST, "conv B has size 1 in every spatial dimension; conv modules use layout "
                    "out_in, embeddings in_out"),
    "LT208": (MUST, "lora_magnitude and lora_bias have shape [out]"),
    "LT209": (MUST, "tensors hold no NaN or Inf"),
    "LT210": (SHOULD, "lora_B is not all zeros (the delta would be zero)"),
    "LT211": (SHOULD, "all tensors of a module share one dtype"),
    "LT212": (SHOULD, "the rank does not exceed min(out, in)"),
    "LT213": (MUST, "module names are dot-separated segments of [A-Za-z0-9_-]"),
    # replacement entries (format 1.1)
    "LT214": (MUST, "a replacement entry is replace alone, or replace_rows with an I64 "
                    "replace_index of one index per row, and names no module"),
    "LT215": (MUST, "replace_index holds distinct non-negative row indices"),
    "LT216": (MUST, "replacement entries appear only in files of format version 1.1 or later"),
    # LyCORIS kinds (format 1.2)
    "LT217": (MUST, "LyCORIS kinds appear only in files of format version 1.2 or later"),
    "LT218": (MUST, "a LyCORIS-kind record has layout out_in, no alpha field, an optional "
                    "shape of 2 to 5 positive integers and an optional lycoris object of "
                    "strings"),
    "LT219": (MUST, "a module's tensor roles are those of its kind"),
    # LyCORIS modules (spec/lycoris.md; loratool.lycoris.codes names them)
    "LT230": (MUST, "a LyCORIS module's parameter names identify exactly one family"),
    "LT231": (MUST, "the LyCORIS family is one loratool reads (LoCon, LoHa, LoKr, full); IA3, "
                    "GLoRA, OFT, BOFT and norms are refused by name"),
    "LT232": (MUST, "a LyCORIS module has every tensor its family needs, in one form"),
    "LT233": (MUST, "each LyCORIS tensor has the number of dimensions of its role"),
    "LT234": (MUST, "paired LyCORIS factors agree on the rank"),
    "LT235": (MUST, "a Tucker core (lora_mid, hada_t*, lokr_t2) is (r, r, *kernel) for its "
                    "factors"),
    "LT236": (MUST, "the two Hadamard terms of a LoHa module have the same shape"),
    "LT237": (MUST, "a LoKr module's kron(w1, w2) has the base weight's shape"),
    "LT238": (MUST, "a LyCORIS alpha is one finite number"),
    "LT239": (MUST, "dora_scale has shape (out, 1, ...) or (1, in, ...)"),
    "LT240": (MUST, "diff has the weight's shape and diff_b the shape (out,)"),
    "LT241": (MUST, "a LyCORIS module's delta fits the base weight's shape"),
    "LT242": (MUST, "a conv module stored with flattened factors is given the base weight's "
                    "shape"),
    "LT243": (MUST, "only modules with a low-rank form convert to plain LoRA (not DoRA; full "
                    "diff only as a requested SVD)"),
    "LT244": (MUST, "every rank and dimension of a LyCORIS module is at least 1"),
}

# Codes any command may raise that are not rules about a file (spec/README.md, "Codes of
# every command"). Operation codes (LT3xx-LT5xx) are listed in each operation's spec.
WRITE_FAILED = "LT505"
READ_FAILED = "LT507"
COMMAND_CODES = {
    "LT000": "internal error: a loratool bug (LORATOOL_DEBUG=1 shows the traceback)",
    WRITE_FAILED: "an output could not be written (disk full, I/O error); nothing was written",
    READ_FAILED: "an input could not be read (I/O error, permission denied, vanished file)",
    "LT590": "not enough memory for the tensors of an input; nothing was written",
}


# Codes of the GGUF support (spec/gguf.md, section 7): rules about GGUF files (adapters and
# bases) and merges into GGUF bases. They are not rules of the loratool adapter format (no
# conformance vectors), so they stand apart from RULES; ``loratool.gguf.codes`` names them.
GGUF_CODES: dict[str, tuple[str, str]] = {
    "LT320": (MUST, "GGUF support needs the optional `gguf` package "
                    "(pip install 'loratool[gguf]')"),
    "LT321": (MUST, "file is a regular little-endian GGUF file, version 2 or 3"),
    "LT322": (MUST, "every length, count and offset of the header lies inside the "
                    "file and under the reader's caps"),
    "LT323": (MUST, "metadata values have a known type, arrays are not nested, strings "
                    "are UTF-8, no key appears twice"),
    "LT324": (MUST, "tensor infos have 1-4 positive dims, a known type, rows a "
                    "multiple of the block size, aligned non-overlapping in-file data, "
                    "distinct names"),
    "LT325": (MUST, "a GGUF LoRA has general.type \"adapter\", adapter.type "
                    "\"lora\" and a finite adapter.lora.alpha"),
    "LT326": (MUST, "every <name>.lora_a has a <name>.lora_b of matching rank and no "
                    "other suffix appears"),
    "LT327": (MUST, "the architecture is known to gguf, head counts are known where q/k "
                    "rows are permuted, and whether they are permuted is known"),
    "LT328": (MUST, "every module has a GGUF tensor name for the architecture (and back)"),
    "LT329": (MUST, "a GGUF LoRA holds only low-rank linear/embedding deltas (no "
                    "DoRA magnitude, bias, full tensor or conv)"),
    "LT330": (MUST, "the output type is one gguf can write for that tensor"),
    "LT331": (MUST, "every adapted module exists in the base with the delta's "
                    "shape"),
    "LT332": (MUST, "a split GGUF set has all its parts, numbered consistently"),
    "LT333": (MUST, "factors are finite and the merged result fits the output type"),
    "LT334": (MUST, "each module's scale is a finite non-zero number"),
    "LT335": (MUST, "unmerge from a GGUF file needs F32, F16 or BF16 tensors (a quantized merge "
                    "is not invertible)"),
}

# Codes of merges into FP8 safetensors bases (spec/merge.md sections 4.6 and 9); raised by
# ``loratool.ops.merge.fp8_base``. Operation codes, not rules about a file.
FP8_MERGE_CODES: dict[str, str] = {
    "LT440": "an FP8 weight's scale cannot be used: not a float/E8M0 tensor, zero, negative "
             "or non-finite values, a shape that is not one value, one per row or a grid of "
             "128x128 blocks, or both `_scale` and `_scale_inv`",
}


@dataclass(frozen=True)
class Finding:
    """One broken rule in one file (and module, when it concerns one)."""

    code: str
    message: str
    path: str = ""
    module: str | None = None

    @property
    def level(self) -> str:
        return RULES.get(self.code, GGUF_CODES.get(self.code, (MUST, "")))[0]

    @property
    def is_error(self) -> bool:
        return self.level == MUST

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level"] = self.level
        d["severity"] = "error" if self.is_error else "warning"
        return d
