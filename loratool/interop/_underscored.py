"""sd-scripts' underscored module names (kohya ``lora_unet_x_y``, LyCORIS): dotted module
paths recovered from the base checkpoint, shared by the kohya and LyCORIS readers."""

from __future__ import annotations

from ..errors import InteropError
from ..format import MODULE_NAME_RE
from ._common import MAX_MODULE_NAME, base_shapes

class UnderscoredNames:
    """Module paths of underscored names (kohya/LyCORIS ``lora_unet_x_y``), dotted from the
    base checkpoint when one is given.

    ``split(name)`` returns ``(fallback, candidates)``: the name used when nothing else decides
    and the ``(prefix, underscored path)`` pairs looked up among the base's tensors (a hit is
    ``prefix + dotted path``); it raises for a name of the wrong form. ``--map`` entries win,
    a name matching several base tensors is refused [LT307], names matching none are listed
    in ``notes``. ``base_keys`` maps each name to the base tensor holding its weight.
    """

    def __init__(self, loras, options, *, split, fmt: str, path: str):
        name_map = options.name_map or {}
        shapes = base_shapes(options)
        index: dict[str, set[str]] = {}
        for key in shapes or ():
            if key.endswith(".weight"):
                dotted = key[: -len(".weight")]
                index.setdefault(dotted.replace(".", "_"), set()).add(dotted)
        self.names: dict[str, str] = {}
        self.base_keys: dict[str, str] = {}
        self.notes: list[str] = []
        unmatched, ambiguous = [], []
        for lora in loras:
            fallback, candidates = split(lora)
            name = name_map.get(lora) or name_map.get(fallback)
            if name is None and shapes is not None:
                hits = {prefix + p for prefix, key in candidates for p in index.get(key, ())}
                if len(hits) == 1:
                    name = hits.pop()
                elif hits:
                    ambiguous.append(f"{lora} -> {', '.join(sorted(hits))}")
                else:
                    unmatched.append(lora)
            name = name or fallback
            if len(name) > MAX_MODULE_NAME or not MODULE_NAME_RE.match(name):
                raise InteropError(f"{fmt} module {lora[:80]!r} gives the module name "
                                   f"{name[:80]!r}, which is not dot-separated segments of "
                                   "letters, digits, '_' and '-'", code="LT307", path=path,
                                   module=lora[:80])
            if shapes is not None:
                for cand in (name, name.partition(".")[2]):
                    if cand + ".weight" in shapes:
                        self.base_keys[lora] = cand + ".weight"
                        break
            self.names[lora] = name
        if ambiguous:
            raise InteropError(f"{len(ambiguous)} {fmt} module(s) match several base tensors "
                               "once underscores are read as dots; pass --map NAME="
                               "MODULE.PATH for each: " + "; ".join(ambiguous[:10]),
                               code="LT307", path=path)
        if shapes is not None:
            self.how = "dotted from the base checkpoint"
            if unmatched:
                shown = ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
                self.notes.append(f"{len(unmatched)} {fmt} module(s) match no base tensor and "
                                  f"keep underscored names: {shown}")
        else:
            self.how = "underscored (pass --base to recover dotted paths)"
        if len(set(self.names.values())) != len(self.names):
            raise InteropError(f"two {fmt} modules map to the same module name; pass --map",
                               code="LT307", path=path)
