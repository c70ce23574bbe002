#!/usr/bin/env python3
"""Generate the conformance vectors of loratool adapter format 1.2 (spec/adapter-format.md).

    python spec/vectors/generate.py [OUTDIR]      # default: the folder of this script

Writes, under OUTDIR:

  valid/<name>.safetensors     + valid/<name>.inspect.json    (expected `inspect --json`,
                                                              without its `path` field)
  warn/<name>.safetensors      + warn/<name>.expected.json    (breaks one SHOULD rule: a
                                                              warning, the file is valid)
  invalid/<name>.safetensors   + invalid/<name>.expected.json (breaks exactly one MUST rule)
  index.json                                                  (every vector, one line each)

The script uses the Python standard library only and does not import loratool: the bytes
follow from the spec, so a vector is a check on the implementation rather than a copy of it.
No randomness: tensor values come from a fixed integer formula, and every value is a
multiple of 1/8 below 1 in magnitude, exact in F16, BF16, F32 and F64. Running the script
twice gives identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys

FORMAT = "loratool.adapter"
VERSION = "1.0"
VERSION_REPLACEMENTS = "1.1"  # the version a file with replacement entries declares
VERSION_LYCORIS = "1.2"  # the version a file with a LyCORIS kind declares
DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}
ROLES = ("lora_A", "lora_B", "lora_magnitude", "lora_bias")

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


# --- tensors -------------------------------------------------------------------------------

def _values(n: int, seed: int) -> list[float]:
    # Multiples of 1/8 in [-7/8, 7/8]: exact in every float dtype, never all zero for n >= 2.
    return [((i * 7 + seed * 5 + 3) % 15 - 7) / 8 for i in range(n)]


def encode(values: list[float], dtype: str) -> bytes:
    n = len(values)
    if dtype == "F32":
        return struct.pack(f"<{n}f", *values)
    if dtype == "F64":
        return struct.pack(f"<{n}d", *values)
    if dtype == "F16":
        return struct.pack(f"<{n}e", *values)
    if dtype == "BF16":
        # The upper half of the float32 bits; exact because the values need 3 mantissa bits.
        bits = struct.unpack(f"<{n}I", struct.pack(f"<{n}f", *values))
        return struct.pack(f"<{n}H", *(b >> 16 for b in bits))
    if dtype == "I32":
        return struct.pack(f"<{n}i", *(int(v * 8) for v in values))
    raise ValueError(dtype)


def encode_i64(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


class T:
    """One tensor: name, dtype, shape and its little-endian bytes."""

    def __init__(self, name: str, dtype: str, shape, data: bytes | None = None, seed: int = 0):
        self.name, self.dtype, self.shape = name, dtype, list(shape)
        self.data = data if data is not None else encode(_values(math.prod(shape), seed), dtype)


def tensor_hash(tensors) -> str:
    """The integrity hash, byte for byte as spec section "Integrity hash" states it."""
    h = hashlib.sha256()
    for t in sorted(tensors, key=lambda t: t.name.encode("utf-8")):
        h.update(t.name.encode("utf-8") + b"\0" + t.dtype.encode("ascii") + b"\0")
        h.update(json.dumps(t.shape, separators=(",", ":")).encode("ascii") + b"\0")
        h.update(struct.pack("<Q", len(t.data)))
        h.update(t.data)
    return "sha256:" + h.hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


# --- containers ----------------------------------------------------------------------------

def raw_file(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length (``length`` may lie), header bytes, data bytes."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def container(tensors, metadata, *, canonical: bool = True) -> bytes:
    """A safetensors file. Canonical: data in name order, sorted compact ASCII JSON, header
    padded with spaces to a multiple of 8. Otherwise: data in reverse name order, JSON with
    spaces and unsorted keys, no padding (still a valid safetensors file)."""
    order = sorted(tensors, key=lambda t: t.name.encode("utf-8"))
    if not canonical:
        order.reverse()
    obj, cursor, data = {}, 0, b""
    for t in order:
        obj[t.name] = {"dtype": t.dtype, "shape": t.shape,
                       "data_offsets": [cursor, cursor + len(t.data)]}
        cursor += len(t.data)
        data += t.data
    if metadata is not None:
        obj["__metadata__"] = metadata
    if canonical:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        header = text.encode("ascii")
        header += b" " * (-len(header) % 8)
    else:
        text = json.dumps(dict(reversed(list(obj.items()))), indent=1, ensure_ascii=False)
        header = text.encode("utf-8")
    return raw_file(header, data)


# --- adapters ------------------------------------------------------------------------------

class M:
    """One module of a vector adapter."""

    def __init__(self, name, kind, layout, a_shape, b_shape, *, dtype="F32", b_dtype=None,
                 alpha=None, magnitude=False, bias=False, seed=0):
        self.name, self.kind, self.layout = name, kind, layout
        self.a_shape, self.b_shape = list(a_shape), list(b_shape)
        self.dtype, self.b_dtype = dtype, b_dtype or dtype
        self.alpha, self.magnitude, self.bias, self.seed = alpha, magnitude, bias, seed

    def tensors(self) -> list[T]:
        out = [T(f"{self.name}.lora_A", self.dtype, self.a_shape, seed=self.seed),
               T(f"{self.name}.lora_B", self.b_dtype, self.b_shape, seed=self.seed + 1)]
        if self.magnitude:
            # DoRA magnitudes are norms: positive.
            vals = [1 + abs(v) for v in _values(self.b_shape[0], self.seed + 2)]
            out.append(T(f"{self.name}.lora_magnitude", self.dtype, [self.b_shape[0]],
                         encode(vals, self.dtype)))
        if self.bias:
            out.append(T(f"{self.name}.lora_bias", self.dtype, [self.b_shape[0]],
                         seed=self.seed + 3))
        return out


class R:
    """One replacement entry (format 1.1): base tensor ``target`` replaced whole, or the rows
    ``index`` of it."""

    def __init__(self, target, shape, *, index=None, dtype="F32", seed=0):
        self.target, self.shape, self.index = target, list(shape), index
        self.dtype, self.seed = dtype, seed

    def tensors(self) -> list[T]:
        if self.index is None:
            return [T(f"{self.target}.replace", self.dtype, self.shape, seed=self.seed)]
        return [T(f"{self.target}.replace_rows", self.dtype, self.shape, seed=self.seed),
                T(f"{self.target}.replace_index", "I64", [len(self.index)],
                  encode_i64(self.index))]

    def inspect(self) -> dict:
        row = {"target": self.target, "kind": "full" if self.index is None else "rows",
               "shape": self.shape, "dtype": self.dtype}
        if self.index is not None:
            row["rows"] = len(self.index)
        return row


class L:
    """One module of a LyCORIS kind (format 1.2, spec section 4.2): ``roles`` maps each role to
    its shape; ``alpha`` is the value of the 0-d F32 ``alpha`` tensor (None: no tensor);
    ``shape`` the base weight's shape written in the record (None: not written); ``facts``
    the numbers the expected inspect report needs, worked out by hand from lycoris.md
    sections 2-5 (plain-LoRA rank, its LyCORIS rank r, whether it is exact)."""

    def __init__(self, name, kind, roles, *, shape, alpha=None, dtype="F32", seed=0,
                 record_shape=True, ranks=(), plain_rank, r=None, exact=True, tucker=False,
                 dora=None):
        self.name, self.kind, self.roles, self.shape = name, kind, dict(roles), list(shape)
        self.alpha, self.dtype, self.seed, self.record_shape = alpha, dtype, seed, record_shape
        self.ranks, self.plain_rank, self.r, self.exact = list(ranks), plain_rank, r, exact
        self.tucker, self.dora = tucker, dora
        self.magnitude = self.bias = False
        self.layout = "out_in"
        self.lycoris_name = "lora_" + name.replace(".", "_")

    def tensors(self) -> list[T]:
        out = []
        for i, (role, shape) in enumerate(sorted(self.roles.items())):
            vals = _values(math.prod(shape), self.seed + i)
            if role == "dora_scale":  # a norm: positive
                vals = [1 + abs(v) for v in vals]
            out.append(T(f"{self.name}.{role}", self.dtype, shape, encode(vals, self.dtype)))
        if self.alpha is not None:
            out.append(T(f"{self.name}.alpha", "F32", [], encode([self.alpha], "F32")))
        return out

    def record(self) -> dict:
        rec = {"kind": self.kind, "layout": "out_in", "lycoris": {"name": self.lycoris_name}}
        if self.record_shape:
            rec["shape"] = self.shape
        return rec

    @property
    def scale(self) -> float:
        # alpha / r; alpha absent or 0 means alpha = r; no r (full, LoKr both full): 1
        if self.r is None or not self.alpha:
            return 1.0
        return self.alpha / self.r

    def inspect_row(self, scaling) -> dict:
        params = sum(math.prod(s) for s in self.roles.values())
        row_shape = self.shape if self.record_shape else [self.shape[0],
                                                          math.prod(self.shape[1:])]
        return {
            "name": self.name, "kind": "conv" if len(row_shape) > 2 else "linear",
            "layout": "out_in", "in": row_shape[1], "out": row_shape[0],
            "kernel": row_shape[2:], "rank": self.plain_rank,
            "alpha": self.scale * self.plain_rank, "scaling": "standard",
            "scale": self.scale, "dtype": self.dtype, "dora": False,
            "bias": "diff_b" in self.roles, "parameters": params,
            "lycoris": {
                "family": self.kind, "ranks": self.ranks, "plain_lora_rank": self.plain_rank,
                "plain_lora_rank_exact": self.exact, "tucker": self.tucker, "dora": self.dora,
                "shape": row_shape, "shape_known": self.record_shape,
                "stored_alpha": self.alpha or None, "scale": self.scale,
                "parameters": params},
        }


def linear(name=Q, out=4, inp=6, r=2, **kw) -> M:
    return M(name, "linear", "out_in", [r, inp], [out, r], **kw)


class Adapter:
    """Modules plus file-level facts; ``metadata()`` is what a canonical writer emits."""

    def __init__(self, modules, *, alpha=8.0, scaling="standard", version=VERSION,
                 base_model=None, base_model_hash=None, provenance=None, extra=None,
                 extra_loratool=None, record_extra=None, replacements=()):
        self.modules = sorted(modules, key=lambda m: m.name)
        self.replacements = sorted(replacements, key=lambda r: r.target)
        if self.replacements and version == VERSION:
            version = VERSION_REPLACEMENTS
        if any(isinstance(m, L) for m in self.modules) and version in (
                VERSION, VERSION_REPLACEMENTS):
            version = VERSION_LYCORIS
        self.alpha, self.scaling, self.version = alpha, scaling, version
        self.base_model, self.base_model_hash, self.provenance = (
            base_model, base_model_hash, provenance)
        self.extra = extra or {}  # other tools' keys
        self.extra_loratool = extra_loratool or {}  # unknown loratool.* keys (newer minor)
        self.record_extra = record_extra or {}  # unknown module-record fields (newer minor)

    def tensors(self) -> list[T]:
        return ([t for m in self.modules for t in m.tensors()]
                + [t for r in self.replacements for t in r.tensors()])

    def metadata(self, tensors=None) -> dict[str, str]:
        table = {}
        for m in self.modules:
            if isinstance(m, L):
                table[m.name] = m.record()
                continue
            rec = {"kind": m.kind, "layout": m.layout, **self.record_extra}
            if m.alpha is not None and float(m.alpha) != float(self.alpha):
                rec["alpha"] = float(m.alpha)
            table[m.name] = rec
        meta = dict(self.extra)
        meta.update(self.extra_loratool)
        meta.update({
            "loratool.format": FORMAT,
            "loratool.format_version": self.version,
            "loratool.scaling": self.scaling,
            "loratool.alpha": repr(float(self.alpha)),
            "loratool.target_modules": canonical_json(sorted(m.name for m in self.modules)),
            "loratool.modules": canonical_json(table),
            "loratool.tensor_hash": tensor_hash(self.tensors() if tensors is None else tensors),
        })
        for key, value in (("loratool.base_model", self.base_model),
                           ("loratool.base_model_hash", self.base_model_hash),
                           ("loratool.provenance", self.provenance)):
            if value is not None:
                meta[key] = value
        return meta

    def file(self, *, canonical=True) -> bytes:
        return container(self.tensors(), self.metadata(), canonical=canonical)

    def inspect(self) -> dict:
        """The expected ``loratool inspect --json`` report, ``path`` left out."""
        rows = []
        for m in self.modules:
            if isinstance(m, L):
                rows.append(m.inspect_row(self.scaling))
                continue
            alpha = float(self.alpha if m.alpha is None else m.alpha)
            r = m.a_shape[0]
            scale = alpha / math.sqrt(r) if self.scaling == "rslora" else alpha / r
            out = m.b_shape[0]
            params = math.prod(m.a_shape) + math.prod(m.b_shape) + out * (
                int(m.magnitude) + int(m.bias))
            rows.append({
                "name": m.name, "kind": m.kind, "layout": m.layout, "in": m.a_shape[1],
                "out": out, "kernel": m.a_shape[2:], "rank": r, "alpha": alpha,
                "scaling": self.scaling, "scale": scale, "dtype": m.dtype,
                "dora": m.magnitude, "bias": m.bias, "parameters": params,
            })

        def count(key):
            found: dict[str, int] = {}
            for row in rows:
                found[row[key]] = found.get(row[key], 0) + 1
            return dict(sorted(found.items()))

        report = {
            "source_format": "loratool",
            "format_version": self.version,
            "base_model": self.base_model,
            "base_model_hash": self.base_model_hash,
            "provenance": self.provenance,
            "scaling": self.scaling,
            "alpha": float(self.alpha),
            "tensor_hash": self.metadata()["loratool.tensor_hash"],
            "totals": {
                "modules": len(rows),
                "parameters": sum(r["parameters"] for r in rows),
                "bytes": sum(len(t.data) for t in self.tensors()),
                "dtypes": count("dtype"),
                "ranks": sorted({r["rank"] for r in rows}),
                "kinds": count("kind"),
            },
            "modules": rows,
            "details": {},
            "other_metadata": dict(sorted(self.extra.items())),
        }
        if self.replacements:
            report["totals"]["replacements"] = len(self.replacements)
            report["replacements"] = [r.inspect() for r in self.replacements]
        return report


def base() -> Adapter:
    """The adapter every invalid vector starts from: one linear module, nothing unusual."""
    return Adapter([linear()])


def mutated(adapter: Adapter, *, meta=None, drop=(), tensors=None) -> bytes:
    """The adapter's file with metadata keys set (``meta``) or removed (``drop``) and its
    tensor list replaced (``tensors``); the tensor hash matches the final tensors unless
    ``meta`` sets it, so the one defect is the only one."""
    ts = adapter.tensors() if tensors is None else tensors
    md = adapter.metadata(ts)
    md.update(meta or {})
    for key in drop:
        md.pop(key, None)
    return container(ts, md)


def _with_tensor(adapter, name, **changes) -> list[T]:
    out = []
    for t in adapter.tensors():
        if t.name == name:
            t = T(changes.get("name", t.name), changes.get("dtype", t.dtype),
                  changes.get("shape", t.shape), changes.get("data"),
                  seed=changes.get("seed", 0))
        out.append(t)
    return out


def _canonical_header_text(adapter) -> str:
    raw = adapter.file()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n].decode("ascii").rstrip(" ")


def _padded(text: str) -> bytes:
    b = text.encode("utf-8")
    return b + b" " * (-len(b) % 8)


# --- the vectors ---------------------------------------------------------------------------

SHA_BASE = "sha256:" + hashlib.sha256(b"loratool conformance vector base model").hexdigest()


def lycoris_modules():
    """(name, description, L): one module of each LyCORIS kind and variant."""
    U = "unet.down_blocks.0.attentions.0.proj_in"
    C = "unet.down_blocks.0.resnets.0.conv1"
    yield ("lycoris_loha", "LoHa, linear: (w1_a w1_b) * (w2_a w2_b), r = 2, alpha 1",
           L(U, "loha", {"hada_w1_a": [4, 2], "hada_w1_b": [2, 6], "hada_w2_a": [4, 2],
                         "hada_w2_b": [2, 6]}, shape=[4, 6], alpha=1.0, seed=61,
             ranks=[2, 2], plain_rank=4, r=2))
    yield ("lycoris_loha_tucker_dora", "LoHa with Tucker cores on a 3x3 conv, DoRA "
                                       "dora_scale (out, 1, 1, 1), BF16",
           L(C, "loha", {"hada_w1_a": [2, 4], "hada_w1_b": [2, 3], "hada_t1": [2, 2, 3, 3],
                         "hada_w2_a": [2, 4], "hada_w2_b": [2, 3], "hada_t2": [2, 2, 3, 3],
                         "dora_scale": [4, 1, 1, 1]}, shape=[4, 3, 3, 3], alpha=2.0,
             dtype="BF16", seed=63, ranks=[2, 2], plain_rank=4, r=2, tucker=True,
             dora="out"))
    yield ("lycoris_loha_conv_flat", "LoHa on a conv stored flattened (r, in*k*k), no shape "
                                     "in the record: its 2-D form until a base gives the "
                                     "kernel",
           L(C, "loha", {"hada_w1_a": [4, 1], "hada_w1_b": [1, 27], "hada_w2_a": [4, 1],
                         "hada_w2_b": [1, 27]}, shape=[4, 3, 3, 3], alpha=None, seed=65,
             record_shape=False, ranks=[1, 1], plain_rank=1, r=1))
    yield ("lycoris_locon_tucker", "LoCon with a Tucker core lora_mid on a 3x3 conv",
           L(C, "locon", {"lora_down": [2, 3, 1, 1], "lora_mid": [2, 2, 3, 3],
                          "lora_up": [4, 2, 1, 1]}, shape=[4, 3, 3, 3], alpha=4.0, seed=67,
             ranks=[2], plain_rank=2, r=2, tucker=True))
    yield ("lycoris_lokr", "LoKr: kron(w1, w2_a w2_b) with a full w1 (2, 2) and w2 of rank "
                           "1: plain-LoRA rank rank(w1) * 1, known from the values only",
           L(U, "lokr", {"lokr_w1": [2, 2], "lokr_w2_a": [2, 1], "lokr_w2_b": [1, 3]},
             shape=[4, 6], alpha=1.0, seed=69, ranks=[1], plain_rank=2, r=1, exact=False))
    yield ("lycoris_full", "full weight difference diff with diff_b, F16",
           L(U, "full", {"diff": [4, 6], "diff_b": [4]}, shape=[4, 6], dtype="F16", seed=71,
             plain_rank=4))


def valid_vectors():
    """(name, description, Adapter, canonical): files every reader MUST accept."""
    yield ("linear_minimal", "two linear modules (layout out_in), required keys only",
           Adapter([linear(Q, seed=1), linear(V, seed=3)]), True)
    yield ("linear_full", "every optional key: base_model, base_model_hash, provenance "
                          "(non-ASCII text, escaped in the canonical JSON)",
           Adapter([linear(Q, seed=1)], base_model="meta-llama/Llama-2-7b-hf",
                   base_model_hash=SHA_BASE,
                   provenance="trained by loratool's vector generator, caf\u00e9 \u2615"),
           True)
    yield ("in_out_conv1d", "GPT-2 Conv1D style linear module: base weight [in, out]",
           Adapter([M("transformer.h.0.attn.c_attn", "linear", "in_out", [2, 4], [12, 2],
                      seed=5)], alpha=4.0), True)
    yield ("conv_1x1", "2-D convolution with a 1x1 kernel",
           Adapter([M("unet.conv_in", "conv", "out_in", [2, 3, 1, 1], [4, 2, 1, 1], seed=7)]),
           True)
    yield ("conv_3x3", "2-D convolution with a 3x3 kernel (B stays 1x1)",
           Adapter([M("unet.down.0.conv", "conv", "out_in", [2, 3, 3, 3], [4, 2, 1, 1],
                      seed=9)]), True)
    yield ("conv1d_k3", "1-D convolution with kernel 3",
           Adapter([M("encoder.conv1", "conv", "out_in", [2, 3, 3], [4, 2, 1], seed=11)]), True)
    yield ("embedding", "embedding: A [r, num_embeddings], B [dim, r], base weight [num, dim]",
           Adapter([M("model.embed_tokens", "embedding", "in_out", [2, 10], [4, 2], seed=13)]),
           True)
    yield ("rslora", "rsLoRA scaling: scale = alpha / sqrt(r)",
           Adapter([linear(Q, r=2, seed=15)], alpha=4.0, scaling="rslora"), True)
    yield ("per_module_alpha", "one module overrides the default alpha in its record",
           Adapter([linear(Q, alpha=16.0, seed=17), linear(V, seed=19)], alpha=8.0), True)
    yield ("dora", "DoRA: lora_magnitude [out] beside A and B",
           Adapter([linear(Q, magnitude=True, seed=21)]), True)
    yield ("lora_bias", "lora_bias [out] beside A and B",
           Adapter([linear(Q, bias=True, seed=23)]), True)
    yield ("bf16", "BF16 tensors", Adapter([linear(Q, dtype="BF16", seed=25)]), True)
    yield ("fp16", "F16 tensors", Adapter([linear(Q, dtype="F16", seed=27)]), True)
    yield ("fp64", "F64 tensors", Adapter([linear(Q, dtype="F64", seed=29)]), True)
    yield ("all_kinds", "one module of each kind and layout in one file",
           Adapter([linear(Q, seed=31),
                    M("transformer.h.0.attn.c_attn", "linear", "in_out", [2, 4], [12, 2],
                      seed=33),
                    M("unet.conv_in", "conv", "out_in", [2, 3, 3, 3], [4, 2, 1, 1], seed=35),
                    M("model.embed_tokens", "embedding", "in_out", [2, 10], [4, 2], seed=37)]),
           True)
    yield ("other_tools_keys", "metadata keys of other tools, which writers keep untouched",
           Adapter([linear(Q, seed=39)], extra={
               "format": "pt", "modelspec.title": "conformance vector",
               "ss_network_dim": "2", "ss_network_alpha": "8.0"}), True)
    yield ("newer_minor_1_7", "format version 1.7 with an unknown loratool.* key and an "
                              "unknown module-record field: read as 1.x, unknowns ignored",
           Adapter([linear(Q, seed=41)], version="1.7",
                   extra_loratool={"loratool.future_option": "{\"mode\":\"fast\"}"},
                   record_extra={"dropout": 0.05}), False)
    # Format 1.2: LyCORIS kinds, with their own tensors.
    for name, desc, module in lycoris_modules():
        yield (name, "1.2: " + desc, Adapter([module]), True)
    # Format 1.1: replacement entries.
    yield ("replace_full", "1.1: a LoRA module plus whole-tensor replacements (a PEFT "
                           "modules_to_save head and a trained bias)",
           Adapter([linear(Q, seed=43)],
                   replacements=[R("score.weight", [3, 4], seed=45),
                                 R(f"{Q}.bias", [4], seed=47)]), True)
    yield ("replace_rows", "1.1: rows 1 and 7 of an embedding replaced (PEFT "
                           "trainable_token_indices), beside a LoRA module",
           Adapter([linear(Q, seed=49)],
                   replacements=[R("model.embed_tokens.weight", [2, 4], index=[7, 1],
                                   dtype="BF16", seed=51)]), True)
    yield ("replace_only", "1.1: no LoRA module, one replacement (empty module table)",
           Adapter([], replacements=[R("classifier.weight", [2, 4], seed=53)]), True)


def warn_vectors():
    """(name, code, description, bytes): break one SHOULD rule; still valid."""
    a = base()
    yield ("no_tensor_hash", "LT111", "loratool.tensor_hash is absent",
           mutated(a, drop=["loratool.tensor_hash"]))
    zero_b = _with_tensor(a, f"{Q}.lora_B", data=bytes(4 * 4 * 2))
    yield ("zero_B", "LT210", "lora_B is all zeros", mutated(a, tensors=zero_b))
    mixed = Adapter([linear(Q, b_dtype="F16")])
    yield ("mixed_dtypes", "LT211", "lora_A is F32, lora_B is F16", mixed.file())
    big = Adapter([linear(Q, out=3, inp=3, r=4)])
    yield ("rank_above_min", "LT212", "rank 4 exceeds min(out, in) = 3", big.file())


def invalid_vectors():
    """(name, code, description, bytes): break exactly one MUST rule."""
    a = base()
    good = a.file()
    text = _canonical_header_text(a)
    (n,) = struct.unpack("<Q", good[:8])
    data = good[8 + n:]

    # LT001 - LT008: the container.
    yield "empty_file", "LT001", "a file of 0 bytes", b""
    yield "short_length", "LT001", "5 bytes: shorter than the 8-byte header length", good[:5]
    yield ("header_past_end", "LT001", "the header length runs past the end of the file",
           raw_file(good[8:], length=len(good)))
    yield ("header_length_over_cap", "LT002", "the header length field says 100,000,001 "
                                              "bytes (the file is tiny)",
           raw_file(good[8:], length=100_000_001))
    yield ("header_length_u64_max", "LT002", "the header length field is 2**64 - 1",
           raw_file(good[8:], length=2**64 - 1))
    yield ("header_not_json", "LT003", "the header is not JSON",
           raw_file(_padded('{"model.q.lora_A": {dtype: F32}}')))
    yield ("header_not_utf8", "LT003", "the header holds a byte that is not UTF-8",
           raw_file(b'{"\xff":{}}    '))
    yield ("header_not_object", "LT003", "the header is a JSON list, not an object",
           raw_file(_padded("[]")))
    yield ("header_too_deep", "LT003", "the header nests 9 levels deep",
           raw_file(_padded('{"x.lora_A":{"shape":[[[[[[[]]]]]]]}}')))
    yield ("duplicate_tensor_key", "LT004", "a tensor name appears twice in the header",
           raw_file(_padded(text[:-1] + ',"' + Q + '.lora_A":'
                            + json.dumps({"dtype": "F32", "shape": [2, 6],
                                          "data_offsets": [0, 48]},
                                         separators=(",", ":")) + "}"), data))
    dup_meta = text.replace('"__metadata__":{', '"__metadata__":{"loratool.scaling":"rslora",',
                            1)
    yield ("duplicate_metadata_key", "LT004", "a metadata key appears twice",
           raw_file(_padded(dup_meta), data))
    yield ("metadata_value_not_string", "LT005", "loratool.alpha is the JSON number 8.0",
           raw_file(_padded(text.replace('"loratool.alpha":"8.0"', '"loratool.alpha":8.0')),
                    data))
    yield ("metadata_not_object", "LT005", "__metadata__ is a list",
           raw_file(_padded('{"__metadata__":["loratool.adapter"]}')))
    yield ("dtype_unknown", "LT006", "a tensor has dtype \"F12\"",
           raw_file(_padded(text.replace('"dtype":"F32"', '"dtype":"F12"', 1)), data))
    yield ("shape_negative", "LT006", "a tensor has shape [-2, 6]",
           raw_file(_padded(text.replace('"shape":[2,6]', '"shape":[-2,6]', 1)), data))
    yield ("entry_without_offsets", "LT006", "a tensor entry lacks data_offsets",
           raw_file(_padded('{"x.lora_A":{"dtype":"F32","shape":[1]}}')))
    yield ("span_mismatch", "LT007", "shape [2, 6] of F32 needs 48 bytes but the offsets "
                                     "span 44",
           raw_file(_padded(text.replace('"data_offsets":[0,48]', '"data_offsets":[0,44]')
                            .replace('"data_offsets":[48,80]', '"data_offsets":[44,76]')),
                    data[4:]))
    yield ("offsets_overlap", "LT008", "lora_B starts inside lora_A",
           raw_file(_padded(text.replace('"data_offsets":[48,80]', '"data_offsets":[40,72]')),
                    data[:72]))
    yield ("offsets_gap", "LT008", "4 unused bytes between the two tensors",
           raw_file(_padded(text.replace('"data_offsets":[48,80]', '"data_offsets":[52,84]')),
                    data[:48] + b"\0" * 4 + data[48:]))
    yield ("offsets_reversed", "LT008", "data_offsets [48, 0] ends before it begins",
           raw_file(_padded(text.replace('"data_offsets":[0,48]', '"data_offsets":[48,0]')),
                    data))
    yield "trailing_bytes", "LT008", "8 bytes after the last tensor", good + b"\0" * 8
    yield "truncated_data", "LT008", "the file ends 4 bytes early", good[:-4]

    # LT101 - LT111: metadata.
    yield ("format_missing", "LT101", "no loratool.format key",
           mutated(a, drop=["loratool.format"]))
    yield ("format_wrong", "LT101", "loratool.format is \"peft\"",
           mutated(a, meta={"loratool.format": "peft"}))
    yield ("version_not_major_minor", "LT102", "loratool.format_version is \"1\"",
           mutated(a, meta={"loratool.format_version": "1"}))
    yield ("version_leading_zero", "LT102", "loratool.format_version is \"1.01\"",
           mutated(a, meta={"loratool.format_version": "1.01"}))
    yield ("version_trailing_newline", "LT102", "loratool.format_version is \"1.0\\n\"",
           mutated(a, meta={"loratool.format_version": "1.0\n"}))
    yield ("version_missing", "LT102", "no loratool.format_version key",
           mutated(a, drop=["loratool.format_version"]))
    yield ("version_major_2", "LT103", "format version 2.0: a major version this reader "
                                       "does not know",
           mutated(a, meta={"loratool.format_version": "2.0"}))
    yield ("version_major_0", "LT103", "format version 0.9",
           mutated(a, meta={"loratool.format_version": "0.9"}))
    yield ("scaling_unknown", "LT104", "loratool.scaling is \"lycoris\"",
           mutated(a, meta={"loratool.scaling": "lycoris"}))
    yield ("alpha_zero", "LT105", "loratool.alpha is \"0.0\"",
           mutated(a, meta={"loratool.alpha": "0.0"}))
    yield ("alpha_nan", "LT105", "loratool.alpha is \"nan\"",
           mutated(a, meta={"loratool.alpha": "nan"}))
    yield ("alpha_not_decimal", "LT105", "loratool.alpha is \" 8\" (not a JSON number)",
           mutated(a, meta={"loratool.alpha": " 8"}))
    yield ("alpha_overflow", "LT105", "loratool.alpha is \"1e400\" (not finite as float64)",
           mutated(a, meta={"loratool.alpha": "1e400"}))
    yield ("alpha_record_zero", "LT105", "a module record has alpha 0",
           mutated(a, meta={"loratool.modules": canonical_json(
               {Q: {"alpha": 0, "kind": "linear", "layout": "out_in"}})}))
    yield ("alpha_record_huge_integer", "LT105", "a module record's alpha is a 400-digit JSON "
                                                 "integer (no float64 holds it)",
           mutated(a, meta={"loratool.modules": canonical_json(
               {Q: {"alpha": 10**400, "kind": "linear", "layout": "out_in"}})}))
    yield ("target_modules_not_list", "LT106", "loratool.target_modules is a JSON object",
           mutated(a, meta={"loratool.target_modules": canonical_json({Q: True})}))
    yield ("target_modules_duplicate", "LT106", "a module is listed twice in "
                                                "loratool.target_modules",
           mutated(a, meta={"loratool.target_modules": canonical_json([Q, Q])}))
    yield ("modules_not_object", "LT107", "loratool.modules is not JSON",
           mutated(a, meta={"loratool.modules": "linear"}))
    yield ("module_kind_unknown", "LT107", "a module record has kind \"attention\"",
           mutated(a, meta={"loratool.modules": canonical_json(
               {Q: {"kind": "attention", "layout": "out_in"}})}))
    yield ("module_layout_unknown", "LT107", "a module record has layout \"row\"",
           mutated(a, meta={"loratool.modules": canonical_json(
               {Q: {"kind": "linear", "layout": "row"}})}))
    extra = "model.layers.0.self_attn.k_proj"
    yield ("target_without_tensors", "LT108", "target_modules and the modules table name a "
                                              "module that has no tensors",
           mutated(a, meta={
               "loratool.target_modules": canonical_json(sorted([Q, extra])),
               "loratool.modules": canonical_json(
                   {Q: {"kind": "linear", "layout": "out_in"},
                    extra: {"kind": "linear", "layout": "out_in"}})}))
    yield ("tensors_without_record", "LT108", "tensors of a module that neither "
                                              "target_modules nor the table name",
           mutated(a, tensors=a.tensors() + linear(V, seed=2).tensors()))
    yield ("base_model_hash_malformed", "LT109", "loratool.base_model_hash has uppercase hex",
           mutated(a, meta={"loratool.base_model_hash": SHA_BASE.upper().replace(
               "SHA256", "sha256")}))
    yield ("tensor_hash_malformed", "LT109", "loratool.tensor_hash is \"md5:...\"",
           mutated(a, meta={"loratool.tensor_hash": "md5:" + "0" * 32}))
    yield ("base_model_hash_trailing_newline", "LT109", "loratool.base_model_hash ends in "
                                                        "\"\\n\"",
           mutated(a, meta={"loratool.base_model_hash": SHA_BASE + "\n"}))
    yield ("tensor_hash_wrong", "LT110", "loratool.tensor_hash is well formed but does not "
                                         "match the data",
           mutated(a, meta={"loratool.tensor_hash": SHA_BASE}))
    yield ("init_without_method", "LT115", "loratool.init is a JSON object without a "
                                           "\"method\" string",
           mutated(a, meta={"loratool.init": canonical_json({"init_lora_weights": "pissa"})}))

    # LT201 - LT213: tensors.
    yield ("role_unknown", "LT201", "a tensor named <module>.weight",
           mutated(a, tensors=a.tensors() + [T(f"{Q}.weight", "F32", [4, 6])]))
    yield ("missing_lora_A", "LT202", "a module has lora_B but no lora_A",
           mutated(a, tensors=[t for t in a.tensors() if not t.name.endswith("lora_A")]))
    yield ("integer_tensors", "LT203", "lora_A and lora_B are I32",
           mutated(a, tensors=[T(t.name, "I32", t.shape, seed=1) for t in a.tensors()]))
    yield ("linear_A_3d", "LT204", "a linear module's lora_A is 3-D",
           mutated(a, tensors=_with_tensor(a, f"{Q}.lora_A", shape=[2, 6, 1])))
    yield ("conv_A_2d", "LT204", "a conv module's lora_A is 2-D",
           mutated(a, meta={"loratool.modules": canonical_json(
               {Q: {"kind": "conv", "layout": "out_in"}})}))
    yield ("empty_in_dim", "LT204", "lora_A [2, 0]: in_features is 0",
           mutated(a, tensors=_with_tensor(a, f"{Q}.lora_A", shape=[2, 0])))
    yield ("rank_mismatch", "LT205", "lora_A has rank 2, lora_B has rank 3",
           mutated(a, tensors=_with_tensor(a, f"{Q}.lora_B", shape=[4, 3])))
    yield ("rank_zero", "LT206", "lora_A [0, 6] and lora_B [4, 0]",
           mutated(a, tensors=[T(f"{Q}.lora_A", "F32", [0, 6]),
                               T(f"{Q}.lora_B", "F32", [4, 0])]))
    conv = Adapter([M("unet.conv_in", "conv", "out_in", [2, 3, 3, 3], [4, 2, 3, 3])])
    yield ("conv_B_3x3", "LT207", "a conv module's lora_B is [out, r, 3, 3]", conv.file())
    yield ("embedding_out_in", "LT207", "an embedding module with layout out_in",
           Adapter([M("model.embed_tokens", "embedding", "out_in", [2, 10], [4, 2])]).file())
    yield ("conv_in_out", "LT207", "a conv module with layout in_out",
           Adapter([M("unet.conv_in", "conv", "in_out", [2, 3, 1, 1], [4, 2, 1, 1])]).file())
    dora = Adapter([linear(magnitude=True)])
    yield ("magnitude_wrong_shape", "LT208", "lora_magnitude is [5] for out = 4",
           mutated(dora, tensors=_with_tensor(dora, f"{Q}.lora_magnitude", shape=[5])))
    lbias = Adapter([linear(bias=True)])
    yield ("bias_wrong_shape", "LT208", "lora_bias is [4, 1] instead of [4]",
           mutated(lbias, tensors=_with_tensor(lbias, f"{Q}.lora_bias", shape=[4, 1])))
    nan_a = bytearray(a.tensors()[0].data)
    nan_a[0:4] = struct.pack("<I", 0x7FC00000)
    yield ("nan_f32", "LT209", "lora_A (F32) holds a NaN",
           mutated(a, tensors=_with_tensor(a, f"{Q}.lora_A", data=bytes(nan_a))))
    bf = Adapter([linear(dtype="BF16")])
    inf_b = bytearray(bf.tensors()[1].data)
    inf_b[2:4] = struct.pack("<H", 0xFF80)  # -Inf
    yield ("inf_bf16", "LT209", "lora_B (BF16) holds -Inf (bit pattern 0xFF80)",
           mutated(bf, tensors=_with_tensor(bf, f"{Q}.lora_B", dtype="BF16",
                                            data=bytes(inf_b))))
    h = Adapter([linear(dtype="F16")])
    inf_h = bytearray(h.tensors()[0].data)
    inf_h[0:2] = struct.pack("<H", 0x7C00)  # +Inf
    yield ("inf_f16", "LT209", "lora_A (F16) holds +Inf",
           mutated(h, tensors=_with_tensor(h, f"{Q}.lora_A", dtype="F16", data=bytes(inf_h))))
    # LT214 - LT216: replacement entries (1.1).
    rep = Adapter([linear(Q, seed=1)], replacements=[
        R("model.embed_tokens.weight", [2, 4], index=[3, 5], seed=2)])
    rows = "model.embed_tokens.weight.replace_rows"
    idx = "model.embed_tokens.weight.replace_index"
    yield ("replace_rows_without_index", "LT214", "replace_rows without its replace_index",
           mutated(rep, tensors=[t for t in rep.tensors() if t.name != idx]))
    yield ("replace_index_not_i64", "LT214", "replace_index is I32",
           mutated(rep, tensors=_with_tensor(rep, idx, dtype="I32",
                                             data=struct.pack("<2i", 3, 5))))
    yield ("replace_index_count", "LT214", "2 replaced rows but 3 indices",
           mutated(rep, tensors=_with_tensor(rep, idx, shape=[3],
                                             data=encode_i64([3, 5, 6]))))
    both = rep.tensors() + [T("model.embed_tokens.weight.replace", "F32", [10, 4], seed=3)]
    yield ("replace_whole_and_rows", "LT214", "one tensor replaced whole and by rows",
           mutated(rep, tensors=both))
    yield ("replace_names_module", "LT214", "a replacement named like a module "
                                            "(<module>.replace)",
           mutated(rep, tensors=rep.tensors() + [T(f"{Q}.replace", "F32", [4, 6], seed=4)]))
    yield ("replace_int_values", "LT203", "replacement values are I32",
           mutated(rep, tensors=_with_tensor(rep, rows, dtype="I32")))
    yield ("replace_index_duplicate", "LT215", "replace_index names row 3 twice",
           mutated(rep, tensors=_with_tensor(rep, idx, data=encode_i64([3, 3]))))
    yield ("replace_index_negative", "LT215", "replace_index holds -1",
           mutated(rep, tensors=_with_tensor(rep, idx, data=encode_i64([3, -1]))))
    yield ("replace_in_version_1_0", "LT216", "a replacement entry in a file that says 1.0",
           mutated(rep, meta={"loratool.format_version": "1.0"}))
    yield ("nothing_to_apply", "LT108", "no module and no replacement entry",
           mutated(Adapter([]), tensors=[]))

    # LT217 - LT219 and the LyCORIS rules on LyCORIS kinds (1.2).
    loha = next(m for n, _, m in lycoris_modules() if n == "lycoris_loha")
    ly = Adapter([loha])
    U = loha.name
    yield ("lycoris_in_version_1_1", "LT217", "a LyCORIS kind in a file that says 1.1",
           mutated(ly, meta={"loratool.format_version": "1.1"}))
    rec = loha.record()
    yield ("lycoris_layout_in_out", "LT218", "a loha record with layout in_out",
           mutated(ly, meta={"loratool.modules": canonical_json(
               {U: dict(rec, layout="in_out")})}))
    yield ("lycoris_record_alpha", "LT218", "a loha record with an alpha field",
           mutated(ly, meta={"loratool.modules": canonical_json({U: dict(rec, alpha=2.0)})}))
    yield ("lycoris_record_shape_zero", "LT218", "a loha record with shape [4, 0]",
           mutated(ly, meta={"loratool.modules": canonical_json({U: dict(rec, shape=[4, 0])})}))
    yield ("lycoris_kind_mismatch", "LT219", "LoHa tensors under a lokr record",
           mutated(ly, meta={"loratool.modules": canonical_json({U: dict(rec, kind="lokr")})}))
    yield ("lycoris_role_in_linear", "LT219", "a linear module with a hada_w1_a tensor",
           mutated(base(), tensors=base().tensors() + [T(f"{Q}.hada_w1_a", "F32", [4, 2])]))
    yield ("lycoris_missing_factor", "LT232", "a LoHa module without hada_w2_b",
           mutated(ly, tensors=[t for t in ly.tensors() if not t.name.endswith("hada_w2_b")]))
    yield ("lycoris_rank_mismatch", "LT234", "hada_w2_a (4, 2) but hada_w2_b (3, 6)",
           mutated(ly, tensors=_with_tensor(ly, f"{U}.hada_w2_b", shape=[3, 6])))
    yield ("lycoris_terms_differ", "LT236", "LoHa terms of shapes (4, 6) and (4, 5)",
           mutated(ly, tensors=_with_tensor(ly, f"{U}.hada_w2_b", shape=[2, 5])))
    yield ("lycoris_alpha_vector", "LT238", "alpha is a 2-vector",
           mutated(ly, tensors=_with_tensor(ly, f"{U}.alpha", shape=[2])))
    yield ("lycoris_shape_mismatch", "LT241", "record shape [4, 7] for a (4, 6) delta",
           mutated(ly, meta={"loratool.modules": canonical_json({U: dict(rec, shape=[4, 7])})}))

    yield ("module_name_invalid", "LT213", "module name with brackets: model.layers[0].q_proj",
           Adapter([linear("model.layers[0].q_proj")]).file())
    yield ("module_name_trailing_newline", "LT213", "module name \"q_proj\\n\"",
           Adapter([linear("q_proj\n")]).file())


# --- writing -------------------------------------------------------------------------------

def _json_text(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def generate(outdir: str) -> list[dict]:
    """Write every vector under ``outdir``; returns the index. Stale generated files in the
    three vector folders are removed first, so the folders hold exactly this run's output."""
    files: dict[str, bytes] = {}
    index = []
    for name, desc, adapter, canonical in valid_vectors():
        files[f"valid/{name}.safetensors"] = adapter.file()
        files[f"valid/{name}.inspect.json"] = _json_text(adapter.inspect())
        index.append({"path": f"valid/{name}.safetensors", "expect": "valid", "code": None,
                      "canonical": canonical, "description": desc})
    # A reader must not depend on the canonical layout: same adapter, reordered bytes.
    adapter = Adapter([linear(Q, seed=1), linear(V, seed=3)])
    files["valid/noncanonical_layout.safetensors"] = adapter.file(canonical=False)
    files["valid/noncanonical_layout.inspect.json"] = _json_text(adapter.inspect())
    index.append({"path": "valid/noncanonical_layout.safetensors", "expect": "valid",
                  "code": None, "canonical": False,
                  "description": "linear_minimal with data in reverse name order, indented "
                                 "unsorted JSON and no header padding"})
    for folder, vectors, level, expect in (("warn", warn_vectors(), "SHOULD", "warning"),
                                           ("invalid", invalid_vectors(), "MUST", "invalid")):
        for name, code, desc, raw in vectors:
            files[f"{folder}/{name}.safetensors"] = raw
            files[f"{folder}/{name}.expected.json"] = _json_text(
                {"code": code, "level": level, "defect": desc})
            index.append({"path": f"{folder}/{name}.safetensors", "expect": expect,
                          "code": code, "canonical": False, "description": desc})
    for rel, raw in files.items():
        if rel.endswith(".safetensors") and len(raw) >= 4096:
            raise AssertionError(f"{rel} is {len(raw)} bytes; vectors stay under 4 KiB")
    files["index.json"] = _json_text({"format_version": VERSION, "vectors": index})

    for folder in ("valid", "warn", "invalid"):
        os.makedirs(os.path.join(outdir, folder), exist_ok=True)
        for entry in os.listdir(os.path.join(outdir, folder)):
            if entry.endswith((".safetensors", ".json")):
                os.unlink(os.path.join(outdir, folder, entry))
    for rel, raw in sorted(files.items()):
        with open(os.path.join(outdir, rel), "wb") as f:
            f.write(raw)
    return index


def main(argv: list[str]) -> int:
    if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
        print("usage: python spec/vectors/generate.py [OUTDIR]  (default: beside this script)")
        return 2
    outdir = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    index = generate(outdir)
    counts: dict[str, int] = {}
    for v in index:
        counts[v["expect"]] = counts.get(v["expect"], 0) + 1
    print(f"wrote {len(index)} vectors to {outdir}: "
          + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
