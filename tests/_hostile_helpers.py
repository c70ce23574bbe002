"""Shared machinery of the adversarial suites (test_hostile, test_faults, test_malicious_pickle).

* seed files of every supported format, tiny and matching one another (an adapter of each
  format fits the base checkpoints), built in a temporary directory;
* mutators that turn a valid file into hostile ones, each with a short case name;
* the command table: every CLI command that exists when the tests run, as argument lists
  built from the command's real Click options (a command that has not landed yet simply
  yields no cases);
* runners: in process through Click's CliRunner (with a hang guard and an address-space
  bound) and in a subprocess (timeout, RLIMIT_AS), and the one assertion every case obeys.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- seeds ---------------------------------------------------------------------------------

RANK = 4
ALPHA = 8.0
# Base tensors; the adapters below adapt a subset of them.
BASE_SHAPES = {
    "layers.0.q_proj.weight": (10, 12),
    "layers.0.q_proj.bias": (10,),
    "layers.0.v_proj.weight": (10, 12),
    "h.0.attn.c_attn.weight": (12, 36),  # GPT-2 Conv1D: stored [in, out]
    "conv1.weight": (6, 3, 3, 3),
    "embed.weight": (20, 8),
    "norm.weight": (12,),
}


def _gen(seed):
    import torch
    return torch.Generator().manual_seed(seed)


def make_loratool_adapter(seed: int = 0, *, rank: int = RANK, scale_b: float = 1.0):
    """An Adapter with one module of each kind, matching BASE_SHAPES."""
    import torch

    from loratool.model import Adapter, LoraModule
    g = _gen(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    mods = {
        "layers.0.q_proj": LoraModule("layers.0.q_proj", "linear", "out_in", rnd(rank, 12),
                                      rnd(10, rank) * scale_b, ALPHA),
        "h.0.attn.c_attn": LoraModule("h.0.attn.c_attn", "linear", "in_out", rnd(rank, 12),
                                      rnd(36, rank) * scale_b, ALPHA),
        "conv1": LoraModule("conv1", "conv", "out_in", rnd(rank, 3, 3, 3),
                            rnd(6, rank, 1, 1) * scale_b, ALPHA),
        "embed": LoraModule("embed", "embedding", "in_out", rnd(rank, 20), rnd(8, rank) * scale_b,
                            ALPHA),
    }
    return Adapter(modules=mods, alpha=ALPHA)


PEFT_CONFIG = {
    "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"],
    "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
    "bias": "none", "base_model_name_or_path": None, "task_type": None, "lora_dropout": 0.0,
    "modules_to_save": None, "use_dora": False,
}


def _linear_pair(g, rank=RANK):
    import torch
    return torch.randn(rank, 12, generator=g), torch.randn(10, rank, generator=g)


def write_peft_dir(path: str, seed: int = 1) -> str:
    from safetensors.torch import save_file
    g = _gen(seed)
    os.makedirs(path)
    tensors = {}
    for mod in ("q_proj", "v_proj"):
        a, b = _linear_pair(g)
        tensors[f"base_model.model.layers.0.{mod}.lora_A.weight"] = a
        tensors[f"base_model.model.layers.0.{mod}.lora_B.weight"] = b
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(PEFT_CONFIG, f)
    return path


def write_kohya(path: str, seed: int = 2) -> str:
    import torch
    from safetensors.torch import save_file
    g = _gen(seed)
    tensors = {}
    for mod in ("q_proj", "v_proj"):
        a, b = _linear_pair(g)
        key = f"lora_unet_layers_0_{mod}"
        tensors[f"{key}.lora_down.weight"] = a
        tensors[f"{key}.lora_up.weight"] = b
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, path, metadata={"ss_network_dim": str(RANK),
                                       "ss_network_alpha": str(ALPHA)})
    return path


def write_loralib(path: str, seed: int = 3) -> str:
    import torch
    g = _gen(seed)
    state = {}
    for mod in ("q_proj", "v_proj"):
        a, b = _linear_pair(g)
        state[f"layers.0.{mod}.lora_A"] = a
        state[f"layers.0.{mod}.lora_B"] = b
    torch.save(state, path)
    return path


def base_state(seed: int = 4, scale: int = 1):
    import torch
    g = _gen(seed)
    out = {}
    for name, shape in BASE_SHAPES.items():
        shape = tuple(d * scale if i == 0 and len(shape) == 2 and scale > 1 else d
                      for i, d in enumerate(shape))
        out[name] = torch.randn(*shape, generator=g)
    return out


def write_base(path: str, seed: int = 4) -> str:
    from safetensors.torch import save_file
    save_file(base_state(seed), path, metadata={"format": "pt"})
    return path


def write_sharded_base(path: str, seed: int = 4) -> str:
    from safetensors.torch import save_file
    state = base_state(seed)
    os.makedirs(path)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, os.path.join(path, shard),
                  metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "tiny"}, f)
    return path


def write_base_pt(path: str, seed: int = 4) -> str:
    import torch
    torch.save(base_state(seed), path)
    return path


@dataclass
class Seeds:
    root: str
    loratool: str = ""
    loratool2: str = ""
    peft: str = ""
    kohya: str = ""
    loralib: str = ""
    base: str = ""
    base_sharded: str = ""
    base_pt: str = ""
    merged: str = ""  # base with the loratool adapter merged in, when merge exists
    extra: dict = field(default_factory=dict)

    def adapters(self) -> dict[str, str]:
        return {"loratool": self.loratool, "peft": self.peft, "kohya": self.kohya,
                "loralib": self.loralib}

    def bases(self) -> dict[str, str]:
        return {"base": self.base, "base_sharded": self.base_sharded, "base_pt": self.base_pt}


def build_seeds(root: str) -> Seeds:
    from loratool.adapter import save_adapter
    os.makedirs(root, exist_ok=True)
    s = Seeds(root)
    s.loratool = os.path.join(root, "seed.safetensors")
    save_adapter(make_loratool_adapter(0), s.loratool)
    s.loratool2 = os.path.join(root, "seed2.safetensors")
    save_adapter(make_loratool_adapter(7), s.loratool2)
    s.peft = write_peft_dir(os.path.join(root, "peft_seed"))
    s.kohya = write_kohya(os.path.join(root, "kohya_seed.safetensors"))
    s.loralib = write_loralib(os.path.join(root, "loralib_seed.pt"))
    s.base = write_base(os.path.join(root, "base.safetensors"))
    s.base_sharded = write_sharded_base(os.path.join(root, "base_sharded"))
    s.base_pt = write_base_pt(os.path.join(root, "base_pt.pt"))
    s.merged = s.base
    out = os.path.join(root, "merged.safetensors")
    r = run_inprocess(["merge", s.base, s.loratool, "-o", out])
    if r.exit_code == 0 and os.path.exists(out):
        s.merged = out
    return s


# --- raw safetensors surgery ---------------------------------------------------------------

def st_split(data: bytes) -> tuple[int, dict, bytes]:
    """(header length, header object, data section) of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def st_join_text(text: bytes, body: bytes, *, length: int | None = None) -> bytes:
    """A file from raw header text (padded to 8 bytes) and a data section."""
    text = text + b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def st_join(header: dict, body: bytes) -> bytes:
    return st_join_text(json.dumps(header).encode("utf-8"), body)


def st_tensors(data: bytes) -> tuple[dict, list[tuple[str, str, list, bytes]]]:
    """(metadata, [(name, dtype, shape, raw bytes)]) in offset order."""
    n, header, body = st_split(data)
    meta = header.pop("__metadata__", {})
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    return meta, [(k, v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in items]


def st_build(meta: dict | None, tensors) -> bytes:
    """A well-formed container (but not necessarily a valid adapter) from parts."""
    header: dict = {}
    body = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    if meta is not None:
        header["__metadata__"] = meta
    return st_join(header, body)


def _first(items, pred):
    for i, it in enumerate(items):
        if pred(it):
            return i
    return 0


def safetensors_mutations(data: bytes, *, full: bool = True) -> list[tuple[str, bytes]]:
    """Hostile variants of one valid safetensors file, each with a case name.

    ``full=False`` keeps the structural core (for cheaper, secondary inputs).
    """
    import numpy as np
    n, header, body = st_split(data)
    size = len(data)
    start = 8 + n
    cases: list[tuple[str, bytes]] = []
    add = lambda name, blob: cases.append((name, blob))  # noqa: E731

    # Truncation at every region boundary.
    cuts = {"empty": 0, "in_len_1": 1, "in_len_4": 4, "in_len_7": 7, "len_only": 8,
            "in_header": 8 + n // 2, "header_minus1": start - 1, "at_data_start": start,
            "minus1": size - 1}
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"])
    for i, (k, v) in enumerate(tensors if full else tensors[:2]):
        b, e = v["data_offsets"]
        if e > b:
            cuts[f"in_tensor{i}"] = start + (b + e) // 2
            cuts[f"end_tensor{i}_minus1"] = start + e - 1
    for name, at in cuts.items():
        add(f"trunc_{name}", data[:at])
    add("trailing_bytes", data + b"\0" * 8)

    # Header length field.
    for name, value in {"0": 0, "past_eof": size, "past_eof_by_1": size - 7, "n_plus_8": n + 8,
                        "n_minus_8": max(n - 8, 0), "cap_plus_1": 100_000_001,
                        "2^63": 2**63, "2^64-1": 2**64 - 1, "2^64-8": 2**64 - 8,
                        "2^32": 2**32}.items():
        add(f"hlen_{name}", struct.pack("<Q", value) + data[8:])

    # Header text.
    for name, text in {"not_json": b"{not json", "list": b"[]", "null": b"null",
                       "string": b'"x"', "number": b"12", "bad_utf8": b'{"\xff\xfe": 1}',
                       "nul_bytes": b"{\0\0\0}", "empty_obj_with_data": b"{}",
                       "bom": b"\xef\xbb\xbf{}", "nan": b'{"__metadata__": NaN}'}.items():
        add(f"htext_{name}", st_join_text(text, body if name == "empty_obj_with_data" else b""))
    add("deep_nest_100k", st_join_text(b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000
                                       + b"}", b""))
    add("deep_nest_9", st_join_text(b'{"a":' + b"[" * 8 + b"]" * 8 + b"}", b""))
    add("deep_nest_in_string", st_join({**header, "__metadata__": {
        **header.get("__metadata__", {}), "x": "[" * 200_000}}, body))
    if full:
        big = dict(header)
        big["__metadata__"] = {**header.get("__metadata__", {}), "pad": "x" * 8_000_000}
        add("huge_metadata_8MB", st_join(big, body))
        many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                for i in range(50_000)}
        add("many_empty_tensors_50k", st_join(many, b""))

    # Duplicate keys (JSON text level).
    text = json.dumps(header).encode()
    first = tensors[0][0]
    dup_entry = json.dumps({first: header[first]})[1:-1].encode()
    add("dup_tensor_key", st_join_text(b"{" + dup_entry + b"," + text[1:], body))
    add("dup_metadata_key", st_join_text(b'{"__metadata__":{},' + text[1:], body)
        if "__metadata__" in header else st_join_text(
            b'{"__metadata__":{"a":"1","a":"2"},' + text[1:], body))
    add("dup_inner_metadata_key", st_join_text(
        text[:-1] + b',"__metadata__x":{"a":"1","a":"2"}}', body))

    # Non-string metadata.
    meta = header.get("__metadata__", {})
    for name, value in {"int": 1, "list": ["a"], "dict": {"a": "b"}, "null": None,
                        "bool": True, "float": 1.5}.items():
        add(f"meta_value_{name}", st_join({**header, "__metadata__": {**meta, "k": value}}, body))
    for name, value in {"list": [], "string": "x", "int": 0}.items():
        add(f"meta_is_{name}", st_join({**header, "__metadata__": value}, body))

    # Offsets and shapes of one tensor.
    def with_entry(name, **changes):
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return st_join(h, body)

    t0, v0 = tensors[0]
    b0, e0 = v0["data_offsets"]
    t1 = tensors[1][0] if len(tensors) > 1 else t0
    v1 = header[t1]
    for name, offs in {"swap": [v1["data_offsets"], v0["data_offsets"]],
                       "overlap": [v0["data_offsets"], [b0, b0 + (v1["data_offsets"][1]
                                                                  - v1["data_offsets"][0])]]
                       }.items():
        h = json.loads(json.dumps(header))
        h[t0]["data_offsets"], h[t1]["data_offsets"] = offs
        add(f"offsets_{name}", st_join(h, body))
    for name, offs in {"past_end": [b0, len(body) + 64], "reversed": [e0, b0],
                       "negative": [-4, e0], "float": [float(b0), float(e0)],
                       "strings": [str(b0), str(e0)], "three": [b0, e0, e0],
                       "2^63": [2**63, 2**63 + e0 - b0], "2^64": [2**64, 2**64 + e0 - b0],
                       "bool": [False, True], "null": None}.items():
        add(f"offsets_{name}", with_entry(t0, data_offsets=offs))
    for name, shape in {"overflow_i64": [2**32, 2**32, 8], "huge_2^62": [2**62, 4],
                        "terabytes": [2**20, 2**20, 2**10], "negative": [-1, 12],
                        "float": [4.0, 12.0], "string": "4x12", "null": None,
                        "17dims": [1] * 17, "2^64": [2**64], "bool": [True, 12]}.items():
        add(f"shape_{name}", with_entry(t0, shape=shape))
    # Terabyte claims made consistent (offsets agree with the shape; the file is short).
    add("shape_terabytes_consistent", with_entry(
        t0, shape=[2**20, 2**20], data_offsets=[b0, b0 + 2**40 * 4]))
    for name, dtype in {"unknown": "F33", "empty": "", "lower": "f32", "int": 7, "null": None,
                        "sub_byte_F4": "F4", "list": ["F32"]}.items():
        add(f"dtype_{name}", with_entry(t0, dtype=dtype))
    # Valid container, dtypes an adapter must not have (same byte size as F32).
    for dtype in ("I32", "U32"):
        add(f"dtype_{dtype}_same_size", with_entry(t0, dtype=dtype))
    if v0["dtype"] == "F32" and len(v0["shape"]) >= 1:
        h = json.loads(json.dumps(header))
        h[t0]["dtype"] = "F16"
        h[t0]["shape"] = [v0["shape"][0] * 2, *v0["shape"][1:]]
        add("dtype_F16_reshaped", st_join(h, body))
    add("entry_is_list", st_join({**header, t0: [1, 2]}, body))
    h = json.loads(json.dumps(header))
    del h[t0]["shape"]
    add("entry_missing_shape", st_join(h, body))
    h = json.loads(json.dumps(header))
    h[t0]["extra"] = {"a": [1, {"b": 2}]}
    add("entry_extra_key", st_join(h, body))

    # Value-level mutations on well-formed containers.
    meta_d, items = st_tensors(data)
    fl = [i for i, it in enumerate(items) if it[1] in ("F32", "F16", "BF16", "F64")
          and len(it[3])]
    if fl:
        i = fl[0]
        name, dtype, shape, raw = items[i]
        np_dt = {"F32": np.float32, "F16": np.float16, "F64": np.float64}.get(dtype)
        if np_dt is not None:
            for tag, value in (("nan", np.nan), ("inf", np.inf), ("neg_inf", -np.inf),
                               ("huge", np.finfo(np_dt).max)):
                arr = np.frombuffer(raw, dtype=np_dt).copy()
                arr[arr.size // 2] = value
                mod = list(items)
                mod[i] = (name, dtype, shape, arr.tobytes())
                add(f"value_{tag}", st_build(meta_d, mod))
            arr = np.zeros(len(raw) // np.dtype(np_dt).itemsize, dtype=np_dt)
            add("value_all_zero_first", st_build(meta_d, items[:i] + [(name, dtype, shape,
                                                  arr.tobytes())] + items[i + 1:]))
        # 0-element tensor
        zero_shape = [0, *shape[1:]] if shape else [0]
        add("zero_elements_first", st_build(meta_d, items[:i] + [(name, dtype, zero_shape,
                                            b"")] + items[i + 1:]))
        # rank-0 modules with astronomically large other dimensions: nothing in the file,
        # but anything that formed a dense delta (or checked nothing) would allocate out*in.
        add("zero_rank_huge_dims", st_build(meta_d, [_zero_rank(it) for it in items]))
        add("drop_first_tensor", st_build(meta_d, items[:i] + items[i + 1:]))
        add("scalar_first", st_build(meta_d, items[:i] + [(name, dtype, [], raw[:4])]
                                     + items[i + 1:]) if dtype == "F32" else data)
        add("transpose_first", st_build(meta_d, items[:i] + [(name, dtype, list(shape[::-1]),
                                        raw)] + items[i + 1:]))
        add("unknown_extra_tensor", st_build(meta_d, items + [("zzz.unknown", "F32", [2],
                                                               b"\0" * 8)]))
        add("dup_name_via_ws", st_build(meta_d, items + [(name + " ", dtype, shape, raw)]))
        add("odd_names", st_build(meta_d, [("../../etc/passwd" if j == i else nm, dt, sh, r)
                                           for j, (nm, dt, sh, r) in enumerate(items)]))
        add("empty_name", st_build(meta_d, [("" if j == i else nm, dt, sh, r)
                                            for j, (nm, dt, sh, r) in enumerate(items)]))
    add("no_tensors_with_meta", st_build(meta_d, []))
    add("no_tensors_no_meta", st_build(None, []))
    return cases


A_SUFFIXES = ("lora_A", "lora_A.weight", "lora_down.weight", "lora_embedding_A")
B_SUFFIXES = ("lora_B", "lora_B.weight", "lora_up.weight", "lora_embedding_B")


def _zero_rank(item):
    name, dtype, shape, raw = item
    if name.endswith(A_SUFFIXES) and len(shape) >= 2:
        return name, dtype, [0, 2**40] + [2**10] * (len(shape) - 2), b""
    if name.endswith(B_SUFFIXES) and len(shape) >= 2:
        return name, dtype, [2**40, 0] + [1] * (len(shape) - 2), b""
    return item


def loratool_metadata_mutations(data: bytes) -> list[tuple[str, bytes]]:
    """Hostile loratool.* metadata values on a well-formed container."""
    meta, items = st_tensors(data)
    cases = []
    values = {
        "loratool.format_version": ["2.0", "1.999999", "1.0.0", "", "01.0", "1." + "9" * 5000,
                                    "9" * 400 + ".0"],
        "loratool.alpha": ["nan", "inf", "-inf", "0", "1e999", "", "abc", "1" * 5000, "-0.0"],
        "loratool.scaling": ["", "RSLORA", "none"],
        "loratool.target_modules": ["", "[", "5", '"x"', "[1,2]", '["a","a"]', "{}",
                                    "[" * 100_000, '["' + "x" * 200_000 + '"]'],
        "loratool.modules": ["", "[]", "null", '{"layers.0.q_proj": 5}',
                             '{"layers.0.q_proj": {"kind": "linear"}}',
                             '{"layers.0.q_proj": {"kind": "conv", "layout": "out_in"}}',
                             '{"layers.0.q_proj": {"kind": "linear", "layout": "out_in", '
                             '"alpha": "8"}}',
                             '{"layers.0.q_proj": {"kind": "linear", "layout": "out_in", '
                             '"alpha": NaN}}',
                             '{"layers.0.q_proj": {"kind": "linear", "layout": "out_in", '
                             '"alpha": 1e999}}',
                             "{" * 100_000],
        "loratool.tensor_hash": ["sha256:" + "0" * 64, "md5:x", "", "sha256:" + "G" * 64],
        "loratool.base_model_hash": ["sha256:zz"],
    }
    for key, vals in values.items():
        for i, v in enumerate(vals):
            cases.append((f"meta_{key.split('.')[1]}_{i}", st_build({**meta, key: v}, items)))
    cases.append(("meta_missing_format", st_build({k: v for k, v in meta.items()
                                                   if k != "loratool.format"}, items)))
    cases.append(("meta_missing_all", st_build({}, items)))
    return cases


def kohya_mutations(data: bytes) -> list[tuple[str, bytes]]:
    """Hostile kohya specifics: the alpha scalar and ss_* metadata."""
    import numpy as np
    meta, items = st_tensors(data)
    cases = []
    for tag, value in (("nan", np.nan), ("inf", np.inf), ("zero", 0.0), ("neg", -8.0),
                       ("huge", 3e38)):
        mod = [(n, d, s, np.array([value], dtype=np.float32).tobytes() if n.endswith(".alpha")
                else r) for n, d, s, r in items]
        cases.append((f"alpha_{tag}", st_build(meta, mod)))
    mod = [(n, "F32", [4], b"\0" * 16) if n.endswith(".alpha") else (n, d, s, r)
           for n, d, s, r in items]
    cases.append(("alpha_vector", st_build(meta, mod)))
    mod = [(n, "I64", [], struct.pack("<q", 8)) if n.endswith(".alpha") else (n, d, s, r)
           for n, d, s, r in items]
    cases.append(("alpha_int64", st_build(meta, mod)))
    cases.append(("up_without_down", st_build(meta, [it for it in items
                                                     if "lora_down" not in it[0]])))
    for key, v in (("ss_network_dim", "x"), ("ss_network_alpha", "nan"),
                   ("ss_network_args", "{" * 50_000), ("modelspec.title", "\0" * 10)):
        cases.append((f"meta_{key}", st_build({**meta, key: v}, items)))
    return cases


PEFT_CONFIG_MUTATIONS: dict[str, object] = {
    "r_string": {"r": "4"}, "r_zero": {"r": 0}, "r_negative": {"r": -4}, "r_float": {"r": 4.5},
    "r_bool": {"r": True}, "r_huge": {"r": 2**70}, "r_null": {"r": None},
    "alpha_list": {"lora_alpha": [16]}, "alpha_string": {"lora_alpha": "16"},
    "alpha_nan": {"lora_alpha": float("nan")}, "alpha_inf": {"lora_alpha": float("inf")},
    "alpha_zero": {"lora_alpha": 0}, "alpha_dict": {"lora_alpha": {"a": 1}},
    "target_int": {"target_modules": 5}, "target_list_of_int": {"target_modules": [1, 2]},
    "target_bad_regex": {"target_modules": "(["}, "target_empty": {"target_modules": []},
    "rank_pattern_list": {"rank_pattern": ["q_proj", 2]},
    "rank_pattern_bad_value": {"rank_pattern": {"q_proj": "two"}},
    "rank_pattern_zero": {"rank_pattern": {"q_proj": 0}},
    "rank_pattern_bad_regex": {"rank_pattern": {"q_proj((": 2}},
    "rank_pattern_redos": {"rank_pattern": {"(a+)+$": 2}},
    "alpha_pattern_string": {"alpha_pattern": "x"},
    "alpha_pattern_bad_value": {"alpha_pattern": {"q_proj": [1]}},
    "alpha_pattern_nan": {"alpha_pattern": {"q_proj": float("nan")}},
    "rslora_string": {"use_rslora": "yes"}, "fan_in_fan_out_string": {"fan_in_fan_out": "no"},
    "fan_in_fan_out_true": {"fan_in_fan_out": True},
    "dora_string": {"use_dora": "yes"}, "peft_type_prefix": {"peft_type": "PREFIX_TUNING"},
    "peft_type_int": {"peft_type": 3}, "bias_weird": {"bias": 5},
    "missing_r": {"r": ...}, "missing_alpha": {"lora_alpha": ...},
    "missing_target": {"target_modules": ...}, "missing_peft_type": {"peft_type": ...},
    "unknown_keys": {"zzz": {"a": [1, 2, {"b": None}]}},
    "layers_to_transform_str": {"layers_to_transform": "0"},
    "modules_to_save_int": {"modules_to_save": 3},
}


def peft_dir_mutations(seed_dir: str, make_dir) -> list[str]:
    """Hostile PEFT directories (created through ``make_dir(name) -> path``); returns names."""
    st_path = os.path.join(seed_dir, "adapter_model.safetensors")
    with open(st_path, "rb") as f:
        st = f.read()
    out = []

    def clone(name):
        d = make_dir(name)
        shutil.copytree(seed_dir, d)
        out.append(d)
        return d

    for name, change in PEFT_CONFIG_MUTATIONS.items():
        d = clone(f"cfg_{name}")
        cfg = dict(PEFT_CONFIG)
        for k, v in change.items():
            if v is ...:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            f.write(json.dumps(cfg))  # allow_nan: Python writes NaN/Infinity, PEFT reads them
    for name, text in {"not_json": "{r:", "list": "[]", "null": "null", "empty": "",
                       "deep": '{"r":' + "[" * 100_000 + "]" * 100_000 + "}",
                       "bad_utf8": b"\xff\xfe{}", "huge_string": json.dumps(
                           {**PEFT_CONFIG, "pad": "x" * 5_000_000}),
                       "dup_keys": '{"r": 4, "r": "x", "peft_type": "LORA", "lora_alpha": 8, '
                                   '"target_modules": ["q_proj"]}'}.items():
        d = clone(f"cfgtext_{name}")
        with open(os.path.join(d, "adapter_config.json"), "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
    d = clone("no_weights")
    os.unlink(os.path.join(d, "adapter_model.safetensors"))
    d = clone("weights_is_dir")
    os.unlink(os.path.join(d, "adapter_model.safetensors"))
    os.mkdir(os.path.join(d, "adapter_model.safetensors"))
    d = clone("config_is_dir")
    os.unlink(os.path.join(d, "adapter_config.json"))
    os.mkdir(os.path.join(d, "adapter_config.json"))
    d = clone("config_symlink_dev_zero")
    os.unlink(os.path.join(d, "adapter_config.json"))
    os.symlink("/dev/zero", os.path.join(d, "adapter_config.json"))
    d = clone("weights_symlink_dev_zero")
    os.unlink(os.path.join(d, "adapter_model.safetensors"))
    os.symlink("/dev/zero", os.path.join(d, "adapter_model.safetensors"))
    d = clone("config_fifo")
    os.unlink(os.path.join(d, "adapter_config.json"))
    os.mkfifo(os.path.join(d, "adapter_config.json"))
    d = clone("weights_fifo")
    os.unlink(os.path.join(d, "adapter_model.safetensors"))
    os.mkfifo(os.path.join(d, "adapter_model.safetensors"))
    d = clone("config_huge_sparse")
    with open(os.path.join(d, "adapter_config.json"), "r+b") as f:
        f.truncate(4 << 30)  # 4 GiB of NUL bytes, sparse: must be refused by size, not read
    for name, blob in safetensors_mutations(st, full=False):
        d = clone(f"weights_{name}")
        with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
            f.write(blob)
    return out


def pt_mutations(data: bytes) -> list[tuple[str, bytes]]:
    """Hostile ``.pt`` bytes (torch zip format) for loralib adapters and base checkpoints."""
    import io

    import torch
    cases = []
    for frac in (0, 0.1, 0.5, 0.9, 0.999):
        cases.append((f"pt_trunc_{frac}", data[:int(len(data) * frac)]))
    for pos in (0, 40, len(data) // 3, len(data) // 2, len(data) - 30):
        b = bytearray(data)
        for j in range(pos, min(pos + 8, len(b))):
            b[j] ^= 0xFF
        cases.append((f"pt_flip_at_{pos}", bytes(b)))
    cases.append(("pt_text", b"hello, not a checkpoint\n"))
    cases.append(("pt_safetensors_inside", st_build({}, [("a", "F32", [1], b"\0" * 4)])))

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    state = torch.load(io.BytesIO(data), weights_only=True)
    first = next(iter(state))
    variants = {
        "not_a_dict": [1, 2, 3], "int_value": {**state, first: 5},
        "string_value": {**state, first: "x"}, "nested": {"model": state},
        "int_keys": {1: t for t in state.values()}, "empty": {},
        "int64_tensor": {**state, first: state[first].long()},
        "zero_elements": {**state, first: state[first][:0]},
        "nan": {**state, first: state[first].clone().fill_(float("nan"))},
        "scalar": {**state, first: torch.tensor(1.0)},
        "state_dict_wrapper_bad": {"state_dict": [1]},
        "complex": {**state, first: state[first].to(torch.complex64)},
        "bool": {**state, first: state[first] > 0},
        "noncontiguous": {**state, first: state[first].t()},
        "shared_storage": {**state, first: state[first], "alias": state[first]},
        "view_of_big": {k: torch.zeros(1 << 16)[: v.numel()].view(v.shape) for k, v in
                        state.items()},
    }
    for name, obj in variants.items():
        cases.append((f"pt_{name}", saved(obj)))
    return cases


# --- special paths ---------------------------------------------------------------------------

def special_paths(root: str) -> dict[str, str]:
    """Inputs that are not regular files: symlinks and devices. Names end in .safetensors."""
    os.makedirs(root, exist_ok=True)
    out = {}

    def link(name, target):
        p = os.path.join(root, name)
        os.symlink(target, p)
        out[name] = p

    link("to_dev_zero.safetensors", "/dev/zero")
    link("to_dev_null.safetensors", "/dev/null")
    link("to_dev_urandom.safetensors", "/dev/urandom")
    d = os.path.join(root, "a_dir")
    os.mkdir(d)
    link("to_dir.safetensors", d)
    link("dangling.safetensors", os.path.join(root, "nowhere"))
    loop = os.path.join(root, "loop.safetensors")
    os.symlink(loop, loop)
    out["loop.safetensors"] = loop
    fifo = os.path.join(root, "fifo.safetensors")
    os.mkfifo(fifo)
    out["fifo.safetensors"] = fifo
    link("fifo_via_link.pt", fifo)
    sparse = os.path.join(root, "sparse_1tb.safetensors")
    # A valid loratool header whose lora_A really is 1 TiB, backed by a sparse file (no disk).
    big = 2**40
    meta = {"loratool.format": "loratool.adapter", "loratool.format_version": "1.0",
            "loratool.scaling": "standard", "loratool.alpha": "8.0",
            "loratool.target_modules": '["m"]',
            "loratool.modules": '{"m":{"kind":"linear","layout":"out_in"}}'}
    text = json.dumps({"__metadata__": meta,
                       "m.lora_A": {"dtype": "F32", "shape": [2, big // 8],
                                    "data_offsets": [0, big]},
                       "m.lora_B": {"dtype": "F32", "shape": [8, 2],
                                    "data_offsets": [big, big + 64]}}).encode()
    head = st_join_text(text, b"")
    with open(sparse, "wb") as f:
        f.write(head)
        f.truncate(len(head) + big + 64)
    out["sparse_1tb.safetensors"] = sparse
    return out


# --- command table -------------------------------------------------------------------------

_cmd_cache: dict[str, object] = {}


def command(name: str):
    """The Click command object of ``name``. A command that fails to import, however the
    import breaks, fails the test that asked for it (no "not landed yet" fallback)."""
    if name not in _cmd_cache:
        from loratool.cli import COMMANDS
        module, attr, _ = COMMANDS[name]
        _cmd_cache[name] = getattr(importlib.import_module(module), attr)
    return _cmd_cache[name]


def options_of(name: str) -> set[str]:
    cmd = command(name)
    return {o for p in cmd.params for o in (*getattr(p, "opts", ()),
                                            *getattr(p, "secondary_opts", ()))}


def _opt(name: str, *candidates: str, value: str | None = None) -> list[str]:
    opts = options_of(name)
    for c in candidates:
        if c in opts:
            return [c] if value is None else [c, value]
    return []


def _out(name: str, path: str) -> list[str]:
    return _opt(name, "-o", "--output", "--out", value=path)


@dataclass(frozen=True)
class Invocation:
    label: str
    args: tuple[str, ...]
    writes: bool = False  # produces an output file/directory


def adapter_invocations(adapter: str, seeds: Seeds, outdir: str, *, fmt: str = "loratool"
                        ) -> list[Invocation]:
    """Every existing command that takes ``adapter`` as an adapter input."""
    inv = []
    alpha = _opt("convert", "--alpha", value="8") if fmt == "loralib" else []

    def add(label, args, writes=False):
        inv.append(Invocation(label, tuple(args), writes))

    def out(tag):
        return os.path.join(outdir, f"out-{tag}")

    add("inspect", ["inspect", adapter, "--json"])
    add("inspect --stats", ["inspect", adapter, "--stats", "--json"])
    add("validate", ["validate", adapter, "--json"])
    for to in ("loratool", "peft", "kohya", "loralib"):
        if to == "loralib" and fmt != "loratool":
            continue
        suffix = "" if to == "peft" else (".pt" if to == "loralib" else ".safetensors")
        add(f"convert --to {to}", ["convert", adapter, *_out("convert",
                                    out(f"convert-{to}{suffix}")),
                                   *_opt("convert", "--to", value=to),
                                   *_with_opts("convert", alpha, "--alpha")], True)
        if fmt in ("kohya", "loralib") and "--base" in options_of("convert"):
            add(f"convert --to {to} --base", ["convert", adapter, *_out(
                "convert", out(f"convert-b-{to}{suffix}")), *_opt("convert", "--to",
                                                                   value=to),
                "--base", seeds.base, *_with_opts("convert", alpha, "--alpha")], True)
            break
    extra = _with_opts("merge", alpha, "--alpha")
    add("merge", ["merge", seeds.base, adapter, *_out("merge", out("merge.safetensors")),
                  *extra], True)
    add("merge:0.5 pt base", ["merge", seeds.base_pt, f"{adapter}:0.5",
                              *_out("merge", out("merge.pt")), *extra], True)
    force = _opt("unmerge", "--force")
    add("unmerge", ["unmerge", seeds.merged, adapter, *force,
                    *_out("unmerge", out("unmerge.safetensors")),
                    *_with_opts("unmerge", alpha, "--alpha")], True)
    add("resize --rank 2", ["resize", adapter, *_opt("resize", "--rank", value="2"),
                            *_out("resize", out("resize.safetensors")),
                            *_with_opts("resize", alpha, "--alpha")], True)
    add("compose", ["compose", adapter, f"{seeds.loratool2}:-0.5",
                    *_out("compose", out("compose.safetensors")),
                    *_with_opts("compose", alpha, "--alpha")], True)
    add("compare", ["compare", adapter, seeds.loratool2,
                    *_opt("compare", "--json"), *_with_opts("compare", alpha, "--alpha")])
    return inv


def _with_opts(name, args, flag):
    return list(args) if args and flag in options_of(name) else []


def base_invocations(base: str, seeds: Seeds, outdir: str, *, suffix=".safetensors"
                     ) -> list[Invocation]:
    """Every existing command that takes ``base`` as a base checkpoint."""
    inv = []
    inv.append(Invocation("merge (base)", ("merge", base, seeds.loratool, *_out(
        "merge", os.path.join(outdir, "out-merge" + suffix))), True))
    inv.append(Invocation("unmerge (base)", ("unmerge", base, seeds.loratool,
                                             *_opt("unmerge", "--force"), *_out(
                                                 "unmerge", os.path.join(
                                                     outdir, "out-unmerge" + suffix))),
                          True))
    return inv


# --- running -------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the in-process hang guard (not an Exception: nothing may swallow it)."""


@contextlib.contextmanager
def hang_guard(seconds: int):
    def fire(signum, frame):
        raise Hang(f"no result after {seconds}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def address_space_bound(extra: int = 3 << 30):
    """Lower the soft RLIMIT_AS to the current size plus ``extra`` while the block runs, so
    that an allocation of terabytes fails (MemoryError) instead of thrashing the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None
    label: str = ""


def run_inprocess(args, *, timeout: int = 60, bound: bool = True) -> Result:
    from click.testing import CliRunner

    from loratool import console
    from loratool.cli import main
    console.reset()
    runner = CliRunner()
    ctx = address_space_bound() if bound else contextlib.nullcontext()
    try:
        with hang_guard(timeout), ctx:
            r = runner.invoke(main, list(args), catch_exceptions=True)
    except Hang as e:
        console.reset()
        return Result(-999, "", f"<hang: {e}>")
    console.reset()
    exc = r.exception if not isinstance(r.exception, SystemExit) else None
    return Result(r.exit_code, r.stdout, r.stderr, exc)


CHILD = (
    "import resource, sys\n"
    "lim = int(sys.argv[1]); fs = int(sys.argv[2])\n"
    "if lim: resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
    "if fs:\n"
    "    import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (fs, fs))\n"
    "sys.argv = ['loratool'] + sys.argv[3:]\n"
    "from loratool.cli import main\n"
    "main()\n"
)


def child_argv(args, *, mem: int = 3 << 30, fsize: int = 0) -> list[str]:
    return [sys.executable, "-c", CHILD, str(mem), str(fsize), *args]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LORATOOL_DEBUG", None)
    env["COLUMNS"] = "200"
    return env


def run_subprocess(args, *, timeout: int = 60, mem: int = 3 << 30, fsize: int = 0) -> Result:
    try:
        p = subprocess.run(child_argv(args, mem=mem, fsize=fsize), capture_output=True,
                           timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return Result(-999, (e.stdout or b"").decode(errors="replace"),
                      (e.stderr or b"").decode(errors="replace") + f"\n<hang: {timeout}s>")
    return Result(p.returncode, p.stdout.decode(errors="replace"),
                  p.stderr.decode(errors="replace"))


ERROR_RE = re.compile(r"^Error: \[LT\d{3}\]")


def problem(args, r: Result) -> str | None:
    """None when ``r`` is an acceptable outcome of ``args``; otherwise what is wrong."""
    out = r.stdout + r.stderr
    if r.exception is not None:
        return f"uncaught {type(r.exception).__name__}: {r.exception}"
    if "Traceback (most recent call last)" in out:
        return "traceback printed: " + out[-600:]
    if r.exit_code == -999:
        return "hang: " + r.stderr[-300:]
    if r.exit_code == 2 and "Error: Invalid value for" in r.stderr:
        # Click's own usage error for a path argument (dangling link, loop, -o a directory):
        # the house convention for usage errors is exit 2.
        return None
    if r.exit_code not in (0, 1):
        return f"exit code {r.exit_code}: {out[-600:]}"
    if r.exit_code == 1:
        if args[0] == "validate" and not r.stderr.strip():
            try:
                report = json.loads(r.stdout)
            except ValueError:
                return "validate exit 1 without JSON report: " + r.stdout[-300:]
            codes = [f["code"] for f in report.get("files", [{}])[0].get("findings", [])]
            if report.get("valid") is not False or not codes:
                return f"validate exit 1 but report says {report!r:.300}"
            if any(not re.fullmatch(r"LT\d{3}", c) or c == "LT000" for c in codes):
                return f"validate finding codes {codes}"
            return None
        # Warnings may precede the error on stderr; the error line itself must be coded.
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        first = errors[0] if errors else ""
        if not ERROR_RE.match(first):
            return f"exit 1 without an 'Error: [LTnnn]' line on stderr: {r.stderr[-400:]!r}"
        if first.startswith("Error: [LT000]"):
            return "internal error: " + first[:600]
    return None


# --- input integrity -----------------------------------------------------------------------

def tree_hashes(paths) -> dict[str, str]:
    """sha256 of every regular file at or under each path (symlinks not followed)."""
    out = {}
    for p in paths:
        if os.path.islink(p) or not os.path.exists(p):
            continue
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                for f in files:
                    fp = os.path.join(root, f)
                    if os.path.isfile(fp) and not os.path.islink(fp):
                        out[fp] = _sha(fp)
        elif os.path.isfile(p):
            out[p] = _sha(p)
    return out


def _sha(path: str) -> str:
    h = hashlib.sha256()
    st = os.stat(path)
    if st.st_size > (256 << 20):  # sparse monsters: size + mtime is enough
        return f"size:{st.st_size}:mtime:{st.st_mtime_ns}"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_paths(args) -> list[str]:
    """Paths among ``args`` that exist before the run (outputs do not yet)."""
    out = []
    for a in args:
        a = a.rsplit(":", 1)[0] if ":" in a and not os.path.exists(a) else a
        if os.path.isabs(a) and os.path.lexists(a):
            out.append(a)
    return out


def fuzz_examples(default: int) -> int:
    """Number of hypothesis examples: ``default`` in CI, LORATOOL_FUZZ_EXAMPLES when set."""
    return int(os.environ.get("LORATOOL_FUZZ_EXAMPLES", default))


def long_fuzz() -> bool:
    return "LORATOOL_FUZZ_EXAMPLES" in os.environ
