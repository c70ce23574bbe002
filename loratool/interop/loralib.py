"""microsoft/LoRA (``loralib``) checkpoints: ``torch.save``d state dicts with ``<m>.lora_A`` and
``<m>.lora_B`` (no ``.weight``), loaded with torch's weights-only unpickler only.

The files store neither alpha, nor MergedLinear's ``enable_lora`` mask, nor the weight layout,
nor whether a module is a ``Conv2d``: the user gives ``alpha`` (``--alpha``), ``enable_lora``
(``--enable-lora 1,0,1``), ``fan_in_fan_out`` (``--fan-in-fan-out``) and ``base`` (``--base``,
from which layouts, embeddings and conv modules are recognized).

Mapping to the canonical model (spec/interop.md, "loralib"), with loralib's scale alpha / r:
  Linear       A [r, in], B [out, r]                           -> the same, rank r
  Embedding    A [r, num], B [dim, r]                          -> embedding (in_out), rank r
  MergedLinear A [r*n_en, in], B [out/n*n_en, r] (n groups,   -> block-structured B [out, r*n_en]
               n_en of them enabled)                              with alpha_c = alpha * n_en
  Conv2d (kxk) A [r*k, in*k], B [out*k, r*k],                 -> conv of rank r*k*k:
               delta = (B @ A).view(out, in, k, k)                B' = B.reshape(out, k*r*k),
                                                                  A' = blockdiag(A x k), alpha*k*k
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InteropError
from ..format import (KIND_CONV, KIND_EMBEDDING, KIND_LINEAR, LAYOUT_IN_OUT, LAYOUT_OUT_IN,
                      SCALING_STANDARD)
from ..model import Adapter, AdapterInfo, LoraModule
from . import _common as C
from ..variants import Lora
from .base import (FALLBACK, Capabilities, LoadResult, ModuleRecord, Probe, ReaderOptions,
                   parse_enable_lora)  # noqa: F401 (public here too)

NAME = "loralib"
CAPABILITIES = Capabilities(
    kinds=frozenset({KIND_LINEAR, KIND_CONV, KIND_EMBEDDING}), variants=frozenset({Lora.name}),
    per_module_alpha=False,
    reads=frozenset({"alpha", "enable_lora", "fan_in_fan_out", "base", "name_map"}),
    writes=frozenset({"alpha", "enable_lora"}))

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"
# Last path segments that name an embedding table (used only when the base says the weight is
# stored [in, out]: a loralib Embedding and a fan_in_fan_out Linear look alike otherwise).
EMBEDDING_NAMES = frozenset({"wte", "wpe", "embed_tokens", "word_embeddings",
                             "position_embeddings", "token_type_embeddings", "embeddings",
                             "embedding", "embed", "tok_embeddings", "embed_positions",
                             "shared"})
MERGED, CONV2D = "merged", "conv2d"


def detect(probe: Probe) -> int:
    # A weights-only pickle that neither PEFT nor kohya claims: loralib names are the
    # generic ``.lora_A``/``.lora_B`` (without ``.weight``).
    return FALLBACK if probe.is_pickle else 0


@dataclass
class _Record(ModuleRecord):
    loralib: str = "linear"  # the loralib layer class: linear, merged, conv2d, conv, embedding
    r: int = 0               # loralib's r (a MergedLinear's per-group rank)


class _Plan:
    def __init__(self, path: str, options: ReaderOptions, strict: bool):
        self.path = path
        self.source = C.TensorSource(path)
        self.notes: list[str] = []
        self.details: dict = {}
        self.unknown: list[str] = []
        self.alpha = C.get_alpha(options, fmt="loralib", strict=strict, why=(
            "loralib checkpoints do not store lora_alpha"))
        if self.alpha is None:
            self.details["alpha"] = "not stored in loralib files (pass --alpha); shown as rank"
        mask = options.enable_lora
        groups: dict[str, dict] = {}
        for name in self.source.entries:
            if name.endswith(A_SUFFIX):
                groups.setdefault(name[: -len(A_SUFFIX)], {})["A"] = name
            elif name.endswith(B_SUFFIX):
                groups.setdefault(name[: -len(B_SUFFIX)], {})["B"] = name
            else:
                self.unknown.append(name)
        shapes = C.base_shapes(options)
        base_of = C.resolve_base(groups, options, suffixes=(".weight", ".conv.weight")) \
            if shapes is not None else {}
        fif = options.fan_in_fan_out
        self.modules: dict[str, _Record] = {}
        pending: list[str] = []
        for module in sorted(groups):
            t = groups[module]
            if "A" not in t or "B" not in t:
                missing = "lora_A" if "A" not in t else "lora_B"
                raise InteropError(f"loralib module {module!r} has no {missing} tensor",
                                   code="LT305", path=path, module=module)
            C.check_module_name(module, path, "loralib")
            dtype, a = self.source.entries[t["A"]]
            b_dtype, b = self.source.entries[t["B"]]
            if len(a) != 2 or len(b) != 2:
                raise InteropError(f"loralib module {module!r}: lora_A {list(a)} and lora_B "
                                   f"{list(b)} are not 2-D as loralib writes them",
                                   code="LT305", path=path, module=module)
            C.check_factors(module, {"lora_A": dtype, "lora_B": b_dtype}, a, b, path)
            base_shape = shapes.get(base_of[module]) if module in base_of else None
            if mask is None and a[0] != b[1] and not strict:
                pending.append(module)  # a MergedLinear: described once the mask is known
                continue
            rec = self._classify(module, a, b, mask, base_shape, fif)
            rec.tensors, rec.dtype = t, dtype
            self.modules[module] = rec
        kinds = sorted({r.loralib for r in self.modules.values()})
        self.details["loralib_layers"] = ", ".join(kinds) or "-"
        if pending:
            self.details["merged_linear"] = (f"{', '.join(pending)}: not described; pass "
                                             "--enable-lora (enable_lora=[...]) to read them")
        if mask is not None:
            self.details["enable_lora"] = ",".join("1" if m else "0" for m in mask)

    def _classify(self, module, a, b, mask, base_shape, fif) -> _Record:
        """Which loralib layer a module is, and its canonical shapes and alpha."""
        path = self.path
        ra, in_ = a
        out_b, rb = b
        alpha = self.alpha
        default_layout = LAYOUT_IN_OUT if fif else LAYOUT_OUT_IN

        def rec(loralib, kind, layout, a_shape, b_shape, factor, rank):
            al = (alpha if alpha is not None else float(rank)) * factor
            return _Record(module, kind=kind, layout=layout, a_shape=a_shape, b_shape=b_shape,
                           alpha=al, loralib=loralib, r=rank)

        if ra != rb or (mask is not None and base_shape is not None and sum(mask) == 1
                        and len(base_shape) == 2 and out_b * len(mask) in base_shape
                        and out_b not in base_shape):
            if mask is None:
                raise InteropError(
                    f"loralib module {module!r}: lora_A has {ra} rows but lora_B has {rb} "
                    "columns, so it is a MergedLinear; pass its enable_lora mask: --enable-lora "
                    "1,0,1 (enable_lora=[True, False, True])", code="LT304", path=path,
                    module=module)
            n, n_en = len(mask), sum(mask)
            if ra != rb * n_en or out_b % n_en:
                raise InteropError(
                    f"loralib module {module!r}: lora_A {list(a)} and lora_B {list(b)} do not "
                    f"fit a MergedLinear with enable_lora {mask} ({n_en} enabled group(s): "
                    f"lora_A [r*{n_en}, in], lora_B [out/{n}*{n_en}, r])", code="LT305",
                    path=path, module=module)
            out = out_b // n_en * n
            layout = (C.layout_for(module, out, in_, base_shape, default_layout, path)
                      if base_shape is not None else default_layout)
            return rec(MERGED, KIND_LINEAR, layout, (ra, in_), (out, ra), n_en, rb)
        if base_shape is not None and len(base_shape) == 4:
            out, cin, k, k2 = base_shape
            if k != k2 or ra % k or in_ != cin * k or out_b != out * k:
                raise InteropError(
                    f"loralib module {module!r}: the base weight {list(base_shape)} is a conv, "
                    f"but lora_A {list(a)} / lora_B {list(b)} are not loralib Conv2d factors "
                    f"(lora_A [r*k, in*k], lora_B [out*k, r*k] with a square kernel k; "
                    "groups > 1 is not supported)", code="LT305", path=path, module=module)
            rank = ra * k
            return rec(CONV2D, KIND_CONV, LAYOUT_OUT_IN, (rank, cin, k, k), (out, rank, 1, 1),
                       k * k, ra // k)
        if base_shape is not None and len(base_shape) in (3, 5):
            kernel = base_shape[2:]
            if any(d != 1 for d in kernel) or base_shape[:2] != (out_b, in_):
                raise InteropError(
                    f"loralib module {module!r}: base weight {list(base_shape)}; loralib's "
                    "Conv1d/Conv3d only work with kernel size 1", code="LT305", path=path,
                    module=module)
            return rec("conv", KIND_CONV, LAYOUT_OUT_IN, (ra, in_, *kernel),
                       (out_b, ra, *kernel), 1, ra)
        if (base_shape is not None and tuple(base_shape) == (in_, out_b) and not fif
                and module.rsplit(".", 1)[-1] in EMBEDDING_NAMES):
            return rec("embedding", KIND_EMBEDDING, LAYOUT_IN_OUT, (ra, in_), (out_b, ra), 1, ra)
        layout = C.layout_for(module, out_b, in_, base_shape, default_layout, path)
        return rec("linear", KIND_LINEAR, layout, (ra, in_), (out_b, ra), 1, ra)

    def check_unknown(self, options) -> list[str]:
        return C.check_unknown(self.unknown, options, path=self.path, fmt="loralib", hint=(
            "(A full model state dict or trained biases saved with lora_state_dict(bias=...) "
            "hold full weights, not LoRA factors.)"))

    @property
    def default_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return float(C.most_common(r.r for r in self.modules.values()) or 1)


def read_info(path: str, options: ReaderOptions) -> AdapterInfo:
    plan = _Plan(path, options, strict=False)
    details = dict(plan.details)
    if plan.unknown:
        details["unknown_tensors"] = ", ".join(sorted(plan.unknown)[:50])
    modules = {n: r.info() for n, r in sorted(plan.modules.items())}
    return AdapterInfo(path=path, format_version=None, modules=modules,
                       alpha=plan.default_alpha, source_format="loralib",
                       tensor_bytes=plan.source.tensor_bytes, details=details)


def _to_canonical(r: _Record, mask, A, B):
    """loralib factors -> canonical (A, B) of the shapes in ``r``."""
    import torch
    if r.loralib == MERGED:
        out, rank = r.b_shape
        n = len(mask)
        gs = out // n
        Bc = torch.zeros(out, rank, dtype=B.dtype)
        enabled = [g for g in range(n) if mask[g]]
        for e, g in enumerate(enabled):
            Bc[g * gs:(g + 1) * gs, e * r.r:(e + 1) * r.r] = B[e * gs:(e + 1) * gs]
        return A.clone(), Bc
    if r.loralib == CONV2D:
        rank, cin, k, _ = r.a_shape
        out = r.b_shape[0]
        Ac = torch.block_diag(*([A] * k))  # [k * r*k, k * in*k]
        return Ac.reshape(rank, cin, k, k), B.reshape(out, rank, 1, 1)
    return A.reshape(r.a_shape).clone(), B.reshape(r.b_shape).clone()


def load_report(path: str, options: ReaderOptions) -> LoadResult:
    plan = _Plan(path, options, strict=True)
    notes = list(plan.notes) + plan.check_unknown(options)
    modules = {}
    for name, r in sorted(plan.modules.items()):
        t = C.read_tensors(plan, r, path, options)
        Ac, Bc = _to_canonical(r, options.enable_lora, t["A"], t["B"])
        modules[name] = LoraModule(name, r.kind, r.layout, Ac, Bc, r.alpha, SCALING_STANDARD)
    counts = {}
    for r in plan.modules.values():
        counts[r.loralib] = counts.get(r.loralib, 0) + 1
    if counts.get(MERGED):
        notes.append(f"{counts[MERGED]} MergedLinear module(s) stored as block-structured "
                     "factors of rank r x enabled groups (alpha scaled to keep alpha / r)")
    if counts.get(CONV2D):
        notes.append(f"{counts[CONV2D]} Conv2d module(s) rewritten from loralib's "
                     "[out*k, r*k] @ [r*k, in*k] factorization to conv factors of rank r*k*k")
    adapter = Adapter(modules=modules, alpha=plan.default_alpha, source_format="loralib")
    return LoadResult(adapter, notes, sorted(plan.unknown) if options.allow_unknown else [])


def load(path: str, options: ReaderOptions) -> Adapter:
    return load_report(path, options).adapter


def validate(path: str, options: ReaderOptions, *, data: bool = True):
    """Valid when it reads into the canonical model; with ``data``, NaN/Inf and zero B."""
    # strict as load is: what merge/convert refuse (alpha unknown: LT304) is not valid
    plan = _Plan(path, options, strict=True)
    plan.check_unknown(options)  # what load refuses (LT303), validate refuses too
    return C.scan_plan(plan) if data else []


# --- writing -------------------------------------------------------------------------------

def _merged_blocks(m, mask):
    """(lora_A, lora_B, r) of a MergedLinear when B has exactly the block structure of
    ``mask``, else None."""
    import torch
    out, rank = m.B.shape
    n, n_en = len(mask), sum(mask)
    if out % n or rank % n_en:
        return None
    gs, r = out // n, rank // n_en
    blocks = []
    expected = torch.zeros_like(m.B)
    e = 0
    for g in range(n):
        if mask[g]:
            blk = m.B[g * gs:(g + 1) * gs, e * r:(e + 1) * r]
            expected[g * gs:(g + 1) * gs, e * r:(e + 1) * r] = blk
            blocks.append(blk)
            e += 1
    if not torch.equal(expected, m.B):
        return None
    return m.A.clone(), torch.cat(blocks, 0), r


def _merged_dense(m, mask):
    """A dense module whose disabled groups' rows of B are zero, as a MergedLinear of rank R
    (A repeated per enabled group), else None."""
    import torch
    out, rank = m.B.shape
    n = len(mask)
    if out % n or all(mask):
        return None
    gs = out // n
    rows = [m.B[g * gs:(g + 1) * gs] for g in range(n)]
    if any(bool(rows[g].any()) for g in range(n) if not mask[g]):
        return None
    return (torch.cat([m.A] * sum(mask), 0),
            torch.cat([rows[g] for g in range(n) if mask[g]], 0), rank)


def _conv2d(m):
    """(lora_A [r*k, in*k], lora_B [out*k, r*k], r) for a canonical square-kernel conv."""
    import torch
    rank, cin, k, k2 = m.A.shape
    out = m.B.shape[0]
    A2 = m.A.reshape(rank, cin * k * k)
    if rank % k == 0 and (rank // k) % k == 0:
        rk = rank // k
        A0 = A2[:rk, :cin * k]
        if torch.equal(torch.block_diag(*([A0] * k)), A2):  # read from loralib: exact inverse
            return A0.clone(), m.B.reshape(out * k, rk).clone(), rk // k, True
    B2 = m.B.reshape(out, rank)
    eye = torch.eye(k, dtype=B2.dtype)
    return (A2.reshape(rank * k, cin * k).clone(), torch.kron(B2, eye), rank, False)


def save(adapter: Adapter, path: str, options: ReaderOptions) -> list[str]:
    """``torch.save`` a loralib state dict (``<m>.lora_A``/``<m>.lora_B``).

    loralib scales by lora_alpha / r with r read from each layer; the file cannot say either.
    With ``alpha`` every module's scale is folded into lora_B for that lora_alpha; without it
    all modules must already share one lora_alpha, which the notes report.
    """
    C.refuse_replacements(adapter, "loralib")
    import torch

    from ..atomic import AtomicFile
    path = os.fspath(path)
    mask = options.enable_lora
    target_alpha = C.get_alpha(options, fmt="loralib", strict=False, why="")
    notes: list[str] = []
    state = {}
    plan = []  # (name, lora_A, lora_B, loralib r, module)
    kinds: dict[str, int] = {}
    for name, m in adapter.modules.items():
        if m.variant.name not in CAPABILITIES.variants:
            raise InteropError(f"module {name!r} has {m.variant.described}; loralib has only "
                               "plain LoRA modules (no DoRA)",
                               code="LT306", module=name)
        if m.bias is not None:
            raise InteropError(f"module {name!r} has a lora_bias; loralib has none",
                               code="LT306", module=name)
        if m.kind == KIND_CONV:
            kernel = tuple(m.A.shape[2:])
            if all(d == 1 for d in kernel):
                A, B, r, kind = m.A.reshape(m.rank, -1), m.B.reshape(-1, m.rank), m.rank, "conv"
            elif len(kernel) == 2 and kernel[0] == kernel[1]:
                A, B, r, compact = _conv2d(m)
                kind = "Conv2d" if compact else "Conv2d (rank x k)"
            else:
                raise InteropError(f"module {name!r} is a conv with kernel {list(kernel)}; "
                                   "loralib only handles square 2-D kernels (its Conv1d/Conv3d "
                                   "work with kernel size 1 only)", code="LT306", module=name)
        elif m.kind == KIND_LINEAR and mask is not None and (
                blocks := (_merged_blocks(m, mask) or _merged_dense(m, mask))) is not None:
            A, B, r = blocks
            kind = "MergedLinear"
        else:
            A, B, r = m.A, m.B, m.rank
            kind = {KIND_EMBEDDING: "Embedding"}.get(m.kind, "Linear")
            if m.kind == KIND_LINEAR and m.layout == LAYOUT_IN_OUT:
                kind = "Linear (fan_in_fan_out=True)"
        kinds[kind] = kinds.get(kind, 0) + 1
        plan.append((name, A, B, r, m))
    needed = {name: m.scale * r for name, _, _, r, m in plan}
    if target_alpha is None:
        distinct = sorted(set(needed.values()))
        if len(distinct) > 1:
            shown = ", ".join(f"{n}: {a:g}" for n, a in list(needed.items())[:6])
            raise InteropError(
                "loralib files do not store alpha and these modules need different lora_alpha "
                f"values to keep their scale ({shown}); pass --alpha A (alpha=A) to fold every "
                "scale into lora_B for one lora_alpha", code="LT304")
        target_alpha = distinct[0] if distinct else float(adapter.alpha)
        notes.append(f"build the loralib model with lora_alpha={target_alpha:g} (not stored in "
                     "the file)")
    else:
        folded = [n for n, a in needed.items() if a != target_alpha]
        if folded:
            notes.append(f"folded the scale of {len(folded)} module(s) into lora_B for "
                         f"lora_alpha={target_alpha:g}")
    ranks = sorted({r for _, _, _, r, _ in plan})
    notes.append("loralib layers: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
                 + f"; r = {', '.join(map(str, ranks))}")
    for name, A, B, r, m in plan:
        ratio = m.scale / (target_alpha / r)
        if ratio != 1.0:
            B = (B.to(torch.float64) * ratio).to(B.dtype)
        state[name + A_SUFFIX] = A.detach().contiguous().clone()
        state[name + B_SUFFIX] = B.detach().contiguous().clone()
    with AtomicFile(path, overwrite=options.overwrite) as f:
        torch.save(dict(sorted(state.items())), f)
    if adapter.init:
        notes.append(f"init {adapter.init['method']} not recorded (loralib files have no place "
                     "for it): the adapter still applies only to the residual model made at "
                     "initialisation; merge it into that model")
    return notes
