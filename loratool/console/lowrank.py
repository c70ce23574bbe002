"""Reports of the low-rank operations: ``resize``, ``compose``, ``compare`` (with
``--subspace``) and ``extract`` (a resize-like table)."""

from __future__ import annotations

from .terminal import fmt, note, out, print_report, table


def render_written(report: dict) -> None:
    """The stderr line of an operation that wrote an adapter (``output=``)."""
    if report.get("output") is None:
        return
    parts = [f"{len(report['modules'])} modules"]
    replaced = report.get("summary", {}).get("replaced", 0)  # extract's replacement entries
    if replaced:
        parts.append(f"{replaced} replacement entries")
    if report.get("tensor_hash"):
        parts.append(report["tensor_hash"])
    note(f"wrote {report['output']} ({', '.join(parts)})")


def _ranks(histogram: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in histogram.items()) or "-"


def render_resize(report: dict) -> None:
    from rich.text import Text
    c = out()
    rule = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in report["rule"].items())
    c.print(f"{report['input']}  resize ({rule})", style="bold", markup=False, highlight=False)
    t = table(("module", "kind", "rank", "new", "retained", "residual", "s_max", "note"),
              left=("module", "kind", "note"))
    for r in report["modules"]:
        notes = []
        if r["unchanged"]:
            notes.append("unchanged")
        if r["clamped"]:
            notes.append(f"clamped to {r['limit']}")
        t.add_row(Text(r["name"]), r["kind"], str(r["old_rank"]), str(r["new_rank"]),
                  f"{r['retained']:.6f}", fmt(r["residual"], 3), fmt(r["sv_max"], 4),
                  ", ".join(notes))
    s = report["summary"]
    print_report(c, t, report["modules"], [
        ("modules", f"{s['modules']} ({s['resized']} resized, {s['unchanged']} unchanged, "
                    f"{s['clamped']} clamped)"),
        ("ranks", f"{_ranks(s['ranks_before'])} -> {_ranks(s['ranks_after'])}"),
        ("parameters", f"{s['parameters_before']:,} -> {s['parameters_after']:,}"),
        ("retained", f"overall {s['retained_overall']:.6f}, min {s['retained_min']:.6f} "
                     f"(fraction of the Frobenius norm)")])


def render_compose(report: dict) -> None:
    from rich.text import Text
    c = out()
    inputs = " + ".join(f"{fmt(i['weight'])} x {i['input']}" for i in report["inputs"])
    rule = ", ".join(f"{k} {v}" for k, v in report["rule"].items()) or "exact"
    c.print(f"compose {inputs}  ({rule})", style="bold", markup=False, highlight=False)
    truncating = bool(report["rule"])
    cols = ["module", "kind", "ranks", "sum rank", "new"]
    if truncating:
        cols += ["retained", "residual"]
    t = table(cols, left=("module", "kind", "ranks"))
    for r in report["modules"]:
        ranks = "+".join("-" if x is None else str(x) for x in r["ranks"])
        row = [Text(r["name"]), r["kind"], ranks, str(r["concat_rank"]), str(r["new_rank"])]
        if truncating:
            row += [f"{r['retained']:.6f}", fmt(r["residual"], 3)]
        t.add_row(*row)
    s = report["summary"]
    fields = [("modules", f"{s['modules']} ({s['in_all_inputs']} in every input; {s['exact']} "
                          f"exact, {s['truncated']} truncated)"),
              ("parameters", f"{s['parameters_before']:,} in the inputs -> "
                             f"{s['parameters_after']:,}")]
    if "retained_overall" in s:
        fields.append(("retained", f"overall {s['retained_overall']:.6f}, min "
                                   f"{s['retained_min']:.6f} (fraction of the Frobenius norm)"))
    print_report(c, t, report["modules"], fields)


def render_compare(report: dict) -> None:
    """The cosine/norm table, or with ``--subspace`` (``report["subspace"]``) the subspace
    similarity table."""
    if "subspace" in report:
        return render_subspace(report)
    from rich.text import Text
    c = out()
    c.print(f"A = {report['a']}\nB = {report['b']}", style="bold", markup=False,
            highlight=False)
    t = table(("module", "|dA|", "|dB|", "|dB|/|dA|", "cosine", "|dB-dA|/|dA|", "status"),
              left=("module", "status"))
    for r in report["modules"]:
        status = {"ok": "", "only_a": "only in A", "only_b": "only in B",
                  "shape_mismatch": "shapes differ", "dora": "DoRA, not compared"}[r["status"]]
        if r.get("note"):
            status = r["note"]
        t.add_row(Text(r["name"]), fmt(r["norm_a"], 5), fmt(r["norm_b"], 5),
                  fmt(r["norm_ratio"], 5), fmt(r["cosine"], 6), fmt(r["rel_diff"], 4),
                  status)
    s = report["summary"]
    print_report(c, t, report["modules"], [
        ("modules", f"{s['common']} compared, {len(s['only_a'])} only in A, "
                    f"{len(s['only_b'])} only in B, {len(s['not_compared'])} not comparable"),
        ("cosine", f"{fmt(s['cosine'])} (whole adapter), mean {fmt(s['cosine_mean'])}, "
                   f"min {fmt(s['cosine_min'])}"),
        ("norm ratio", f"{fmt(s['norm_ratio'])} (whole adapter, |B|/|A|)")])


def render_subspace(report: dict) -> None:
    """``compare --subspace``: one line per module: dimensions, phi at i = j = the smaller
    one, and the largest i with phi(i, i) >= 0.5."""
    from rich.text import Text
    c = out()
    on = report["subspace"]["on"]
    c.print(f"A = {report['a']}\nB = {report['b']}\nsubspace similarity on "
            f"{'A matrices' if on == 'a' else 'deltas (input side; output side after /)'}",
            style="bold", markup=False, highlight=False)
    t = table(("module", "dims", "phi(k,k)", "max i: phi(i,i)>=0.5", "cosine", "status"),
              left=("module", "status"))
    for r in report["modules"]:
        s = r.get("subspace")
        if s is None:
            t.add_row(Text(r["name"]), "-", "-", "-", "-", r["status"].replace("_", " "))
            continue
        dims = "x".join(map(str, s["dims"]))
        phi, half = fmt(s["phi_at_min"], 4), fmt(s["half_dim"], 4)
        if "output" in s:
            phi += " / " + fmt(s["output"]["phi_at_min"], 4)
            half += " / " + fmt(s["output"]["half_dim"], 4)
        t.add_row(Text(r["name"]), dims, phi, half, fmt(r["cosine"], 6), "")
    s = report["subspace"]
    fields = [("modules", f"{s['modules']} analyzed; phi(k,k) mean "
                          f"{fmt(s['phi_at_min_mean'], 4)}, min {fmt(s['phi_at_min_min'], 4)} "
                          "(k = the smaller dimension; 1: one subspace contains the other, "
                          "0: orthogonal)")]
    if report.get("plot"):
        fields.append(("plot", report["plot"]))
    print_report(c, t, report["modules"], fields)


def render_extract(report: dict) -> None:
    """The report of ``extract``: per-module table, summary, changed non-LoRA tensors."""
    from rich.text import Text
    c = out()
    rule = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in report["rule"].items())
    c.print(f"{report['base']} -> {report['tuned']}  extract ({rule})", style="bold",
            markup=False, highlight=False)
    t = table(("module", "kind", "shape", "rank", "rel. error", "error", "retained",
               "method", "reason"), left=("module", "kind", "shape", "method", "reason"))
    for r in report["modules"]:
        t.add_row(Text(r["name"]), r["kind"] + (" (T)" if r["layout"] == "in_out" else ""),
                  "x".join(map(str, r["shape"])), str(r["rank"]),
                  fmt(r["relative_error"], 3), fmt(r["error"], 3),
                  f"{r['retained']:.6f}", r["method"], Text(r["reason"]))
    s = report["summary"]
    print_report(c, t, report["modules"], [
        ("modules", f"{s['modules']} extracted, {s['identical_weights']} weights "
                    f"unchanged, {s['not_selected']} tensors not selected"),
        ("ranks", _ranks(s["ranks"])),
        ("parameters", f"{s['parameters']:,}"),
        ("error", f"relative {s['relative_error_overall']:.3g} overall, max "
                  f"{s['relative_error_max']:.3g} (||dW - BA||_F / ||dW||_F)")])
    for action, label, what in (
            ("replaced", "replaced", "stored whole (replacement entries)"),
            ("replaced_rows", "rows", "changed rows stored (row replacement entries)"),
            ("skipped", "skipped", "left out")):
        rows = [o for o in report["others"] if o["action"] == action]
        if not rows:
            continue
        c.print(f"  {label:<11}{len(rows)} changed tensor(s) that are not LoRA modules, "
                f"{what}:", markup=False, highlight=False)
        for o in rows:
            rows_text = (f", {o['rows_changed']} of {o['shape'][0]} rows changed"
                         if o.get("rows_changed") is not None else "")
            c.print(f"    {o['name']} {o['shape']} {o['dtype']} ({o['category']}, relative "
                    f"change {fmt(o['relative_change'], 3)}{rows_text})", markup=False,
                    highlight=False)
