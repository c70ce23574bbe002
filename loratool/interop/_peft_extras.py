"""PEFT's tensors that are not LoRA factors, read as replacement entries (format 1.1) and
written back under PEFT's names.

What PEFT saves (``get_peft_model_state_dict``) and what ``merge_and_unload()`` does with it:

* ``modules_to_save`` (e.g. the ``score`` head of ``*ForSequenceClassification``): the trained
  copy's tensors, saved as ``<module>.<param>`` (``modules_to_save.<adapter>`` removed);
  merging puts the copy in place of the module: a whole-tensor replacement.
* ``bias="all"`` / ``"lora_only"``: the trained biases, saved under their module's name
  (``<m>.bias``, or ``<m>.base_layer.bias`` inside a LoRA layer); they stay in the merged
  model: whole-tensor replacements.
* ``save_embedding_layers``: the embedding weights (``<m>.weight`` or
  ``<m>.base_layer.weight``), loaded over the base's: whole-tensor replacements; a LoRA delta
  on the same embedding is added after.
* ``trainable_token_indices``: ``<m>.token_adapter.trainable_tokens_delta`` [k, dim] holds the
  new rows of ``<m>.weight`` at the indices the config lists; merging writes them
  (``index_copy``): a row replacement.
"""

from __future__ import annotations

from ..errors import InteropError
from ..format import MODULE_NAME_RE
from ._peft_config import CONFIG_NAME, get_pattern_key

TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
_PARAMS = (".weight", ".bias")


def target_of(name: str) -> str | None:
    """The base tensor a non-LoRA PEFT tensor (prefix removed) replaces, or None when it is
    no tensor PEFT saves whole."""
    if name.endswith(TOKENS_SUFFIX) or "lora_" in name or not name.endswith(_PARAMS):
        return None
    for part in (".modules_to_save.default.", ".modules_to_save.", ".base_layer."):
        name = name.replace(part, ".")
    return name if MODULE_NAME_RE.match(name) else None


def token_indices(cfg: dict, owner: str, n_rows: int, path: str) -> list[int]:
    """The rows ``<owner>.token_adapter.trainable_tokens_delta`` replaces, from the config's
    ``trainable_token_indices`` (a list: the input embedding; a dict: module name -> list)."""
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        key = get_pattern_key(spec.keys(), owner)
        spec = spec.get(key)
    if not isinstance(spec, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
        raise InteropError(f"{owner}: trainable_tokens_delta has {n_rows} rows but "
                           f"{CONFIG_NAME} gives no trainable_token_indices list for it",
                           code="LT305", path=path, module=owner)
    if len(spec) != n_rows or len(set(spec)) != len(spec):
        raise InteropError(f"{owner}: trainable_tokens_delta has {n_rows} rows but "
                           f"trainable_token_indices lists {len(spec)} "
                           f"({len(set(spec))} distinct)", code="LT305", path=path,
                           module=owner)
    return list(spec)


def split_unknown(names, entries, cfg: dict, path: str, prefix: str):
    """(full: {target: tensor name}, rows: {target: (tensor name, indices)}, ignored:
    [(tensor name, why)], rest) of the tensors the LoRA reader did not place.

    ``bias="all"`` with ``modules_to_save`` makes PEFT save the module's biases three times:
    ``<m>.bias`` (the trained copy, which PEFT loads), ``<m>.modules_to_save.bias`` (the same
    tensor, under a name PEFT's loader does not map) and ``<m>.original_module.bias`` (the
    frozen original, which ``merge_and_unload()`` discards). The first is the replacement;
    the other two are ignored, as PEFT ignores them, and listed in the notes.
    """
    full, rows, ignored, rest = {}, {}, [], []
    aliases = {}
    for name in sorted(names):
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short.endswith(TOKENS_SUFFIX):
            owner = short[: -len(TOKENS_SUFFIX)]
            shape = entries[name][1]
            if MODULE_NAME_RE.match(owner) and len(shape) == 2:
                rows[owner + ".weight"] = (name, token_indices(cfg, owner, shape[0], path))
                continue
        if ".original_module." in short and target_of(short) is not None:
            ignored.append((name, "the frozen original of a modules_to_save module, which "
                                  "PEFT's merge discards"))
            continue
        target = target_of(short)
        if target is None:
            rest.append(name)
        elif ".modules_to_save." in short and ".modules_to_save.default." not in short:
            aliases[target] = name
        elif target in full:
            raise InteropError(f"tensors {full[target]!r} and {name!r} both replace "
                               f"{target!r}", code="LT305", path=path, module=target)
        else:
            full[target] = name
    for target, name in aliases.items():
        if target in full:
            ignored.append((name, f"a second copy of {full[target]}, which PEFT does not load"))
        else:
            full[target] = name
    both = sorted(set(full) & set(rows))
    if both:
        raise InteropError(f"{both[0]!r} is saved whole and has trainable tokens", code="LT305",
                           path=path, module=both[0])
    return full, rows, ignored, rest


def _owner(target: str) -> tuple[str, str]:
    owner, _, param = target.rpartition(".")
    return owner, param


def config_fields(adapter) -> dict:
    """adapter_config.json fields for an adapter's replacements. PEFT loads a saved tensor
    whose name is a parameter of the PEFT model as it is (``strict=False``), and a
    ``modules_to_save`` module's tensors into its trained copy; so a ``.weight`` of a module
    that is not a LoRA module goes to ``modules_to_save``, the rest load by name."""
    owners = sorted({_owner(t)[0] for t, r in adapter.replacements.items()
                     if r.index is None and _owner(t)[1] == "weight"
                     and _owner(t)[0] not in adapter.modules})
    tokens = {_owner(t)[0]: [int(i) for i in r.index.tolist()]
              for t, r in adapter.replacements.items() if r.index is not None}
    biases = any(_owner(t)[1] == "bias" for t in adapter.replacements)
    return {"modules_to_save": owners or None, "trainable_token_indices": tokens or None,
            "bias": "all" if biases else "none"}


def tensors(adapter, prefix: str) -> dict:
    """PEFT's tensor names for an adapter's replacements: inside a LoRA module the base
    tensor is ``<m>.base_layer.<param>``, as PEFT names it."""
    out = {}
    for target, r in adapter.replacements.items():
        owner, param = _owner(target)
        if r.index is not None:
            out[prefix + owner + TOKENS_SUFFIX] = r.value
        elif owner in adapter.modules:
            out[f"{prefix}{owner}.base_layer.{param}"] = r.value
        else:
            out[prefix + target] = r.value
    return out
