"""``extract``: the low-rank adapter that best reproduces ``tuned - base`` (spec/extract.md).

The inverse of merge. Both checkpoints are read tensor by tensor in row blocks (``reader``);
each changed 2-D weight (and conv weight) gets its spectrum from ``engine`` (exact SVD for
small matrices, a streamed randomized sketch for large ones) and a rank from ``ranks``; the
result is an ``Adapter`` with balanced factors and scale 1, plus a report whose per-module
error is computed, not estimated. Changed tensors that are not weights of a linear/conv layer
(norms, biases, embeddings by default) become replacement entries holding their tuned values
(``others``), listed in the report; unchanged ones produce nothing.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import OperationError
from ...format import (KIND_CONV, KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, LAYOUT_OUT_IN,
                       MODULE_NAME_RE)

Progress = Callable[[int, int], None]

OTHERS = ("full", "skip")
EMBEDDINGS = ("full", "lora", "skip")
LAYOUTS = ("auto", LAYOUT_OUT_IN, LAYOUT_IN_OUT)
TARGETS = ("loratool", "peft", "kohya")  # output formats (ExtractResult.save)
DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp64": "F64"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

# Hugging Face model types whose projections are transformers' Conv1D ([in, out] weights),
# and the module names that are Conv1D in them (their lm_head and embeddings are not).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


@dataclass
class ExtractResult:
    """The extracted adapter and a JSON-ready report; unpacks as ``adapter, report``."""

    adapter: object  # loratool.model.Adapter
    report: dict
    others: list[dict] = field(default_factory=list)  # changed non-LoRA tensors (replaced
    # or skipped), as in the report

    def __iter__(self):
        return iter((self.adapter, self.report))

    def save(self, path: str | os.PathLike, *, to: str = "loratool",
             overwrite: bool = False) -> dict:
        """Write the adapter in format ``to`` (``TARGETS``) through the format registry:
        ``{"format", "tensor_hash" (loratool), "notes"}``. A format that cannot hold a
        replacement entry or a module kind is refused before writing (LT306), naming them
        and the extract options that leave them out.

        Example::

            result = extract("base.safetensors", "tuned.safetensors", rank=16)
            result.save("adapter_dir", to="peft")   # loads with PeftModel.from_pretrained
        """
        _choice("to", to, TARGETS)
        path = os.fspath(path)
        if to == "loratool":
            from ...adapter import save_adapter
            return {"format": to, "notes": [],
                    "tensor_hash": save_adapter(self.adapter, path, overwrite=overwrite)}
        from ..convert import convert
        _refuse_unwritable(to, self.adapter.replacements, self.adapter.modules.items())
        report = convert(self.adapter, path, to=to, overwrite=overwrite)
        return {"format": to, "notes": report.notes}


@dataclass(frozen=True)
class _Target:
    name: str  # tensor name
    module: str
    kind: str
    layout: str
    shape: tuple[int, ...]
    dtype: str


def extract(base: str | os.PathLike, tuned: str | os.PathLike, *, rank: int | None = None,
            fro: float | None = None, sv_ratio: float | None = None,
            cumulative: float | None = None, max_error: float | None = None,
            auto_rank: bool = False, max_rank: int | None = None, min_rank: int | None = None,
            modules: list[str] | tuple[str, ...] | None = None, others: str = "full",
            embeddings: str = "full", layout: str = "auto", dtype: str = "fp32",
            seed: int = 0, progress: Progress | None = None,
            output: str | os.PathLike | None = None, to: str = "loratool",
            overwrite: bool = False) -> ExtractResult:
    """Extract the LoRA adapter whose merge into ``base`` best reproduces ``tuned``.

    One rank rule: ``rank`` K; ``fro`` F (keep fraction F of each delta's Frobenius norm);
    ``sv_ratio`` R (singular values >= s_max / R); ``cumulative`` C (fraction of the sum of
    singular values); ``max_error`` E (smallest rank with ||dW - BA||_F <= E ||dW||_F); or
    ``auto_rank`` (the singular values above the tuned dtype's rounding-noise floor: the rank
    of an adapter merged into a bf16/fp16 checkpoint). ``max_rank``/``min_rank`` clamp.
    ``modules``: glob patterns over module names (tensor names without ``.weight``) and
    tensor names; only matching tensors are compared. ``others``: changed tensors that cannot
    be a LoRA module (norms, biases): ``"full"`` stores each as a replacement entry with its
    tuned values (exact; non-float tensors are refused, LT545), ``"skip"`` leaves them out;
    both list them in the report. ``embeddings``: changed embeddings as replacement entries
    (``"full"``: the changed rows when at most half changed, else the whole tensor), as LoRA
    embedding modules (``"lora"``) or left out and listed (``"skip"``). ``layout``: ``"auto"`` derives GPT-2 Conv1D layouts from the
    base's config.json; ``"out_in"``/``"in_out"`` set every linear module's layout. Factors are
    stored in ``dtype`` (fp32 default), balanced, with alpha = rank (scale 1).
    ``output``: also write the adapter there in format ``to`` (``ExtractResult.save``; the
    destination is checked before any work: never a file an input reads, LT502; exists
    without ``overwrite``, LT503; what format ``to`` cannot hold, LT306, as soon as the
    changed tensors are known, before any SVD); the report then names it (``output``,
    ``format``, ``notes``, and ``tensor_hash`` for loratool files).

    Example::

        adapter, report = extract("base.safetensors", "tuned.safetensors", rank=16)
        report["modules"][0]["error"]   # ||dW - B A||_F of the float64 factors, computed
    """
    from .ranks import check_rule
    rule = check_rule(rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative,
                      max_error=max_error, auto_rank=auto_rank, max_rank=max_rank,
                      min_rank=min_rank)
    _choice("others", others, OTHERS)
    _choice("embeddings", embeddings, EMBEDDINGS)
    _choice("layout", layout, LAYOUTS)
    _choice("dtype", dtype, tuple(DTYPES))
    _choice("to", to, TARGETS)
    from ..resize import check_output
    base, tuned = os.fspath(base), os.fspath(tuned)
    output = check_output(output, overwrite, [base, tuned])
    result = _extract(base, tuned, rule, modules, others, embeddings, layout, dtype, seed,
                      progress, to if output is not None else None)
    result.report["output"] = output
    if output is not None:
        result.report.update(result.save(output, to=to, overwrite=overwrite))
    return result


def _extract(base: str, tuned: str, rule, modules, others: str, embeddings: str, layout: str,
             dtype: str, seed: int, progress, to: str | None) -> ExtractResult:
    """``to``: the format the result will be written in (None: not written here)."""
    from .reader import Checkpoint
    with Checkpoint(base) as b, Checkpoint(tuned) as t:
        _check_match(b, t, base, tuned)
        selected = [n for n in b.tensors if _selected(n, modules)]
        not_selected = [n for n in b.tensors if n not in set(selected)]
        targets, candidates_other = _classify(b, selected, embeddings)
        targets = _with_layouts(targets, b, layout)
        return _run(b, t, rule, targets, candidates_other, not_selected, others=others,
                    dtype=DTYPES[dtype], seed=seed, progress=progress, to=to,
                    labels=(base, tuned), options=dict(
                        modules=list(modules) if modules else None, others=others,
                        embeddings=embeddings, layout=layout, dtype=dtype, seed=seed))


def _refuse_unwritable(to: str, replaced, modules) -> None:
    """LT306 when format ``to`` cannot hold the replacement entries of the tensors named in
    ``replaced`` or the kind of one of ``modules``: (name, anything with a ``kind``)."""
    from ...errors import InteropError
    from ...interop import get_format
    caps = get_format(to).CAPABILITIES
    reps = [] if caps.replacements else sorted(replaced)
    kinds = sorted(n for n, m in modules if m.kind not in caps.kinds)
    if not reps and not kinds:
        return
    what = []
    if reps:
        what.append(f"{len(reps)} replaced tensor(s) (changed norms, biases, embeddings): "
                    + ", ".join(reps[:12]) + (" ..." if len(reps) > 12 else ""))
    if kinds:
        what.append(f"{len(kinds)} module(s) of a kind it has no place for: "
                    + ", ".join(kinds[:12]) + (" ..." if len(kinds) > 12 else ""))
    raise InteropError(
        f"the {to} format cannot hold {'; '.join(what)}. Leave them out with others='skip' "
        "and embeddings='skip' (CLI --skip-others --embeddings skip; they are then listed as "
        f"skipped), or write loratool or peft instead of {to}", code="LT306")


def _choice(name, value, allowed) -> None:
    if value not in allowed:
        raise OperationError(f"{name} = {value!r}: choose one of {', '.join(allowed)}",
                             code="LT540")


def _selected(name: str, patterns) -> bool:
    if not patterns:
        return True
    module = name.removesuffix(".weight").removesuffix(".bias")
    return any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_match(b, t, base: str, tuned: str) -> None:
    """Every tensor on both sides with the same shape and dtype; all differences listed."""
    problems = []
    for name in b.tensors:
        if name not in t.tensors:
            problems.append(f"{name}: only in the base")
    for name in t.tensors:
        if name not in b.tensors:
            problems.append(f"{name}: only in the tuned checkpoint")
    for name, x in b.tensors.items():
        y = t.tensors.get(name)
        if y is None:
            continue
        if tuple(x.shape) != tuple(y.shape):
            problems.append(f"{name}: shape {list(x.shape)} in the base, {list(y.shape)} tuned")
        elif x.dtype != y.dtype:
            problems.append(f"{name}: dtype {x.dtype} in the base, {y.dtype} tuned")
    if problems:
        shown = problems[:25]
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise OperationError(f"{base} and {tuned} do not hold the same tensors "
                             f"({len(problems)} difference(s)); extract needs the same "
                             "architecture on both sides:\n  " + "\n  ".join(shown) + more,
                             code="LT541")


def _classify(b, names, embeddings: str):
    """(targets: tensors that can be LoRA modules, others: every other selected tensor)."""
    from .others import EMBEDDING_RE
    targets, others = [], []
    for name in names:
        info = b.tensors[name]
        module = name.removesuffix(".weight")
        shape = tuple(info.shape)
        eligible = (name.endswith(".weight") and info.dtype in FLOAT_DTYPES and len(shape) >= 2
                    and all(shape) and MODULE_NAME_RE.match(module) is not None)
        if not eligible:
            others.append(name)
            continue
        if len(shape) >= 3:
            targets.append(_Target(name, module, KIND_CONV, LAYOUT_OUT_IN, shape, info.dtype))
        elif EMBEDDING_RE.search(module.rpartition(".")[2]):
            if embeddings == "lora":
                targets.append(_Target(name, module, KIND_EMBEDDING, LAYOUT_IN_OUT, shape,
                                       info.dtype))
            else:
                others.append(name)
        else:
            targets.append(_Target(name, module, KIND_LINEAR, "", shape, info.dtype))
    return targets, others


def _with_layouts(targets, b, layout: str):
    """Linear layouts: from ``layout``, else from the base's config.json (GPT-2 Conv1D)."""
    from dataclasses import replace
    linear = [x for x in targets if x.kind == KIND_LINEAR]
    if layout != "auto":
        return [replace(x, layout=layout) if x.kind == KIND_LINEAR else x for x in targets]
    config = os.path.join(b.config_dir(), "config.json")
    model_type = None
    if os.path.isfile(config):
        from ...interop._common import read_json_config
        model_type = read_json_config(config).get("model_type")
    conv1d_named = [x.module for x in linear if x.module.rpartition(".")[2] in CONV1D_NAMES]
    if model_type is None and conv1d_named:
        raise OperationError(
            f"module {conv1d_named[0]!r} (and {len(conv1d_named) - 1} more) is named like a "
            "GPT-2 Conv1D layer, whose weight is stored [in, out], but the base has no "
            "config.json to tell; pass layout='in_out' (CLI --layout in_out) for Conv1D "
            "weights or layout='out_in' for torch.nn.Linear weights", code="LT542")
    conv1d = model_type in CONV1D_MODEL_TYPES
    return [replace(x, layout=LAYOUT_IN_OUT if conv1d and x.module.rpartition(".")[2]
                    in CONV1D_NAMES else LAYOUT_OUT_IN) if x.kind == KIND_LINEAR else x
            for x in targets]


def _run(b, t, rule, targets, other_names, not_selected, *, others, dtype, seed, progress,
         to, labels, options):
    from ...model import Adapter
    from ..resize import byte_progress
    from .reader import Pair
    from . import others as O
    from .build import build_module, spectrum_for
    total = sum(Pair(x.name, b, t, x.dtype, x.shape).nbytes * 2 for x in targets) + sum(
        _nbytes(b.tensors[n]) * 2 for n in other_names)
    advance = byte_progress(progress, total)

    from .engine import Scratch
    scratch = Scratch()
    changed_others, replacements = [], {}
    for name in other_names:
        cat = O.category(name, b.tensors[name])
        skip = options["embeddings"] == "skip" if cat == "embedding" else others == "skip"
        row, rep = O.compare(b, t, name, keep=not skip)
        if row is not None:
            changed_others.append(row)
        if rep is not None:
            replacements[name] = rep
        advance(_nbytes(b.tensors[name]) * 2)
    lost = [r for r in changed_others if r["category"] == "non-float" and others != "skip"]
    if lost:
        raise O.refuse(lost)
    if to not in (None, "loratool"):
        # what the output format cannot hold is known now (which tensors changed, their
        # categories): refused before any SVD, not after the whole extraction
        from ...interop import get_format
        kinds = get_format(to).CAPABILITIES.kinds
        _refuse_unwritable(to, replacements, [
            (x.module, x) for x in targets if x.kind not in kinds
            and Pair(x.name, b, t, x.dtype, x.shape).differs()])
    mods, rows, identical = {}, [], 0
    for i, x in enumerate(targets):
        pair = Pair(x.name, b, t, x.dtype, x.shape, scratch)
        spec_choice = spectrum_for(pair, rule, seed=seed + i)
        if spec_choice is None:
            identical += 1
        else:
            module, row = build_module(x, pair, *spec_choice, dtype=dtype)
            mods[x.module] = module
            rows.append(row)
        advance(pair.nbytes * 2)
    if not mods and not replacements:
        raise OperationError(
            f"no weight differs between {labels[0]} and {labels[1]}"
            + (" among the selected modules" if options["modules"] else "")
            + f" ({identical} compared, {len(changed_others)} other tensor(s) changed, all "
            "skipped): there is no adapter to extract", code="LT544")
    from ..resize import most_common_rank
    default_alpha = most_common_rank(mods)
    adapter = Adapter(modules=mods, alpha=float(default_alpha), replacements=replacements,
                      provenance=_provenance(labels, rule, options))
    report = _report(labels, rule, options, rows, identical, changed_others, not_selected,
                     adapter)
    return ExtractResult(adapter, report, changed_others)


def _nbytes(info) -> int:
    from ...stfile import DTYPE_SIZES
    return math.prod(info.shape) * DTYPE_SIZES[info.dtype]


def _provenance(labels, rule, options) -> str:
    from ... import __version__
    value = "" if rule.value is None else f" {rule.value}"
    args = f"--{rule.name.replace('_', '-')}{value}"
    if rule.max_rank is not None:
        args += f" --max-rank {rule.max_rank}"
    names = " ".join(os.path.basename(os.path.normpath(p)) for p in labels)
    return f"loratool {__version__} extract {names} {args}"


def _report(labels, rule, options, rows, identical, changed_others, not_selected,
            adapter) -> dict:
    norm2 = sum(r["norm"] ** 2 for r in rows)
    err2 = sum(r["error"] ** 2 for r in rows)
    return {
        "base": labels[0], "tuned": labels[1],
        "rule": {rule.name: (True if rule.value is None else rule.value),
                 **({"max_rank": rule.max_rank} if rule.max_rank is not None else {}),
                 "min_rank": rule.min_rank},
        "options": options,
        "modules": rows,
        "others": changed_others,
        "not_selected": not_selected,
        "summary": {
            "modules": len(rows),
            "identical_weights": identical,
            "others_changed": len(changed_others),
            "replaced": sum(r["action"] != "skipped" for r in changed_others),
            "skipped": sum(r["action"] == "skipped" for r in changed_others),
            "replacement_bytes": sum(r.value.numel() * r.value.element_size()
                                     for r in adapter.replacements.values()),
            "not_selected": len(not_selected),
            "ranks": {str(k): v for k, v in sorted(Counter(r["rank"] for r in rows).items())},
            "parameters": sum(m.info.parameters for m in adapter.modules.values()),
            "error_overall": math.sqrt(err2),
            "relative_error_overall": 0.0 if norm2 == 0 else math.sqrt(err2 / norm2),
            "relative_error_max": max((r["relative_error"] for r in rows), default=0.0),
            "retained_min": min((r["retained"] for r in rows), default=1.0),
            "methods": dict(Counter(r["method"] for r in rows)),
        },
    }


__all__ = ["extract", "ExtractResult", "TARGETS"]
