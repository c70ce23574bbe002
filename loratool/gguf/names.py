"""HF module names <-> GGUF tensor names, and the LLaMA q/k row permutation.

Names come from gguf's own tables (``gguf.get_tensor_name_map``), so they follow the
llama.cpp release the installed `gguf` package belongs to.

The permutation: llama.cpp's HF converter (``LlamaModel`` with ``undo_permute = True``)
reorders the rows of q_proj/k_proj from HF's rotate-half layout to interleaved pairs. It is
a row permutation P, so ``P(B @ A) = (P B) @ A``: only ``lora_B`` of q and k moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import InteropError
from . import codes as C
from ._dep import require_gguf

# GGUF architectures whose HF conversion permutes q/k rows (llama.cpp's ``LlamaModel``:
# LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, ... all written as "llama").
PERMUTING_ARCHS = frozenset({"llama"})
# Architectures whose converters keep HF's row order (not ``LlamaModel`` subclasses).
NON_PERMUTING_ARCHS = frozenset({"qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2",
                                 "gemma3", "phi3", "llama4", "starcoder2", "gpt2"})
# config.json model_type -> GGUF architecture, where the names differ or several share one.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2",
                  "qwen2_moe": "qwen2moe", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
                  "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
                  "starcoder2": "starcoder2", "gpt2": "gpt2"}

# GGUF name (after "blk.N.") -> transformers module name, for the usual LoRA targets.
_TRANSFORMERS_NAMES = {
    "attn_q.weight": "model.layers.{bid}.self_attn.q_proj",
    "attn_k.weight": "model.layers.{bid}.self_attn.k_proj",
    "attn_v.weight": "model.layers.{bid}.self_attn.v_proj",
    "attn_output.weight": "model.layers.{bid}.self_attn.o_proj",
    "ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj",
    "ffn_up.weight": "model.layers.{bid}.mlp.up_proj",
    "ffn_down.weight": "model.layers.{bid}.mlp.down_proj",
    "token_embd.weight": "model.embed_tokens",
    "output.weight": "lm_head",
}
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ArchInfo:
    """What the mapping needs about the base model."""

    arch: str                   # GGUF architecture name, e.g. "llama", "qwen2"
    n_head: int | None = None   # attention heads (needed to permute q)
    n_head_kv: int | None = None  # key/value heads (needed to permute k); None = n_head
    permute_qk: bool | None = None  # None: from PERMUTING_ARCHS / NON_PERMUTING_ARCHS

    @property
    def permutes(self) -> bool:
        if self.permute_qk is not None:
            return self.permute_qk
        if self.arch in PERMUTING_ARCHS:
            return True
        if self.arch in NON_PERMUTING_ARCHS:
            return False
        raise InteropError(f"whether llama.cpp's converter permutes the q/k rows of "
                           f"architecture {self.arch!r} is not known to loratool; pass "
                           "permute_qk=True or False (--permute-qk/--no-permute-qk)",
                           code=C.GGUF_ARCH)


def arch_from_hf_config(config: dict) -> ArchInfo:
    """ArchInfo from a transformers ``config.json`` dict."""
    mt = config.get("model_type")
    arch = HF_MODEL_TYPES.get(mt)
    if arch is None:
        gguf = require_gguf()
        arch = mt if mt in gguf.MODEL_ARCH_NAMES.values() else None
    if arch is None:
        raise InteropError(f"config.json model_type {mt!r} has no known GGUF architecture; "
                           "pass the GGUF base instead", code=C.GGUF_ARCH)
    n_head = config.get("num_attention_heads")
    return ArchInfo(arch, n_head, config.get("num_key_value_heads") or n_head)


def arch_from_gguf(header) -> ArchInfo:
    """ArchInfo from a GGUF base's metadata (``{arch}.attention.head_count[_kv]``)."""
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise InteropError("general.architecture is missing", code=C.GGUF_ARCH,
                           path=header.path)
    n_head = header.get(f"{arch}.attention.head_count")
    n_kv = header.get(f"{arch}.attention.head_count_kv")
    as_int = lambda v: int(v) if isinstance(v, int) else None  # noqa: E731 (arrays: per layer)
    return ArchInfo(arch, as_int(n_head), as_int(n_kv) or as_int(n_head))


def _model_arch(arch: str):
    gguf = require_gguf()
    for k, v in gguf.MODEL_ARCH_NAMES.items():
        if v == arch:
            return gguf, k
    raise InteropError(f"architecture {arch!r} is not known to the installed gguf package",
                       code=C.GGUF_ARCH)


def _n_blocks(names, pattern) -> int:
    idx = [int(m.group(1)) for n in names if (m := pattern.search(n))]
    return max(idx, default=-1) + 1


def hf_to_gguf_names(modules, arch: str) -> dict[str, str]:
    """HF module name -> GGUF tensor name (with ``.weight``), e.g.
    ``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``. Any prefix such as
    ``base_model.model.`` is tried off. Raises LT328 listing unmapped modules."""
    gguf, march = _model_arch(arch)
    modules = list(modules)
    tmap = gguf.get_tensor_name_map(march, max(1, _n_blocks(modules, _BLOCK)))
    out, missing = {}, []
    for m in modules:
        name = None
        parts = m.split(".")
        for i in range(len(parts)):  # the longest name first: "model.x" before "x"
            name = tmap.get_name(".".join(parts[i:]) + ".weight", try_suffixes=(".weight",))
            if name is not None:
                break
        if name is None:
            missing.append(m)
        else:
            out[m] = name
    if missing:
        raise InteropError(f"{len(missing)} module(s) have no GGUF tensor name for "
                           f"architecture {arch!r}: " + ", ".join(missing[:10]),
                           code=C.GGUF_NAME)
    dup = {}
    for m, g in out.items():
        dup.setdefault(g, []).append(m)
    clash = [f"{g} <- {', '.join(ms)}" for g, ms in dup.items() if len(ms) > 1]
    if clash:
        raise InteropError("several modules map to one GGUF tensor: " + "; ".join(clash[:5]),
                           code=C.GGUF_NAME)
    return out


def gguf_to_hf_names(tensor_names, arch: str, candidates=None) -> dict[str, str]:
    """GGUF tensor name (with ``.weight``) -> HF module name.

    With ``candidates`` (the base model's HF module names) the answer is the candidate that
    maps forward to the tensor. Without, it is the first spelling gguf lists for that tensor
    (transformers' spelling of the usual LoRA targets, e.g.
    ``model.layers.N.self_attn.q_proj``, kept only where gguf's table maps it back to the
    same tensor); other tensors need ``candidates``.
    """
    gguf, march = _model_arch(arch)
    names = list(tensor_names)
    if candidates is not None:
        fwd = hf_to_gguf_names_lenient(candidates, arch)
        inv = {g: m for m, g in fwd.items()}
    else:
        # transformers' spelling, checked against gguf's own forward table
        guesses = {}
        for g in names:
            m = _GGUF_BLOCK.match(g)
            key = g[m.end():] if m else g
            hf = _TRANSFORMERS_NAMES.get(key)
            if hf is not None:
                guesses[g] = hf.format(bid=m.group(1)) if m else hf
        fwd = hf_to_gguf_names_lenient(guesses.values(), arch)
        inv = {g: hf for g, hf in guesses.items() if fwd.get(hf) == g}
    out, missing = {}, []
    for g in names:
        (out.__setitem__(g, inv[g]) if g in inv else missing.append(g))
    if missing:
        raise InteropError(f"{len(missing)} GGUF tensor(s) have no HF module name for "
                           f"architecture {arch!r}: " + ", ".join(missing[:10]),
                           code=C.GGUF_NAME)
    return out


def hf_to_gguf_names_lenient(modules, arch: str) -> dict[str, str]:
    """Like ``hf_to_gguf_names`` but skips modules without a GGUF name (base candidates)."""
    out = {}
    for m in modules:
        try:
            out.update(hf_to_gguf_names([m], arch))
        except InteropError:
            pass
    return out


def is_q(gguf_name: str) -> bool:
    return gguf_name.endswith(".attn_q.weight")


def is_k(gguf_name: str) -> bool:
    return gguf_name.endswith(".attn_k.weight")


def _heads(info: ArchInfo, gguf_name: str) -> int:
    if info.n_head is None:
        raise InteropError(f"{gguf_name}: the q/k rows of {info.arch!r} are permuted, which "
                           "needs the head counts; pass a GGUF base or a config.json",
                           code=C.GGUF_ARCH)
    if is_k(gguf_name) and info.n_head_kv:
        return info.n_head_kv
    return info.n_head


def permute_rows(x: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``x`` (or its inverse)."""
    rows = x.shape[0]
    if rows % (2 * n_head):
        raise InteropError(f"{rows} rows cannot be split into {n_head} heads of even size",
                           code=C.GGUF_ARCH)
    half = rows // n_head // 2
    if inverse:
        return x.reshape(n_head, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    return x.reshape(n_head, 2, half, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def to_gguf_b(B: np.ndarray, gguf_name: str, info: ArchInfo) -> np.ndarray:
    """lora_B rows in GGUF order (permuted for q/k of permuting architectures)."""
    if (is_q(gguf_name) or is_k(gguf_name)) and info.permutes:
        return permute_rows(B, _heads(info, gguf_name))
    return B


def from_gguf_b(B: np.ndarray, gguf_name: str, info: ArchInfo) -> np.ndarray:
    """Inverse of ``to_gguf_b``."""
    if (is_q(gguf_name) or is_k(gguf_name)) and info.permutes:
        return permute_rows(B, _heads(info, gguf_name), inverse=True)
    return B
