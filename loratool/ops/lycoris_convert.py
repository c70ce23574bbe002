"""LyCORIS modules in ``convert`` (spec/lycoris.md section 5): their plain-LoRA form, exact or
truncated, in the dtype asked for.

The exact factors go through ``lycoris.truncate`` (loratool's resize kernel and rank rules on
the factors, never the dense delta), and each module's retained Frobenius fraction is
reported. Modules that stay LyCORIS (``--to lycoris``, or the loratool format's native kinds)
keep their record and tensors untouched.
"""

from __future__ import annotations

from ..errors import InteropError

def _torch_dtype(name: str):
    import torch
    return {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16,
            "bf16": torch.bfloat16}[name]


def to_plain(adapter, *, rule: dict | None = None, dense_svd: bool = False,
             dtype: str | None = None, all_modules: bool = True) -> list[str]:
    """Replace the LyCORIS modules of ``adapter`` by plain LoRA modules, in place.

    ``rule``: one truncation rule of ``loratool resize`` (``rank``, ``fro``, ``sv_ratio``,
    ``cumulative``); ``dense_svd`` factors full ``diff`` modules by a dense SVD; ``dtype``
    (``fp64``, the exact default, or ``fp32``/``fp16``/``bf16``) rounds the factors once.
    With ``all_modules`` false only truncated or dense-SVD'd modules change (the others keep
    their record). DoRA modules, and full diffs without ``dense_svd``, stay as they are: the
    target's writer refuses them with the reason. Returns the notes."""
    from ..lycoris import to_lora, truncate
    from ..lycoris.modules import LycorisLoraModule
    from ..lycoris.records import Full
    from ..model import LoraModule
    from ..linalg import check_rank_rule
    rule = {k: v for k, v in (rule or {}).items() if v is not None}
    check_rank_rule(**rule, required=False)  # resize's rules and their ranges (LT530)
    lyco = {n: m for n, m in adapter.modules.items() if isinstance(m, LycorisLoraModule)}
    if not lyco and (rule or dense_svd or dtype):
        flags = ", ".join([f"--{k.replace('_', '-')}" for k in rule]
                          + ["--dense-svd"] * dense_svd + ["--dtype"] * bool(dtype))
        raise InteropError(f"{flags} apply to LyCORIS sources; to change the rank or dtype of "
                           "a plain LoRA use `loratool resize`", code="LT304")
    torch_dtype = None if dtype in (None, "fp64") else _torch_dtype(dtype)
    rows, exact, worst = [], 0, None
    for name, m in lyco.items():
        rec = m.record
        if rec.dora is not None or (isinstance(rec, Full) and not dense_svd):
            continue
        if not (all_modules or rule or (dense_svd and isinstance(rec, Full))):
            continue
        f = to_lora(rec, dense_svd=isinstance(rec, Full))
        if rule:
            f = truncate(f, **rule)
        A, B = f.down(), f.up()
        if torch_dtype is not None:
            A, B = _rounded(name, A, torch_dtype, dtype), _rounded(name, B, torch_dtype, dtype)
        adapter.modules[name] = LoraModule(name, m.kind, m.layout, A, B, f.alpha,
                                           m.scaling, bias=m.bias)
        if rule or isinstance(rec, Full):
            rows.append(f"{name}: rank {f.source_rank} -> {f.rank}, Frobenius retained "
                        f"{f.retained:.6f} (relative error {f.residual:.3g})")
            if worst is None or f.retained < worst[1]:
                worst = (name, f.retained)
        else:
            exact += 1
    notes = []
    if rows:
        shown = "; ".join(rows[:12]) + (f"; ... ({len(rows)} in all)" if len(rows) > 12 else "")
        notes.append(f"truncated {len(rows)} LyCORIS module(s): {shown}")
        notes.append(f"lowest retained Frobenius fraction: {worst[1]:.6f} ({worst[0]})")
    if exact:
        notes.append(f"{exact} LyCORIS module(s) written in their exact plain-LoRA form")
    if torch_dtype is not None and (rows or exact):
        notes.append(f"plain-LoRA factors rounded once to {dtype} (computed in float64)")
    return notes


def _rounded(name: str, t, torch_dtype, label: str):
    import torch

    from ..tensors import round_once  # torch's float64 -> bf16/fp16 ``.to`` rounds twice
    out = round_once(t, torch_dtype)
    if not bool(torch.isfinite(out).all()):
        raise InteropError(f"module {name!r}: its plain-LoRA factors overflow {label}; choose "
                           "a wider --dtype", code="LT305", module=name)
    return out
