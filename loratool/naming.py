"""Matching adapter module paths to base checkpoint tensors.

Adapter module paths often differ from base keys by a prefix (``base_model.model.``,
``model.``, ``transformer.``, ``bert.``). Resolution per module: an explicit ``--map OLD=NEW``
first, then an exact match of ``<module>.weight``, then a unique match on a dot boundary
where one name is a suffix of the other, then (for kohya names read without a base, whose
dots were underscores) a unique match of the underscored names on an underscore boundary.
Ambiguity or no match is an error listing the modules.
"""

from __future__ import annotations

from .errors import CheckpointError


def parse_map(items) -> dict[str, str]:
    """``["old=new", ...]`` -> ``{"old": "new"}``."""
    out = {}
    for item in items or ():
        old, eq, new = item.partition("=")
        # An empty NEW is allowed for a prefix rule: ``--map base_model.model.=`` strips it.
        if not eq or not old or not (new or old.endswith(".")):
            raise CheckpointError(f"--map {item!r} is not OLD=NEW (or PREFIX.= to strip a "
                                  "prefix)", code="LT404")
        out[old] = new
    return out


def map_name(name: str, name_map: dict[str, str] | None) -> str | None:
    """The ``--map`` rule, written once: ``OLD=NEW`` renames exactly ``OLD``; ``OLD.=NEW.``
    (``OLD`` ending in ``.``) rewrites that prefix, the first such rule that applies wins; an
    exact rule beats any prefix rule. None when no rule applies.

    >>> map_name("base_model.model.q", {"base_model.model.": ""})
    'q'
    >>> map_name("k", {"q": "x"}) is None
    True
    """
    if not name_map:
        return None
    target = name_map.get(name)
    if target is not None:
        return target
    for old, new in name_map.items():
        if old.endswith(".") and name.startswith(old):
            return new + name[len(old):]
    return None


def _dotted_suffix(long: str, short: str) -> bool:
    return long == short or long.endswith("." + short)


def _underscored_suffix(long: str, short: str) -> bool:
    return long == short or long.endswith("_" + short)


def resolve_modules(modules, base_keys, name_map: dict[str, str] | None = None, *,
                    suffix: str = ".weight") -> tuple[dict[str, str], list[str]]:
    """Map each adapter module to a base module path (``<path>.weight`` is in ``base_keys``).

    Returns (mapping, unmatched). Raises ``CheckpointError`` LT405 when a module matches
    several base tensors.
    """
    name_map = name_map or {}
    keys = set(base_keys)
    bases = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
    mapping: dict[str, str] = {}
    unmatched: list[str] = []
    ambiguous: list[str] = []
    for module in modules:
        target = map_name(module, name_map)
        if target is not None:
            if target + suffix in keys:
                mapping[module] = target
            else:
                unmatched.append(module)
            continue
        if module + suffix in keys:
            mapping[module] = module
            continue
        hits = [b for b in bases if _dotted_suffix(b, module) or _dotted_suffix(module, b)]
        if not hits:
            flat = module.replace(".", "_")
            hits = [b for b in bases if _underscored_suffix(flat, b.replace(".", "_"))]
            longest = max(map(len, hits), default=0)  # the most specific base path wins
            hits = [b for b in hits if len(b) == longest]
        if len(hits) == 1:
            mapping[module] = hits[0]
        elif hits:
            ambiguous.append(f"{module} -> {', '.join(sorted(hits)[:4])}")
        else:
            unmatched.append(module)
    if ambiguous:
        raise CheckpointError(
            f"{len(ambiguous)} adapter module(s) match several base tensors; pass --map "
            f"MODULE=BASE_PATH for each: " + "; ".join(ambiguous[:20]), code="LT405")
    return mapping, unmatched
