"""``--json`` output (``console.terminal.dumps_indented``): the C encoder does the work, the
text is ``json.dumps(obj, indent=2, default=str)``'s to the byte, which is the oracle here,
on random trees (strings holding brackets, separators, newlines and non-ASCII; NaN, Inf,
big ints; tuples; empty containers; objects only ``default=str`` can write; non-string keys)
and on report-shaped rows at several depths."""

from __future__ import annotations

import json
import math
from pathlib import PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.console.terminal import dumps_indented


def oracle(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


tricky = st.sampled_from(["}", "{", "},\n    {", "]", "[", ",\n  ", '"', "\\", ": ", "é", "\x00"])
text = st.one_of(st.text(max_size=12), tricky)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
    st.floats(allow_nan=True, allow_infinity=True), text,
    st.builds(PurePosixPath, st.sampled_from(["a/b", "x}y", "n\nl"])),  # default=str
    st.just([]), st.just({}), st.just(()))
keys = st.one_of(text, st.integers(-5, 5), st.floats(allow_nan=False, width=16), st.booleans(),
                 st.none())
trees = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(text, kids, max_size=4), st.dictionaries(keys, kids, max_size=3)),
    max_leaves=40)
rows = st.lists(st.dictionaries(text, scalars, min_size=1, max_size=5), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(trees)
def test_same_text_as_the_indent_encoder(obj):
    assert dumps_indented(obj) == oracle(obj)


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(0, 3))
def test_rows_at_any_depth(table, depth):
    obj = table
    for i in range(depth):  # {"k": [{"k": ... rows}]}, so the rows sit deeper each time
        obj = {"k": obj} if i % 2 == 0 else [obj, 1]
    assert dumps_indented(obj) == oracle(obj)


def test_an_inspect_report():
    rows = [{"name": f"model.layers.{i}.q_proj", "kind": "linear", "kernel": [], "rank": 8,
             "alpha": 16.0, "scale": 2.0, "dora": False, "bias": None} for i in range(50)]
    report = {"path": "/tmp/a.safetensors", "totals": {"modules": 50, "ranks": {"8": 50}},
              "modules": rows, "details": {}, "other_metadata": {"k": "v\n}"},
              "nan": math.nan, "inf": -math.inf}
    assert dumps_indented(report) == oracle(report)
    assert json.loads(dumps_indented(report))["modules"] == rows
