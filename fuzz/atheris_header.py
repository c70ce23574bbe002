"""Coverage-guided fuzzing of the safetensors header parser with atheris (optional, not CI).

loratool's first line of defence against hostile files is ``stfile.read_header`` /
``parse_header_bytes``: every length, offset, shape and dtype is checked before a byte of
tensor data is read. This harness feeds it arbitrary bytes and fails on anything but a
``LoraToolError`` (a crash, another exception, a hang, or a memory blow-up under
``-rss_limit_mb``). It then runs the header-level adapter rules (``check_header``) on every
header that parses, since they read the same hostile metadata.

Run (atheris is not a loratool dependency; it needs a clang-built CPython wheel, Linux x86-64):

    pip install atheris
    python fuzz/atheris_header.py -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
        -runs=1000000 fuzz/corpus/

The corpus directory is created and seeded with the conformance vectors and the examples
(``spec/vectors/**/*.safetensors``, ``examples/*.safetensors``) on the first run. A crashing
input is written as ``crash-<sha1>``; reproduce it with
``python fuzz/atheris_header.py crash-<sha1>``. Without atheris installed, running the file
replays the corpus (or the files given) through the same checks, which is also how to turn a
found input into a regression test.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from loratool.errors import LoraToolError  # noqa: E402
from loratool.stfile import read_header  # noqa: E402
from loratool.validation import check_header  # noqa: E402

_TMP = tempfile.mkdtemp(prefix="loratool-fuzz-")
_PATH = os.path.join(_TMP, "input.safetensors")


def one_input(data: bytes) -> None:
    # read_header is the entry every command uses; going through a real file also covers
    # the length-prefix and file-size checks, not only the JSON part.
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        header = read_header(_PATH)
    except LoraToolError:
        return
    try:
        check_header(header)
    except LoraToolError:
        return


def _seed_corpus(corpus: str) -> None:
    if os.path.isdir(corpus) and os.listdir(corpus):
        return
    os.makedirs(corpus, exist_ok=True)
    root = os.path.dirname(HERE)
    for i, p in enumerate(sorted(glob.glob(os.path.join(root, "spec", "**", "*.safetensors"),
                                           recursive=True)
                                 + glob.glob(os.path.join(root, "examples", "*.safetensors")))):
        if os.path.getsize(p) <= 1 << 20:
            shutil.copy(p, os.path.join(corpus, f"seed-{i}"))


def main() -> None:
    corpora = [a for a in sys.argv[1:] if not a.startswith("-")]
    for c in corpora:
        if not os.path.isfile(c):
            _seed_corpus(c)
    try:
        import atheris
    except ImportError:
        files = [f for c in corpora for f in ([c] if os.path.isfile(c) else
                                              glob.glob(os.path.join(c, "*")))]
        for f in files:
            with open(f, "rb") as fh:
                one_input(fh.read())
        print(f"atheris is not installed: replayed {len(files)} input(s) without a failure")
        return
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
