"""Doctests of the library (``python -m pytest`` collects ``loratool/`` with
``--doctest-modules``): their examples name files under ``examples/``, so they run from the
repository root."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _doctests_run_from_the_repository(request, monkeypatch):
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(REPO)
    yield
