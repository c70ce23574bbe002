"""A tiny Hugging Face LLaMA (or Qwen2) written as a GGUF model file that llama.cpp loads,
for the llama.cpp runtime test (tests/test_gguf_llamacpp.py).

Written with the `gguf` package only, as llama.cpp's convert_hf_to_gguf.py lays them out:
the hyperparameter keys llama.cpp's loader reads, a stand-in SentencePiece ("llama")
vocabulary (<unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, then plain tokens) with
scores, token types and bos/eos ids, and every tensor in F32 under its GGUF name, q/k rows
permuted for LLaMA only (``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1,
2)``, k with the kv head count; Qwen2 is not permuted and has q/k/v biases). Independent of loratool's own GGUF code, which the test checks against it.
"""

from __future__ import annotations

import numpy as np

SPECIALS = ["<unk>", "<s>", "</s>"]
N_BYTES = 256
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_BYTE = 1, 2, 3, 6


def vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a stand-in SentencePiece vocabulary of ``size``."""
    if size < len(SPECIALS) + N_BYTES + 1:
        raise ValueError(f"a vocabulary needs at least {len(SPECIALS) + N_BYTES + 1} tokens")
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(N_BYTES)]
    tokens += [f"\u2581tok{i}" for i in range(size - len(tokens))]
    types = [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL] + [TYPE_BYTE] * N_BYTES
    types += [TYPE_NORMAL] * (size - len(types))
    scores = [0.0] * len(SPECIALS) + [0.0] * N_BYTES
    scores += [-float(i) for i in range(size - len(scores))]
    return tokens, scores, types


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_llama_gguf(path: str, state: dict, config, arch: str = "llama"
                     ) -> dict[str, np.ndarray]:
    """Write the ``state`` (HF names -> float tensors or arrays) with ``config`` (a
    transformers LlamaConfig or Qwen2Config; ``arch`` "llama" or "qwen2") as an F32 GGUF
    model; returns GGUF name -> the array written."""
    import gguf

    n_layers = config.num_hidden_layers
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(config.hidden_size // n_head)
    w.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                               or config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    tokens, scores, types = vocab(config.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    written = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        arr = t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = permute(arr, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            arr = permute(arr, n_kv)
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise KeyError(f"no GGUF name for {name}")
        w.add_tensor(gname, arr)
        written[gname] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
