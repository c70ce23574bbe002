"""The rules of the loratool adapter format, applied to a header and to tensor data.

``check_header`` is the single implementation of the structural rules: ``validate`` reports
its findings, ``read_adapter_info``/``load_adapter`` raise the first error among them.
No torch here: validation must start fast and read bf16 as bit patterns.
"""

from __future__ import annotations

import json
import math
import re

from . import format as F
from .model import AdapterInfo, ModuleInfo, ReplacementInfo
from .rules import Finding
from .numerics import any_nonzero, nonfinite_count
from .stfile import Header, TensorHasher, iter_chunks, read_scalar


# loratool.alpha is spelled as a JSON number (what ``repr(float)`` writes); Python's float()
# alone would also take " 8", "1_0" or "infinity".
_DECIMAL_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _parse_alpha(text) -> float | None:
    if not isinstance(text, str) or not _DECIMAL_RE.fullmatch(text):
        return None
    value = float(text)
    if not math.isfinite(value) or value == 0.0:
        return None
    return value


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def check_header(header: Header) -> tuple[list[Finding], AdapterInfo | None]:
    """Apply every header-level rule; return the findings and, when no MUST rule broke, the info."""
    out: list[Finding] = []
    path = header.path

    def add(code, message, module=None):
        out.append(Finding(code, message, path, module))

    meta = header.metadata
    fmt = meta.get(F.KEY_FORMAT)
    if fmt != F.FORMAT_NAME:
        why = "is missing" if fmt is None else f"is {fmt!r}"
        add("LT101", f"metadata key {F.KEY_FORMAT} {why}, expected {F.FORMAT_NAME!r}: not a "
                     "loratool adapter (PEFT, kohya and loralib files are read by detection; "
                     "`loratool convert` writes this format)")
        return out, None
    version_text = meta.get(F.KEY_VERSION)
    try:
        F.check_version_supported(F.parse_version(version_text))
    except Exception as e:  # MetadataError with code LT102/LT103
        add(getattr(e, "code", "LT102"), str(getattr(e, "message", e)))
        return out, None

    scaling = meta.get(F.KEY_SCALING)
    if scaling not in F.SCALINGS:
        add("LT104", f"{F.KEY_SCALING} is {scaling!r}; expected one of {', '.join(F.SCALINGS)}")
    alpha = _parse_alpha(meta.get(F.KEY_ALPHA))
    if alpha is None:
        add("LT105", f"{F.KEY_ALPHA} is {meta.get(F.KEY_ALPHA)!r}; expected a finite non-zero "
                     "decimal number such as \"16.0\"")

    bad_names: set[str] = set()  # reported once as LT213, whichever place names them first
    targets = _json(meta.get(F.KEY_TARGETS, ""))
    if (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
            or len(set(targets)) != len(targets)):
        add("LT106", f"{F.KEY_TARGETS} must be a JSON list of distinct module names, got "
                     f"{_short(meta.get(F.KEY_TARGETS))}")
        targets = None
    else:
        for t in targets:
            if not F.MODULE_NAME_RE.match(t):
                bad_names.add(t)
                add("LT213", f"module name {t!r} in {F.KEY_TARGETS} is not dot-separated "
                             "segments of letters, digits, '_' and '-'", t)

    table = _json(meta.get(F.KEY_MODULES, ""))
    records: dict[str, dict] = {}
    if not isinstance(table, dict):
        add("LT107", f"{F.KEY_MODULES} must be a JSON object mapping module names to records, "
                     f"got {_short(meta.get(F.KEY_MODULES))}")
        table = None
    else:
        for name, rec in table.items():
            code, problem = _record_problem(rec)
            if problem:
                add(code, f"module record of {name!r}: {problem}", name)
            else:
                records[name] = rec

    for key in (F.KEY_BASE_HASH, F.KEY_TENSOR_HASH):
        if key in meta and not F.HASH_RE.match(meta[key]):
            add("LT109", f"{key} is {_short(meta[key])}; expected \"sha256:\" and 64 lowercase "
                         "hex digits")

    init = None
    if F.KEY_INIT in meta:
        try:
            init = F.parse_init(meta[F.KEY_INIT])
        except Exception as e:  # MetadataError LT115
            add("LT115", str(getattr(e, "message", e)))

    # Tensors, grouped by module.
    groups: dict[str, dict[str, object]] = {}
    replaced: dict[str, dict[str, object]] = {}  # base tensor -> replacement roles (1.1)
    version = F.parse_version(version_text)
    for name, info in header.tensors.items():
        split = F.split_tensor_name(name)
        if split is None:
            add("LT201", f"tensor {name!r} is not <module>.<role> with role one of "
                         f"{', '.join(F.ALL_ROLES)}")
            continue
        module, role = split
        if role in F.REPLACEMENT_ROLES:
            if version < (1, 1):
                add("LT216", f"tensor {name!r} is a replacement entry, which needs "
                             f"{F.KEY_VERSION} 1.1 or later (the file says {version_text})",
                    module)
            if not F.MODULE_NAME_RE.match(module) and module not in bad_names:
                bad_names.add(module)
                add("LT213", f"tensor {name!r}: base tensor name {module!r} is not "
                             "dot-separated segments of letters, digits, '_' and '-'", module)
            replaced.setdefault(module, {})[role] = info
            continue
        if not F.MODULE_NAME_RE.match(module) and module not in bad_names:
            bad_names.add(module)
            add("LT213", f"tensor {name!r}: module name {module!r} is not dot-separated "
                         "segments of letters, digits, '_' and '-'", module)
        # Still grouped, so that one bad name is one finding rather than a cascade of LT108.
        groups.setdefault(module, {})[role] = info

    if targets is not None and table is not None:
        named = {"target_modules": set(targets), "modules table": set(table),
                 "tensors": set(groups)}
        union = set().union(*named.values())
        for module in sorted(union):
            lacking = [where for where, names in named.items() if module not in names]
            if lacking:
                add("LT108", f"module {module!r} is missing from the {' and the '.join(lacking)}",
                    module)

    infos: dict[str, ModuleInfo] = {}
    for module in sorted(groups):
        rec = records.get(module)
        raw = (table or {}).get(module)
        if rec is None and isinstance(raw, dict) and raw.get("kind") in F.LYCORIS_KINDS:
            continue  # its broken record is reported (LT218); its roles are not lora_A/B
        if rec is not None and rec["kind"] in F.LYCORIS_KINDS:
            info = _check_lycoris(header, module, groups[module], rec, version, version_text,
                                  add)
        else:
            info = _check_module(module, groups[module], rec, alpha, scaling, add)
        if info is not None:
            infos[module] = info

    replacements = {}
    for target in sorted(replaced):
        rinfo = _check_replacement(target, replaced[target], set(groups), add)
        if rinfo is not None:
            replacements[target] = rinfo
    if not groups and not replaced and not any(f.is_error for f in out):
        add("LT108", "the file has no module and no replacement entry: it changes nothing")

    if any(f.is_error for f in out):
        return out, None
    extra = {k: v for k, v in meta.items() if not k.startswith(F.NAMESPACE)}
    return out, AdapterInfo(
        path=path, format_version=version_text, modules=infos, alpha=alpha,
        base_model=meta.get(F.KEY_BASE_MODEL), base_model_hash=meta.get(F.KEY_BASE_HASH),
        provenance=meta.get(F.KEY_PROVENANCE), extra_metadata=extra,
        tensor_hash=meta.get(F.KEY_TENSOR_HASH), init=init,
        tensor_bytes=sum(t.nbytes for t in header.tensors.values()),
        replacements=replacements)


def _check_replacement(target, roles, modules, add) -> ReplacementInfo | None:
    """LT214 (the entry's tensors fit together) and LT203 (float values) of one replacement."""
    def err(code, message):
        add(code, f"replacement of {target!r}: {message}", target)

    full, rows, index = (roles.get(r) for r in F.REPLACEMENT_ROLES)
    if target in modules:
        err("LT214", f"{target!r} is also a module name; a replacement names a base tensor "
                     "(e.g. `score.weight`), a module its `.weight`'s owner")
        return None
    if full is not None and (rows is not None or index is not None):
        err("LT214", f"has both {F.ROLE_REPLACE} and {F.ROLE_REPLACE_ROWS}/"
                     f"{F.ROLE_REPLACE_INDEX}; a tensor is replaced whole or by rows")
        return None
    values = full if full is not None else rows
    if full is None and (rows is None or index is None):
        missing = F.ROLE_REPLACE_ROWS if rows is None else F.ROLE_REPLACE_INDEX
        err("LT214", f"has no {missing}; {F.ROLE_REPLACE_ROWS} and {F.ROLE_REPLACE_INDEX} "
                     "come together")
        return None
    bad = False
    if values.dtype not in F.ADAPTER_DTYPES:
        err("LT203", f"values have dtype {values.dtype}; they must be one of "
                     f"{', '.join(F.ADAPTER_DTYPES)}")
        bad = True
    if index is not None:
        if index.dtype != "I64" or len(index.shape) != 1:
            err("LT214", f"{F.ROLE_REPLACE_INDEX} is {index.dtype} {list(index.shape)}; "
                         "expected I64 [rows]")
            return None
        if len(rows.shape) < 1 or rows.shape[0] != index.shape[0]:
            err("LT214", f"{F.ROLE_REPLACE_ROWS} {list(rows.shape)} does not have one row "
                         f"per index ({index.shape[0]})")
            return None
    if bad:
        return None
    return ReplacementInfo(target, tuple(values.shape), values.dtype,
                           None if index is None else index.shape[0])


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite_nonzero(x: int | float) -> bool:
    try:
        x = float(x)  # a JSON integer of 400 digits does not fit a float64
    except OverflowError:
        return False
    return math.isfinite(x) and x != 0.0


def _record_problem(rec) -> tuple[str, str | None]:
    """(code, problem) of one module record; problem is None when the record is sound."""
    if not isinstance(rec, dict):
        return "LT107", "not a JSON object"
    kind, layout = rec.get("kind"), rec.get("layout")
    if kind not in F.ALL_KINDS:
        return "LT107", f"kind is {kind!r}; expected one of {', '.join(F.ALL_KINDS)}"
    if kind in F.LYCORIS_KINDS:
        from .lycoris.native import record_problem
        return "LT218", record_problem(rec)
    if layout not in F.LAYOUTS:
        return "LT107", f"layout is {layout!r}; expected one of {', '.join(F.LAYOUTS)}"
    if "alpha" in rec:
        a = rec["alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not _finite_nonzero(a):
            return "LT105", f"alpha is {_short(a)}; expected a finite non-zero JSON number"
    return "LT107", None


def _check_module(module, roles, rec, default_alpha, scaling, add) -> ModuleInfo | None:
    _count = [0]

    def err(code, message):
        _count[0] += 1
        add(code, f"module {module!r}: {message}", module)

    foreign = sorted(set(roles) - set(F.ROLES))
    if foreign and rec is not None:
        err("LT219", f"kind {rec['kind']} has no role(s) {', '.join(foreign)} (LyCORIS roles "
                     f"belong to the kinds {', '.join(F.LYCORIS_KINDS)})")
        return None
    A, B = roles.get(F.ROLE_A), roles.get(F.ROLE_B)
    if A is None or B is None:
        missing = " and ".join(r for r in (F.ROLE_A, F.ROLE_B) if roles.get(r) is None)
        err("LT202", f"has no {missing} tensor; every module needs both {F.ROLE_A} "
                     f"[rank, in, ...] and {F.ROLE_B} [out, rank, ...]")
        return None
    for role, t in roles.items():
        if t.dtype not in F.ADAPTER_DTYPES:
            err("LT203", f"{role} has dtype {t.dtype}; adapter tensors must be one of "
                         f"{', '.join(F.ADAPTER_DTYPES)}")
    if len({t.dtype for t in roles.values()}) > 1:
        add("LT211", f"module {module!r}: tensors mix dtypes "
                     f"({', '.join(f'{r}={t.dtype}' for r, t in sorted(roles.items()))})", module)
    if rec is None:
        return None  # reported as LT107/LT108 already
    kind, layout = rec["kind"], rec["layout"]
    a, b = A.shape, B.shape
    if kind == F.KIND_CONV:
        ok = 3 <= len(a) <= 5 and len(b) == len(a)
        want = "A [rank, in, *kernel] and B [out, rank, 1, ...] with 1 to 3 spatial dimensions"
    else:
        ok = len(a) == 2 and len(b) == 2
        want = "2-D A [rank, in] and B [out, rank]"
    if not ok:
        err("LT204", f"{kind} needs {want}; got {F.ROLE_A} {list(a)} and {F.ROLE_B} {list(b)}")
        return None
    if a[0] != b[1]:
        err("LT205", f"{F.ROLE_A} {list(a)} has rank {a[0]} but {F.ROLE_B} {list(b)} has rank "
                     f"{b[1]}; re-export the adapter or truncate both to the same rank")
    elif a[0] < 1:
        err("LT206", f"rank is {a[0]}; a module needs rank 1 or more")
    if any(d == 0 for d in (*a[1:], b[0])):
        err("LT204", f"has an empty dimension ({F.ROLE_A} {list(a)}, {F.ROLE_B} {list(b)})")
    if kind == F.KIND_CONV and any(d != 1 for d in b[2:]):
        err("LT207", f"conv {F.ROLE_B} {list(b)} must be 1 in every spatial dimension "
                     f"(shape [out, rank{', 1' * (len(b) - 2)}])")
    if kind == F.KIND_CONV and layout != F.LAYOUT_OUT_IN:
        err("LT207", f"conv modules use layout {F.LAYOUT_OUT_IN}, not {layout}")
    if kind == F.KIND_EMBEDDING and layout != F.LAYOUT_IN_OUT:
        err("LT207", f"embedding modules use layout {F.LAYOUT_IN_OUT} (weight [num, dim]), not "
                     f"{layout}")
    for role in (F.ROLE_MAGNITUDE, F.ROLE_BIAS):
        t = roles.get(role)
        if t is not None and t.shape != (b[0],):
            err("LT208", f"{role} has shape {list(t.shape)}; expected [{b[0]}] (out)")
    if _count[0]:
        return None
    out_f, in_f = b[0], math.prod(a[1:])
    if a[0] > min(out_f, in_f):
        add("LT212", f"module {module!r}: rank {a[0]} exceeds min(out, in) = "
                     f"{min(out_f, in_f)}; `loratool resize` can drop the surplus exactly",
            module)
    alpha = rec.get("alpha", default_alpha)
    if alpha is None or scaling not in F.SCALINGS:
        return None
    return ModuleInfo(module, kind, layout, tuple(a), tuple(b), float(alpha), scaling,
                      A.dtype, F.ROLE_MAGNITUDE in roles, F.ROLE_BIAS in roles)


def _check_lycoris(header, module, roles, rec, version, version_text, add):
    """A LyCORIS-kind module (format 1.2): the version (LT217), then its own rules."""
    if version < (1, 2):
        add("LT217", f"module {module!r} has the LyCORIS kind {rec['kind']}, which needs "
                     f"{F.KEY_VERSION} 1.2 or later (the file says {version_text})", module)
        return None
    from .lycoris.native import check_module

    return check_module(module, roles, rec, lambda: read_scalar(header, roles["alpha"]), add)


def _index_problem(header, info, f) -> str | None:
    """Why a replace_index tensor's values are not distinct non-negative rows (or None)."""
    import numpy as np
    parts = list(iter_chunks(header, info, f, 1 << 24))
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype="<i8")
    if (idx < 0).any():
        return f"{F.ROLE_REPLACE_INDEX} holds a negative row ({int(idx.min())})"
    if np.unique(idx).size != idx.size:
        return f"{F.ROLE_REPLACE_INDEX} names a row twice"
    return None


def check_data(header: Header, *, tensor_hash: str | None, chunk: int = 1 << 24
               ) -> list[Finding]:
    """Data rules: NaN/Inf (LT209), all-zero B (LT210), integrity hash (LT110/LT111)."""
    out: list[Finding] = []
    hasher = TensorHasher()
    with open(header.path, "rb") as f:
        for name in sorted(header.tensors):
            info = header.tensors[name]
            hasher.begin(name, info.dtype, info.shape, info.nbytes)
            bad = 0
            nonzero = False
            for part in iter_chunks(header, info, f, chunk):
                hasher.update(part)
                bad += nonfinite_count(part, info.dtype)
                if not nonzero:
                    nonzero = any_nonzero(part)  # +0.0 and -0.0 are both zero
            split = F.split_tensor_name(name)
            module = split[0] if split else None
            if split and split[1] == F.ROLE_REPLACE_INDEX and info.dtype == "I64":
                why = _index_problem(header, info, f)
                if why:
                    out.append(Finding("LT215", f"replacement of {module!r}: {why}",
                                       header.path, module))
            if bad:
                out.append(Finding("LT209", f"tensor {name!r} holds {bad} NaN/Inf value(s) of "
                                            f"{info.numel}", header.path, module))
            if split and split[1] == F.ROLE_B and not nonzero and info.numel:
                out.append(Finding("LT210", f"module {module!r}: {F.ROLE_B} is all zeros, so the "
                                            "module changes nothing (an untrained adapter?)",
                                   header.path, module))
    actual = hasher.hexdigest()
    if tensor_hash is None:
        out.append(Finding("LT111", f"no {F.KEY_TENSOR_HASH}; rewrite the file with loratool "
                                    f"to add it ({actual})", header.path))
    elif F.HASH_RE.match(tensor_hash) and tensor_hash != actual:
        out.append(Finding("LT110", f"{F.KEY_TENSOR_HASH} is {tensor_hash} but the tensor data "
                                    f"hashes to {actual}: the file was altered or corrupted",
                           header.path))
    return out
