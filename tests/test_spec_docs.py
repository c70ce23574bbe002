"""The spec and the help texts against the code, so that neither drifts.

* spec/adapter-format.md holds the rule table rendered from ``loratool.rules.RULES``,
  verbatim, between its rules-table markers;
* the metadata table names every key of ``loratool.format``; the effective-rank epsilons match
  ``ops.inspect.EPS``; spec/README.md lists the spec files;
* every CLI command has ``--help`` text with an example (a command module that fails to
  import fails here, whatever the way it breaks).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

from click.testing import CliRunner

from _vector_helpers import SPEC
from loratool import format as F
from loratool.cli import COMMANDS, main
from loratool.rules import RULES

FORMAT_MD = os.path.join(SPEC, "adapter-format.md")
BEGIN, END = "<!-- rules-table:begin -->", "<!-- rules-table:end -->"


def _md(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("_", "\\_"))


def render_rules_table() -> str:
    """The rule table exactly as spec/adapter-format.md must hold it."""
    rows = ["| Code | Level | Rule |", "|---|---|---|"]
    rows += [f"| {code} | {level} | {_md(text)} |" for code, (level, text) in RULES.items()]
    return "\n".join(rows)


def _spec() -> str:
    with open(FORMAT_MD, encoding="utf-8") as f:
        return f.read()


def test_rule_table_is_rendered_from_rules():
    text = _spec()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text.split(BEGIN)[1].split(END)[0].strip()
    expected = render_rules_table()
    assert block == expected, (
        "spec/adapter-format.md's rule table differs from loratool.rules.RULES; paste this "
        f"between the markers:\n{expected}")


def test_every_rule_is_listed_with_its_level():
    rows = dict(re.findall(r"^\| (LT\d{3}) \| (MUST|SHOULD) \|", _spec(), flags=re.M))
    assert rows == {code: level for code, (level, _) in RULES.items()}


def test_every_cited_code_exists():
    # A code cited in prose must be a rule, or an operation code of another family (LT3xx+).
    for code in set(re.findall(r"\bLT\d{3}\b", _spec())):
        assert code in RULES or code >= "LT300", code


def test_metadata_table_names_every_key():
    table = _spec().split("## 3. Metadata")[1].split("\n## ")[0]
    keys = set(re.findall(r"^\| `(loratool\.[a-z_]+)`", table, flags=re.M))
    assert keys == set(F.KNOWN_KEYS) | {F.KEY_MERGED}


def test_constants_quoted_by_the_spec():
    from loratool.ops.inspect import EPS
    from loratool.stfile import MAX_JSON_DEPTH, MAX_NDIM
    text = _spec()
    for dtype, eps in EPS.items():
        exponent = -round(math.log2(eps))
        assert f"| {dtype} | 2^-{exponent} |" in text, dtype
    assert f"{F.MAX_HEADER_BYTES:,}" in text
    assert f"at most {MAX_JSON_DEPTH} levels" in text
    assert f"at most {MAX_NDIM} dimensions" in text
    assert f'"{F.FORMAT_NAME}"' in text and f"format {F.FORMAT_VERSION_LYCORIS}" in text
    for name in (*F.KINDS, *F.LAYOUTS, *F.SCALINGS, *F.ALL_ROLES, *F.ADAPTER_DTYPES):
        assert f"`{name}`" in text, name


def test_spec_readme_indexes_the_spec():
    with open(os.path.join(SPEC, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in ("adapter-format.md", "merge.md", "lowrank.md", "interop.md",
                 "metadata.schema.json", "vectors/"):
        assert f"({name})" in readme, name
    for entry in os.listdir(SPEC):
        if not entry.startswith(".") and entry != "README.md":
            assert entry in readme, f"spec/{entry} is not in spec/README.md"


def test_every_command_exists_has_help_with_an_example_and_is_in_the_readme():
    with open(os.path.join(os.path.dirname(SPEC), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name, (module, attr, summary) in sorted(COMMANDS.items()):
        assert importlib.util.find_spec(module) is not None, f"{module} is missing"
        assert summary, f"{name} has no one-line help in cli.COMMANDS"
        assert name in top.stdout, name
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Example" in res.stdout, f"`loratool {name} --help` shows no example"
        assert f"loratool {name} " in res.stdout, f"`loratool {name} --help` example"
        assert f"### `loratool {name} " in readme, f"README has no section for {name}"


def test_gguf_code_table_is_rules_gguf_codes():
    # spec/gguf.md section 7 holds loratool.rules.GGUF_CODES row for row, in order
    from loratool.rules import GGUF_CODES
    with open(os.path.join(SPEC, "gguf.md"), encoding="utf-8") as f:
        text = f.read().split("## 7. Rule codes")[1]
    rows = re.findall(r"^\| (LT3\d\d) \| (MUST|SHOULD) \| (.*) \|$", text, flags=re.M)
    assert rows == [(c, lvl, s) for c, (lvl, s) in GGUF_CODES.items()]
    assert not set(GGUF_CODES) & set(RULES)
