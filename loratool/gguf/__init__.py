"""GGUF (llama.cpp) support: LoRA adapters out and in, merges into GGUF bases.

Needs the optional `gguf` package (``pip install 'loratool[gguf]'``); it is imported lazily,
and its absence is an ``InteropError`` with code LT320. Nothing here imports torch.
spec/gguf.md describes the mapping, scale encoding, permutation, merge and tolerances.
"""

from .adapter import (ADAPTER_OUT_TYPES, GGUFAdapterInfo, GGUFAdapterModule, LoraFactors,
                      WriteReport, global_alpha, read_gguf_adapter, read_gguf_adapter_info,
                      refuse_unsupported, unsupported_reason, write_gguf_adapter)
from .codes import RULES
from .container import GGUFHeader, GGUFTensor, read_gguf, read_gguf_header, tensor_data
from .merge import MergeReport, TensorMerge, merge_gguf, plan_merge
from .names import (NON_PERMUTING_ARCHS, PERMUTING_ARCHS, ArchInfo, arch_from_gguf,
                    arch_from_hf_config, gguf_to_hf_names, hf_to_gguf_names, permute_rows)
from .numerics import decode, encode, round_to_odd_f32, writable_types

__all__ = [
    "ADAPTER_OUT_TYPES", "ArchInfo", "GGUFAdapterInfo", "GGUFAdapterModule", "GGUFHeader",
    "GGUFTensor", "LoraFactors", "MergeReport", "NON_PERMUTING_ARCHS", "PERMUTING_ARCHS",
    "RULES", "TensorMerge", "WriteReport", "arch_from_gguf", "arch_from_hf_config", "decode",
    "encode", "global_alpha", "gguf_to_hf_names", "hf_to_gguf_names", "merge_gguf",
    "permute_rows", "plan_merge", "read_gguf", "read_gguf_adapter", "read_gguf_adapter_info",
    "read_gguf_header", "refuse_unsupported", "round_to_odd_f32", "tensor_data",
    "unsupported_reason", "write_gguf_adapter", "writable_types",
]
