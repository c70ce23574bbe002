"""Truncation and dense SVD of LyCORIS modules for ``convert`` (spec/lycoris.md section 5):
the exact plain-LoRA factors go through ``lycoris.truncate`` (loratool's resize kernel on the
factors, never the dense delta), and each module's retained Frobenius fraction is reported."""

from __future__ import annotations

from ..errors import InteropError


def reduce_lycoris(adapter, *, rank: int | None = None, fro: float | None = None,
                   dense_svd: bool = False) -> list[str]:
    """Truncate (``rank``/``fro``) the LyCORIS modules of ``adapter`` in place; with
    ``dense_svd`` first factor full ``diff`` modules by a dense SVD. Returns the notes."""
    from ..lycoris import to_lora, truncate
    from ..lycoris.modules import LycorisLoraModule
    from ..lycoris.records import Full
    from ..model import LoraModule
    lyco = {n: m for n, m in adapter.modules.items() if isinstance(m, LycorisLoraModule)}
    if not lyco:
        raise InteropError("--rank/--fro/--dense-svd apply to LyCORIS sources; to change the "
                           "rank of a plain LoRA use `loratool resize`", code="LT304")
    rows, worst = [], None
    for name, m in lyco.items():
        rec = m.record
        if rec.dora is not None:
            continue  # refused by the writer with its reason
        if isinstance(rec, Full):
            if not dense_svd:
                continue
            f = to_lora(rec, dense_svd=True)
        else:
            f = to_lora(rec)
        if rank is not None or fro is not None:
            f = truncate(f, rank=rank, fro=fro)
        # now a plain LoRA: what any LoRA writer stores
        adapter.modules[name] = LoraModule(name, m.kind, m.layout, f.down(), f.up(), f.alpha,
                                           m.scaling, bias=m.bias)
        rows.append(f"{name}: rank {f.source_rank} -> {f.rank}, Frobenius retained "
                    f"{f.retained:.6f} (relative error {f.residual:.3g})")
        if worst is None or f.retained < worst[1]:
            worst = (name, f.retained)
    notes = []
    if rows:
        shown = "; ".join(rows[:12]) + (f"; ... ({len(rows)} in all)" if len(rows) > 12 else "")
        notes.append(f"truncated {len(rows)} LyCORIS module(s): {shown}")
        notes.append(f"lowest retained Frobenius fraction: {worst[1]:.6f} ({worst[0]})")
    return notes
