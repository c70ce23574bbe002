"""The conformance vectors of spec/vectors, listed for parametrized tests."""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(REPO, "spec")
VECTORS = os.path.join(SPEC, "vectors")


def index() -> list[dict]:
    """Entries of spec/vectors/index.json: path (relative), expect, code, canonical."""
    with open(os.path.join(VECTORS, "index.json"), encoding="utf-8") as f:
        return json.load(f)["vectors"]


def vectors(expect: str) -> list[str]:
    """Absolute paths of the vectors whose expectation is valid, warning or invalid."""
    return [os.path.join(VECTORS, v["path"]) for v in index() if v["expect"] == expect]


def vector_id(path: str) -> str:
    return os.path.basename(path)[: -len(".safetensors")]


def sidecar(path: str, suffix: str) -> dict:
    with open(path[: -len(".safetensors")] + suffix, encoding="utf-8") as f:
        return json.load(f)


def expected_code(path: str) -> str:
    return sidecar(path, ".expected.json")["code"]
