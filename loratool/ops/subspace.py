"""Subspace similarity of two adapters (``compare(..., subspace=True)``), and its heatmaps.

Hu et al. 2021 ("LoRA", section 7.2) compare the subspaces spanned by the top singular vectors
of two adapters' A matrices with the normalized similarity

    phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j)    in [0, 1]

where V_i holds the top-i right singular vectors. ``on="delta"`` uses the singular vectors of
the deltas themselves (right: input side, left: output side), which is what matters when B is
far from orthogonal. Definitions and tolerances: spec/lowrank.md section 6.
"""

from __future__ import annotations

import os
import re

from ..errors import OperationError

SUBSPACE_ON = ("a", "delta")
HALF = 0.5  # the summary's threshold: the largest i with phi(i, i) >= 0.5


def check_on(on: str) -> str:
    if on not in SUBSPACE_ON:
        raise OperationError(f"on={on!r}: subspace similarity is computed on one of "
                             f"{', '.join(SUBSPACE_ON)} (CLI: --on a|delta)", code="LT536")
    return on


def _bases(m, on: str):
    """(input-side basis [n, k], output-side basis [out, k] or None) of one module."""
    import torch

    from ..linalg import row_space_basis, singular_bases
    B2, A2 = m.factors(torch.float64)
    if on == "a":
        return row_space_basis(A2)[1], None
    _, U, V = singular_bases(B2, A2, m.scale)
    return V, U


def _summary(phi) -> dict:
    """phi at i = j = the smaller dimension, and the largest i with phi(i, i) >= HALF."""
    k = min(phi.shape) if phi.dim() == 2 else 0
    if k == 0:
        return {"dims": list(phi.shape), "phi_at_min": None, "half_dim": None}
    diag = [float(phi[i, i]) for i in range(k)]
    above = [i + 1 for i, v in enumerate(diag) if v >= HALF]
    return {"dims": list(phi.shape), "phi_at_min": diag[-1],
            "half_dim": max(above) if above else None}


def add_subspace(rows: list[dict], adapter_a, adapter_b, on: str) -> dict:
    """Add ``subspace_similarity`` (and ``subspace``) to each compared row; return a summary.

    Only rows with status ``ok`` (same delta shape, no DoRA) are analyzed.
    """
    from ..linalg import subspace_similarity
    check_on(on)
    at_min = []
    for row in rows:
        if row["status"] != "ok":
            continue
        va, ua = _bases(adapter_a.modules[row["name"]], on)
        vb, ub = _bases(adapter_b.modules[row["name"]], on)
        phi = subspace_similarity(va, vb)
        row["subspace_similarity"] = phi.tolist()
        info = {"on": on, **_summary(phi)}
        if on == "delta":
            phi_out = subspace_similarity(ua, ub)
            row["subspace_similarity_output"] = phi_out.tolist()
            info["output"] = _summary(phi_out)
        row["subspace"] = info
        if info["phi_at_min"] is not None:
            at_min.append(info["phi_at_min"])
    return {"on": on, "modules": len(at_min),
            "phi_at_min_mean": sum(at_min) / len(at_min) if at_min else None,
            "phi_at_min_min": min(at_min) if at_min else None}


# --- figure --------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise OperationError("plotting needs matplotlib, which is not installed: install the "
                             "plot extra with  pip install 'loratool[plot]'",
                             code="LT537") from None
    matplotlib.use("Agg", force=True)  # files only; never a window
    import matplotlib.pyplot as plt
    return plt


def module_group(name: str) -> str:
    """The group a module belongs to in the figure: its name with numeric segments as ``*``
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``)."""
    return ".".join("*" if re.fullmatch(r"\d+", s) else s for s in name.split("."))


def subspace_groups(report: dict, key: str = "subspace_similarity") -> list[tuple]:
    """[(group, dims, mean grid as nested lists, module count)] in name order.

    Modules of a group with different grid sizes (per-module ranks) form separate panels.
    """
    import torch
    groups: dict[tuple, list] = {}
    for row in report["modules"]:
        grid = row.get(key)
        if not grid or not grid[0]:
            continue
        t = torch.tensor(grid, dtype=torch.float64)
        groups.setdefault((module_group(row["name"]), tuple(t.shape)), []).append(t)
    return [(g, dims, (sum(ts) / len(ts)).tolist(), len(ts))
            for (g, dims), ts in sorted(groups.items())]


def plot_subspace(report: dict, output: str | os.PathLike, *, overwrite: bool = False,
                  inputs=()) -> str:
    """Write the heatmaps of a ``compare(..., subspace=True)`` report to a PNG; return its path.

    One panel per module group (layer numbers folded: the mean phi over the group's modules),
    like Figure 3 of the LoRA paper; ``on="delta"`` adds a row of output-side panels. Needs the
    ``plot`` extra (matplotlib), else LT537. Usage::

        r = compare("examples/adapter.safetensors", "examples/adapter_style.safetensors",
                    subspace=True)
        plot_subspace(r, "subspace.png", overwrite=True)
    """
    from ..atomic import AtomicFile, check_destination
    output = os.fspath(output)
    if "subspace" not in report:
        raise OperationError("the report has no subspace similarity: call compare(..., "
                             "subspace=True) (CLI: --subspace)", code="LT536")
    check_destination(output, overwrite=overwrite, inputs=inputs)
    plt = _pyplot()
    keys = ["subspace_similarity"]
    if report["subspace"]["on"] == "delta":
        keys.append("subspace_similarity_output")
    panels = [subspace_groups(report, k) for k in keys]
    cols = max((len(p) for p in panels), default=0)
    if cols == 0:
        raise OperationError("no module was compared, so there is nothing to plot",
                             code="LT536")
    fig, axes = plt.subplots(len(keys), cols, figsize=(3.6 * cols + 0.8, 3.4 * len(keys)),
                             squeeze=False, constrained_layout=True)
    side = {"subspace_similarity": "input side" if report["subspace"]["on"] == "delta" else "A",
            "subspace_similarity_output": "output side"}
    image = None
    for r, (key, groups) in enumerate(zip(keys, panels)):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(groups):
                ax.axis("off")
                continue
            group, dims, grid, count = groups[c]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper",
                              extent=(0.5, dims[1] + 0.5, dims[0] + 0.5, 0.5),
                              interpolation="nearest", aspect="auto")
            ax.set_xlabel("j (second adapter)")
            ax.set_ylabel("i (first adapter)")
            leaf = group.rsplit(".", 1)[-1]
            more = f", mean of {count}" if count > 1 else ""
            ax.set_title(f"{leaf} ({side[key]}{more})", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="phi(i, j)")
    fig.suptitle(f"subspace similarity, on={report['subspace']['on']}: "
                 f"{os.path.basename(str(report['a']))} vs {os.path.basename(str(report['b']))}",
                 fontsize=10)
    try:
        with AtomicFile(output, overwrite=overwrite) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return output
