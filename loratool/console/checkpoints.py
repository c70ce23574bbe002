"""Reports of the operations that write checkpoints and adapter files: ``merge``/
``unmerge`` (safetensors, .pt, GGUF bases) and ``convert``; dropped tensors."""

from __future__ import annotations

import os

from .terminal import fmt, fmt_bytes, note, out


def _title(d: dict) -> str:
    """``Merged a.safetensors:1, b.safetensors:0.5 -> OUT`` (or Unmerged)."""
    verb = "Merged" if d["operation"] == "merge" else "Unmerged"
    names = ", ".join(f"{os.path.basename(a['source'])}:{a['scale']:g}" for a in d["adapters"])
    return f"{verb} {names} -> {d['output']}"


def render_merge(d: dict) -> None:
    c = out()
    rate = d["bytes_read"] / d["stream_seconds"] if d["stream_seconds"] else 0.0
    how = "float64, rounded once" if d["precision"] == "fp64" else "float32"
    lines = [
        _title(d),
        f"  modules     {d['modules_merged']} ({d['tensors_merged']} tensors changed, "
        f"{d['tensors_copied']} copied, {d['tensors_converted']} converted)",
        f"  data        {fmt_bytes(d['bytes_read'])} streamed in {d['stream_seconds']:.2f} s "
        f"({fmt_bytes(rate)}/s); {d['seconds']:.2f} s in all",
        f"  device      {d['device']} ({how}), dtype {d['dtype']}",
    ]
    for a in d["adapters"]:
        lines.append(f"  identity    {os.path.basename(a['source'])} {a['identity']}")
    for line in lines:
        c.print(line, markup=False, highlight=False, soft_wrap=True)
    for text in d.get("notes", []):
        note(f"note: {text}")
    if d.get("replacements_merged"):
        note(f"note: {d['replacements_merged']} base tensor(s) replaced (PEFT modules_to_save, "
             "biases, embeddings or trainable tokens)")
    render_dropped(d.get("dropped", []))
    if d["skipped"]:
        note(f"warning: {len(d['skipped'])} module(s) skipped (--allow-missing):")
        for s in d["skipped"]:
            note(f"  {s['adapter']}: {s['module']} {s['reason']}")


def render_gguf_merge(d: dict) -> None:
    """A merge into a GGUF base: what was written, and how much of each delta survived."""
    from rich.table import Table
    c = out()
    c.print(f"{_title(d)} (GGUF, types: {d['output_type']})",
            markup=False, highlight=False, soft_wrap=True)
    c.print(f"  tensors     {d['tensors_merged']} merged, {d['tensors_copied']} copied; "
            f"{d['seconds']:.2f} s", markup=False, highlight=False)
    c.print(f"  delta       retained {fmt(d['retained'], 4)}, kept {fmt(d['kept'], 4)}, "
            f"rel. error {fmt(d['rel_error'], 3)} (overall)", markup=False, highlight=False)
    t = Table(box=None, header_style="bold")
    for col in ("tensor", "type", "||delta||", "retained", "kept", "rel_error"):
        t.add_column(col, justify="left" if col in ("tensor", "type") else "right")
    for r in d["tensors"]:
        types = r["base_type"] if r["base_type"] == r["out_type"] else \
            f"{r['base_type']}->{r['out_type']}"
        t.add_row(r["name"], types, fmt(r["delta_norm"], 4), fmt(r["retained"], 4),
                  fmt(r["kept"], 4), fmt(r["rel_error"], 3))
    c.print(t)
    for s in d.get("skipped", []):
        c.print(f"  skipped     {s['module']} ({s['adapter']}): {s['reason']}", markup=False,
                highlight=False)
    for text in d.get("notes", []):
        c.print(f"  note: {text}", markup=False, highlight=False)


def render_dropped(dropped: list[dict]) -> None:
    """Tensors an operation did not apply (``--allow-unknown``), one per line on stderr."""
    if dropped:
        note(f"warning: {len(dropped)} tensor(s) dropped, not applied (--allow-unknown):")
        for d in dropped:
            note(f"  {d['adapter']}: {d['tensor']}")


def render_convert(data: dict) -> None:
    """One line: source (format) -> destination (format), modules, replaced tensors; then the
    conversion's notes."""
    c = out()
    reps = (f", {len(data['replacements'])} replaced tensor(s)" if data["replacements"]
            else "")
    c.print(f"{data['source']} ({data['source_format']}) -> {data['destination']} "
            f"({data['target_format']}): {data['modules']} module(s){reps}", markup=False,
            highlight=False)
    for text in data["notes"]:
        c.print(f"  note: {text}", markup=False, highlight=False)


def render_convert_dropped(data: dict) -> None:
    """With ``convert --json``: the unknown tensors on stderr too (never dropped without a
    word)."""
    render_dropped([{"adapter": data["source"], "tensor": t} for t in data["unknown_tensors"]])
