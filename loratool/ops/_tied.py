"""Tied input and output embeddings (``tie_word_embeddings`` in the base's config.json).

PEFT merges a LoRA on either of two tied weights into the one shared tensor, so the input
embedding and the output head both change. A tied checkpoint stores that tensor once (under
the input embedding's name; transformers re-ties the head at load), so ``merge`` does the
same: an ``lm_head`` module is merged into the embedding, and the report says, for either
side, that the other changes too (spec/merge.md, "Tied embeddings").
"""

from __future__ import annotations

import os

from ..naming import map_name

_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight",
               "embed_in.weight")


def tied_embedding(base: str, base_tensors) -> str | None:
    """The path of the input embedding when the base's config.json ties it to the head."""
    from ..interop._common import base_config_dir, read_json_config
    config = os.path.join(base_config_dir(base), "config.json")
    if not os.path.isfile(config):
        return None
    cfg = read_json_config(config)
    tied = cfg.get("tie_word_embeddings")
    if tied is None and isinstance(cfg.get("text_config"), dict):
        tied = cfg["text_config"].get("tie_word_embeddings")
    if tied is not True:
        return None
    found = [k for k in base_tensors if k.endswith(_EMBEDDINGS)]
    return found[0][: -len(".weight")] if len(found) == 1 else None


def _suffix(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def tied_names(base: str, base_tensors, loaded, name_map) -> tuple[dict, list[str]]:
    """Extra ``--map`` entries (``lm_head`` -> the embedding) and the report's notes."""
    emb = tied_embedding(base, base_tensors)
    if emb is None:
        return {}, []
    extra: dict[str, str] = {}
    notes: list[str] = []
    for ld in loaded:
        for module in ld.adapter.modules:
            if map_name(module, name_map) is not None:
                continue
            if module.rpartition(".")[2] == "lm_head":
                extra[module] = emb
                notes.append(f"{ld.source}: `{module}` is tied to `{emb}` "
                             "(tie_word_embeddings): merged into that one tensor, so the input "
                             "embedding changes too, as in PEFT's merge_and_unload")
            elif _suffix(module, emb):
                notes.append(f"{ld.source}: `{module}` is tied to the output head "
                             "(tie_word_embeddings): the head changes too, as in PEFT's "
                             "merge_and_unload")
    return extra, notes
