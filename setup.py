"""The optional compiled kernel of the exact merge engine (``loratool._fastmerge``).

Everything else is in pyproject.toml. ``optional=True``: without a C compiler or the Python
headers the install still succeeds and the engine uses its numpy kernel, which gives the same
bytes (``LORATOOL_REQUIRE_EXT=1`` makes a missing extension an import error, for CI).
"""

import os

from setuptools import Extension, setup

# No -ffast-math (flushes subnormals, reassociates the exact rounding); no FMA contraction.
FLAGS = [] if os.name == "nt" else ["-O3", "-fno-fast-math", "-ffp-contract=off",
                                     "-fno-strict-aliasing"]

HEADERS = ["loratool/_fastmerge_round.h", "loratool/_fastmerge_tiles.h",
           "loratool/_fastmerge_lowp.h"]  # included by _fastmerge.c: one translation unit

setup(ext_modules=[Extension("loratool._fastmerge", ["loratool/_fastmerge.c"],
                             depends=HEADERS, extra_compile_args=FLAGS, optional=True)])
