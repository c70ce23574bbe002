"""Constants and small pure rules of loratool adapter format 1.x (spec/adapter-format.md)."""

from __future__ import annotations

import json
import math
import re

from .errors import MetadataError

FORMAT_NAME = "loratool.adapter"
FORMAT_VERSION = (1, 2)  # the newest version this library reads and writes
# Writers write the lowest version that expresses the file: 1.0 unless it has replacement
# entries (1.1) or LyCORIS modules (1.2), so that files an older reader can read keep saying
# so (spec section 9).
FORMAT_VERSION_STR = "1.0"
FORMAT_VERSION_REPLACEMENTS = "1.1"
FORMAT_VERSION_LYCORIS = "1.2"

# Metadata keys (all values are strings, as safetensors requires).
NAMESPACE = "loratool."
KEY_FORMAT = "loratool.format"
KEY_VERSION = "loratool.format_version"
KEY_SCALING = "loratool.scaling"
KEY_ALPHA = "loratool.alpha"
KEY_TARGETS = "loratool.target_modules"
KEY_MODULES = "loratool.modules"
KEY_BASE_MODEL = "loratool.base_model"
KEY_BASE_HASH = "loratool.base_model_hash"
KEY_PROVENANCE = "loratool.provenance"
KEY_TENSOR_HASH = "loratool.tensor_hash"
KEY_INIT = "loratool.init"  # format 1.1: base-changing initialisation (PiSSA, OLoRA...)
KEY_MERGED = "loratool.merged"  # on merged base checkpoints, not on adapters

KNOWN_KEYS = frozenset({
    KEY_FORMAT, KEY_VERSION, KEY_SCALING, KEY_ALPHA, KEY_TARGETS, KEY_MODULES,
    KEY_BASE_MODEL, KEY_BASE_HASH, KEY_PROVENANCE, KEY_TENSOR_HASH, KEY_INIT,
})

# Initialisations that replace the base weight W by a residual W - s * B0 @ A0 (or a
# quantized one): such an adapter applies to that residual model, not to the original base.
# Names as PEFT's ``init_lora_weights`` spells them (a prefix: ``pissa_niter_16``).
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def parse_init(text: str) -> dict:
    """``loratool.init`` -> ``{"method": ..., ...}``; a malformed value is LT115."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if not (isinstance(obj, dict) and isinstance(obj.get("method"), str) and obj["method"]
            and all(isinstance(v, (str, int, float, bool)) for v in obj.values())):
        raise MetadataError(f"loratool.init {text[:60]!r} is not a JSON object with a "
                            "\"method\" string (and string/number values)", code="LT115")
    return obj

SCALING_STANDARD = "standard"  # scale = alpha / r
SCALING_RSLORA = "rslora"  # scale = alpha / sqrt(r)
SCALINGS = (SCALING_STANDARD, SCALING_RSLORA)

KIND_LINEAR = "linear"
KIND_CONV = "conv"
KIND_EMBEDDING = "embedding"
KINDS = (KIND_LINEAR, KIND_CONV, KIND_EMBEDDING)
# LyCORIS kinds (format 1.2, spec section 4.2): the module's tensors are LyCORIS's own.
# LyCORIS kinds (format 1.2) and the roles each may hold (LyCORIS's own parameter names)
LYCORIS_KIND_ROLES: dict[str, tuple[str, ...]] = {
    "locon": ("alpha", "dora_scale", "lora_down", "lora_up", "lora_mid"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
             "dora_scale", "alpha"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
             "lokr_t2", "dora_scale", "alpha"),
    "full": ("diff", "diff_b", "alpha"),
}
LYCORIS_KINDS = tuple(LYCORIS_KIND_ROLES)
ALL_KINDS = KINDS + LYCORIS_KINDS

LAYOUT_OUT_IN = "out_in"  # base weight stored [out, in] (torch.nn.Linear)
LAYOUT_IN_OUT = "in_out"  # base weight stored [in, out] (GPT-2 Conv1D, fan_in_fan_out; embeddings)
LAYOUTS = (LAYOUT_OUT_IN, LAYOUT_IN_OUT)

# Tensor roles: "<module>.<suffix>".
ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_MAGNITUDE = "lora_magnitude"  # DoRA magnitude vector, shape [out]
ROLE_BIAS = "lora_bias"  # added (times scale) to "<module>.bias", shape [out]
ROLES = (ROLE_A, ROLE_B, ROLE_MAGNITUDE, ROLE_BIAS)
# Replacement entries (format 1.1): "<base tensor>.<role>", not modules. ``replace`` holds a
# whole tensor (PEFT modules_to_save, saved embeddings, trained biases); ``replace_rows`` and
# ``replace_index`` hold rows and their indices (PEFT trainable_token_indices).
ROLE_REPLACE = "replace"
ROLE_REPLACE_ROWS = "replace_rows"
ROLE_REPLACE_INDEX = "replace_index"
REPLACEMENT_ROLES = (ROLE_REPLACE, ROLE_REPLACE_ROWS, ROLE_REPLACE_INDEX)
# Roles of the LyCORIS kinds (format 1.2): LyCORIS's parameter names, ``lora_*.weight``
# without ``.weight`` (a role holds no dot). Which kind takes which: spec section 4.2.
LYCORIS_ROLES = tuple(dict.fromkeys(r for roles in LYCORIS_KIND_ROLES.values() for r in roles))
ALL_ROLES = ROLES + REPLACEMENT_ROLES + LYCORIS_ROLES

ADAPTER_DTYPES = ("F16", "BF16", "F32", "F64")

# \Z rather than $: Python's $ also matches before a final "\n".
MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z")
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\Z")

# safetensors' own reader refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; anything else raises ``MetadataError`` LT102."""
    m = VERSION_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise MetadataError(f"format version {text!r} is not MAJOR.MINOR (e.g. \"1.0\")",
                            code="LT102")
    return int(m.group(1)), int(m.group(2))


def check_version_supported(version: tuple[int, int]) -> None:
    """Reject another major version (LT103); a newer minor version is read, unknown keys ignored."""
    if version[0] != FORMAT_VERSION[0]:
        raise MetadataError(
            f"format version {version[0]}.{version[1]} has major version {version[0]}; this "
            f"loratool reads major version {FORMAT_VERSION[0]} only: upgrade loratool",
            code="LT103")


def split_tensor_name(name: str) -> tuple[str, str] | None:
    """``"x.q_proj.lora_A"`` -> ``("x.q_proj", "lora_A")``; None if the suffix is no role.
    For a replacement entry (``"score.weight.replace"``) the first part is the base tensor."""
    module, dot, role = name.rpartition(".")
    if not dot or role not in ALL_ROLES:
        return None
    return module, role


def tensor_name(module: str, role: str) -> str:
    return f"{module}.{role}"


def scale_for(alpha: float, rank: int, scaling: str) -> float:
    """The factor s of delta W = s * B @ A."""
    if scaling == SCALING_RSLORA:
        return alpha / math.sqrt(rank)
    return alpha / rank


def canonical_json(obj) -> str:
    """The one JSON spelling loratool writes: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def format_number(x: float) -> str:
    """Shortest decimal that round-trips the float64 value (``repr``); integers keep ``.0``."""
    return repr(float(x))
