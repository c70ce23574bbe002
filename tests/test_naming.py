"""Module-name resolution, table-driven: ``--map`` rules (exact, prefix, strip), matching
adapter modules to base tensors (exact, dotted suffix, underscored kohya names) and
ambiguity (LT405). Every row states the expected mapping and leftovers exactly."""

from __future__ import annotations

import pytest

from loratool.errors import CheckpointError
from loratool.naming import map_name, parse_map, resolve_modules

# (name, --map rules, expected target or None)
MAP_CASES = [
    ("q", {"q": "x.q"}, "x.q"),                                         # exact
    ("base_model.model.l.q", {"base_model.model.": ""}, "l.q"),         # strip a prefix
    ("base_model.model.l.q", {"base_model.model.": "model."}, "model.l.q"),  # replace it
    ("base_model.model.l.q", {"base_model.model": "x"}, None),  # no '.': exact rule only
    ("l.q", {"l.q": "exact", "l.": "pre."}, "exact"),                 # exact beats prefix
    ("l.q", {"l.": "first.", "l.q.": "never."}, "first.q"),           # first prefix wins
    ("l.q", {"m.": "x."}, None),                                      # no rule applies
    ("lq", {"l.": "x."}, None),                        # a prefix matches on a dot boundary
    ("q", {}, None),
    ("q", None, None),
]


@pytest.mark.parametrize("name,rules,want", MAP_CASES)
def test_map_name(name, rules, want):
    assert map_name(name, rules) == want


# (adapter modules, base tensor names, --map rules, expected mapping, expected unmatched)
RESOLVE_CASES = [
    pytest.param(["l.q"], ["l.q.weight"], None, {"l.q": "l.q"}, [], id="exact"),
    pytest.param(["q_proj"], ["model.layers.0.q_proj.weight"], None,
                 {"q_proj": "model.layers.0.q_proj"}, [], id="module-is-dotted-suffix-of-base"),
    pytest.param(["base_model.model.model.l.q"], ["model.l.q.weight"], None,
                 {"base_model.model.model.l.q": "model.l.q"}, [], id="base-is-suffix-of-module"),
    pytest.param(["base_model.model.l.q"], ["model.l.q.weight"], {"base_model.model.": "model."},
                 {"base_model.model.l.q": "model.l.q"}, [], id="prefix-rule"),
    pytest.param(["x.q"], ["l.q.weight"], {"x.q": "nowhere"}, {}, ["x.q"],
                 id="rule-target-missing-is-unmatched-not-guessed"),
    pytest.param(["unet.down_0_proj"], ["down.0.proj.weight", "up.0.proj.weight"], None,
                 {"unet.down_0_proj": "down.0.proj"}, [], id="underscored-kohya"),
    pytest.param(["nothing"], ["l.q.weight"], None, {}, ["nothing"], id="no-match"),
    pytest.param(["l.q"], ["l.q.bias"], None, {}, ["l.q"], id="suffix-must-be-weight"),
]


@pytest.mark.parametrize("modules,keys,rules,mapping,unmatched", RESOLVE_CASES)
def test_resolve_modules(modules, keys, rules, mapping, unmatched):
    got, left = resolve_modules(modules, keys, rules)
    assert got == mapping and left == unmatched


# (adapter modules, base tensor names): each must be refused as ambiguous, naming the module
AMBIGUOUS_CASES = [
    pytest.param(["q"], ["a.q.weight", "b.q.weight"], id="two-dotted-suffixes"),
    pytest.param(["attn.q"], ["enc.attn.q.weight", "dec.attn.q.weight"], id="two-deep"),
]


@pytest.mark.parametrize("modules,keys", AMBIGUOUS_CASES)
def test_ambiguity_is_refused(modules, keys):
    with pytest.raises(CheckpointError) as e:
        resolve_modules(modules, keys)
    assert e.value.code == "LT405"
    assert f"{modules[0]} -> " in e.value.message and "--map" in e.value.message


def test_an_explicit_rule_resolves_the_ambiguity():
    got, left = resolve_modules(["q"], ["a.q.weight", "b.q.weight"], {"q": "b.q"})
    assert got == {"q": "b.q"} and left == []


@pytest.mark.parametrize("items,want", [
    (["a=b"], {"a": "b"}),
    (["base_model.model.="], {"base_model.model.": ""}),
    (["a.=b.", "c=d"], {"a.": "b.", "c": "d"}),
    ([], {}),
])
def test_parse_map(items, want):
    assert parse_map(items) == want


@pytest.mark.parametrize("item", ["a", "=b", "a=", "noeq.b"])
def test_parse_map_refuses(item):
    with pytest.raises(CheckpointError) as e:
        parse_map([item])
    assert e.value.code == "LT404"
