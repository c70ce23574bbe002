"""Tables for the LoRA paper's analyses: ``compare --subspace`` and ``inspect --base``."""

from __future__ import annotations

from .. import console


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render_subspace(report: dict) -> None:
    """One line per module: dimensions, phi at i = j = the smaller one, and the largest i
    with phi(i, i) >= 0.5."""
    from rich.table import Table
    from rich.text import Text
    c = console.out()
    on = report["subspace"]["on"]
    c.print(f"A = {report['a']}\nB = {report['b']}\nsubspace similarity on "
            f"{'A matrices' if on == 'a' else 'deltas (input side; output side after /)'}",
            style="bold", markup=False, highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "dims", "phi(k,k)", "max i: phi(i,i)>=0.5", "cosine", "status"):
        table.add_column(col, justify="left" if col in ("module", "status") else "right",
                         no_wrap=col == "module")
    for r in report["modules"]:
        s = r.get("subspace")
        if s is None:
            table.add_row(Text(r["name"]), "-", "-", "-", "-", r["status"].replace("_", " "))
            continue
        dims = "x".join(map(str, s["dims"]))
        phi, half = _fmt(s["phi_at_min"]), _fmt(s["half_dim"])
        if "output" in s:
            phi += " / " + _fmt(s["output"]["phi_at_min"])
            half += " / " + _fmt(s["output"]["half_dim"])
        table.add_row(Text(r["name"]), dims, phi, half, _fmt(r["cosine"], 6), "")
    if report["modules"]:
        c.print(table)
    s = report["subspace"]
    c.print(f"  modules     {s['modules']} analyzed; phi(k,k) mean {_fmt(s['phi_at_min_mean'])}, "
            f"min {_fmt(s['phi_at_min_min'])} (k = the smaller dimension; 1: one subspace "
            "contains the other, 0: orthogonal)", markup=False, highlight=False)
    if report.get("plot"):
        c.print(f"  plot        {report['plot']}", markup=False, highlight=False)


def render_amplification(report: dict) -> None:
    """After the inspect table: per module ||dW||, ||U^T W V||, ||W||, baselines, factor."""
    from rich.table import Table
    from rich.text import Text
    c = console.out()
    b = report["base"]
    c.print(f"amplification against {b['path']} (random baseline seed {b['seed']})",
            style="bold", markup=False, highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "k", "|dW|", "|U'WV|", "|W|", "top-k of W", "random", "amplif."):
        table.add_column(col, justify="left" if col == "module" else "right",
                         no_wrap=col == "module")
    for m in report["modules"]:
        a = m.get("amplification")
        if a is None:
            why = "experts: not analyzed" if m.get("kind") == "experts" else "DoRA: not analyzed"
            table.add_row(Text(m["name"]), "-", "-", "-", "-", "-", "-", why)
            continue
        table.add_row(Text(m["name"]), str(a["rank"]), _fmt(a["delta_norm"]),
                      _fmt(a["projection_norm"]), _fmt(a["base_norm"]),
                      _fmt(a["top_projection_norm"]), _fmt(a["random_projection_norm"]),
                      _fmt(a["amplification"]))
    if report["modules"]:
        c.print(table)
    c.print(f"  amplification  min {_fmt(b['amplification_min'])}, max "
            f"{_fmt(b['amplification_max'])} (|dW| / |U'WV|; U, V: dW's top-k singular "
            "vectors)", markup=False, highlight=False)
