"""All terminal output: rich tables on stdout, diagnostics and progress on stderr, JSON.

The library never prints; the CLI renders what library functions return through here.
One module a family of reports, all re-exported here (``from loratool import console``;
``console.render_resize(...)``):

- ``terminal``: the consoles, JSON, notes, number formats, table helpers, progress bars
- ``adapters``: ``inspect`` (and ``--base``: amplification), ``validate``
- ``lowrank``: ``resize``, ``compose``, ``compare`` (and ``--subspace``), ``extract``
- ``checkpoints``: ``merge``/``unmerge`` (GGUF bases too), ``convert``, dropped tensors
"""

from __future__ import annotations

from .adapters import (INSPECT_ROWS, render_amplification, render_inspect,
                       render_merged_checkpoint, render_validate)
from .checkpoints import (render_convert, render_convert_dropped, render_dropped,
                          render_gguf_merge, render_merge)
from .lowrank import (render_compare, render_compose, render_extract, render_resize,
                      render_subspace, render_written)
from .terminal import (err, error, fmt, fmt_bytes, note, out, print_fields, print_json,
                       print_report, progress, progress_callback, reset, table)

__all__ = [
    "INSPECT_ROWS", "err", "error", "fmt", "fmt_bytes", "note", "out", "print_fields",
    "print_json", "print_report", "progress", "progress_callback", "render_amplification",
    "render_compare", "render_compose", "render_convert", "render_convert_dropped",
    "render_dropped", "render_extract", "render_gguf_merge", "render_inspect", "render_merge",
    "render_merged_checkpoint", "render_resize", "render_subspace", "render_validate",
    "render_written", "reset", "table",
]
