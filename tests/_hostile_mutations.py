"""Hostile inputs for the adversarial suites: raw safetensors surgery, mutators that turn a
valid file (safetensors, loratool metadata, kohya, a PEFT directory, a .pt pickle) into
hostile ones, each with a short case name, and special paths (symlinks, devices, FIFOs, a
sparse 1 TiB tensor)."""

from __future__ import annotations

import json
import os
import shutil
import struct

from _hostile_seeds import PEFT_CONFIG

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
