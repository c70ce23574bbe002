"""The safetensors container (loratool/stfile.py): the hardened header parser against hostile
input, the streaming writer's checks, the integrity hash, and interchange with the official
``safetensors`` library in both directions."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.errors import ContainerError, LoraToolError
from loratool.numerics import nonfinite_count
from loratool.stfile import (MAX_JSON_DEPTH, MAX_NDIM, SafetensorsWriter, TensorHasher,
                             _nests_deeper, read_header, read_numpy, tensor_hash)

ENTRY = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


def write_raw(path, header, data=b"", length=None) -> str:
    """A file of: 8-byte length (``length`` may lie), header (str/bytes/obj), data."""
    if not isinstance(header, (str, bytes)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return str(path)


def header_file(tmp_path, header, data=b"\0" * 24, **kw) -> str:
    return write_raw(tmp_path / "x.safetensors", header, data, **kw)


def raises(path, code, fragment="", **kw) -> ContainerError:
    with pytest.raises(ContainerError) as e:
        read_header(path, **kw)
    assert e.value.code == code, e.value
    assert fragment in e.value.message
    assert e.value.path == os.fspath(path)
    return e.value


# --- length prefix and file -----------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_the_length_prefix(tmp_path, size):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10" * size)
    raises(p, "LT001", "too short")


def test_header_length_past_end_of_file(tmp_path):
    raises(header_file(tmp_path, {"a.lora_A": ENTRY}, length=10_000), "LT001", "runs past")


@pytest.mark.parametrize("length", [100_000_001, 2**40, 2**64 - 1])
def test_header_length_over_the_cap(tmp_path, length):
    raises(header_file(tmp_path, {"a.lora_A": ENTRY}, length=length), "LT002", "cap")


def test_cap_is_a_parameter(tmp_path):
    p = header_file(tmp_path, {"a.lora_A": ENTRY})
    raises(p, "LT002", "exceeds the 16-byte cap", max_header=16)


def test_header_claiming_terabytes_allocates_nothing(tmp_path):
    # The length lies (1 TiB) and, under a raised cap, the read must still stop at the size
    # check; a tensor entry claiming 4 TiB of data must fail on offsets, not on allocation.
    lying = header_file(tmp_path, {"a.lora_A": ENTRY}, length=2**40)
    huge = {"a.lora_A": {"dtype": "F32", "shape": [2**20, 2**20],
                         "data_offsets": [0, 4 * 2**40]}}
    claims = write_raw(tmp_path / "claims.safetensors", huge, b"\0" * 16)
    tracemalloc.start()
    try:
        raises(lying, "LT001", "runs past", max_header=2**62)
        raises(lying, "LT002")
        raises(claims, "LT008", "tensors cover")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_directory_and_missing_file(tmp_path):
    raises(tmp_path, "LT001", "directory")
    raises(tmp_path / "nope.safetensors", "LT001", "cannot read")


# --- header JSON ----------------------------------------------------------------------------

@pytest.mark.parametrize("header, code, fragment", [
    (b"", "LT003", "does not start with '{'"),
    (b" {}", "LT003", "does not start with '{'"),
    (b"[]", "LT003", "does not start with '{'"),
    (b'{"\xff\xfe":1}', "LT003", "not valid UTF-8"),
    (b'{"a.lora_A": }', "LT003", "not valid JSON"),
    (b"{} trailing", "LT003", "not valid JSON"),
    # 1e999... parses as float inf: a shape of non-integers, not a JSON error.
    (b'{"a.lora_A":{"dtype":"F32","shape":[1e999999999],"data_offsets":[0,0]}}', "LT006",
     "shape"),
])
def test_header_not_a_utf8_json_object(tmp_path, header, code, fragment):
    raises(header_file(tmp_path, header, b""), code, fragment)


def _nested(depth: int) -> str:
    """A header whose deepest value nests ``depth`` levels (the root object is level 1)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return ('{"a.lora_A":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"x":'
            + inner + "}}")


def test_nesting_limit(tmp_path):
    ok = header_file(tmp_path, _nested(MAX_JSON_DEPTH))  # unknown entry fields are ignored
    assert list(read_header(ok).tensors) == ["a.lora_A"]
    raises(header_file(tmp_path, _nested(MAX_JSON_DEPTH + 1)), "LT003", "nests deeper")


def test_deep_nesting_is_refused_before_the_json_parser(tmp_path):
    # 200,000 levels would exhaust Python's recursion; the bracket count refuses it first.
    raises(header_file(tmp_path, "{" + '"a":' * 1 + "[" * 200_000 + "]" * 200_000 + "}", b""),
           "LT003", "nests deeper")


def _reference_depth(text: str) -> int:
    """Nesting depth by a plain character walk (the oracle for the C-speed check)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\u00e9'),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(alphabet='[]{}"\\x', max_size=3), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(value=json_values, limit=st.integers(0, 9), chunk=st.sampled_from([1, 2, 7, 1 << 20]))
def test_nesting_check_matches_a_character_walk(value, limit, chunk):
    text = json.dumps(value, ensure_ascii=bool(limit % 2))
    assert _nests_deeper(text.encode("utf-8"), limit, chunk) == (
        _reference_depth(text) > limit)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    meta = {"__metadata__": {"note": "[[[[[[[[[[{{{{{{{{{{ \\\" ]]]"}, "a.lora_A": ENTRY}
    assert read_header(header_file(tmp_path, meta)).metadata["note"].startswith("[[[[")


@pytest.mark.parametrize("header", [
    '{"a.lora_A":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
    '"a.lora_A":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}',
    '{"__metadata__":{"k":"1","k":"2"},"a.lora_A":{"dtype":"F32","shape":[2,3],'
    '"data_offsets":[0,24]}}',
    '{"a.lora_A":{"dtype":"F32","dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}',
])
def test_duplicate_keys(tmp_path, header):
    raises(header_file(tmp_path, header), "LT004", "twice")


@pytest.mark.parametrize("meta, fragment", [
    (["x"], "not a JSON object"),
    ("text", "not a JSON object"),
    ({"k": 1}, "is int"),
    ({"k": None}, "is NoneType"),
    ({"k": ["a"]}, "is list"),
    ({"k": {"a": "b"}}, "is dict"),
])
def test_metadata_is_an_object_of_strings(tmp_path, meta, fragment):
    raises(header_file(tmp_path, {"__metadata__": meta, "a.lora_A": ENTRY}), "LT005", fragment)


def test_null_metadata_is_no_metadata(tmp_path):
    assert read_header(header_file(tmp_path, {"__metadata__": None, "a.lora_A": ENTRY})
                       ).metadata == {}


@pytest.mark.parametrize("entry, code, fragment", [
    ("F32", "LT006", "not a JSON object"),
    ({"dtype": "F32", "shape": [2, 3]}, "LT006", "lacks data_offsets"),
    ({"shape": [2, 3], "data_offsets": [0, 24]}, "LT006", "lacks dtype"),
    ({"dtype": "F12", "shape": [2, 3], "data_offsets": [0, 24]}, "LT006", "dtype 'F12'"),
    ({"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 24]}, "LT006", "dtype 'F4'"),
    ({"dtype": 4, "shape": [2, 3], "data_offsets": [0, 24]}, "LT006", "dtype 4"),
    ({"dtype": "F32", "shape": "2x3", "data_offsets": [0, 24]}, "LT006", "shape"),
    ({"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}, "LT006", "shape"),
    ({"dtype": "F32", "shape": [2, 3.0], "data_offsets": [0, 24]}, "LT006", "shape"),
    ({"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 24]}, "LT006", "shape"),
    ({"dtype": "F32", "shape": [2**63], "data_offsets": [0, 24]}, "LT006", "shape"),
    ({"dtype": "F32", "shape": [1] * (MAX_NDIM + 1), "data_offsets": [0, 4]}, "LT006",
     "at most 16"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": "0-24"}, "LT008", "data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24, 48]}, "LT008", "data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [-24, 0]}, "LT008", "data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}, "LT008", "begin <= end"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [False, 24]}, "LT008", "data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 2**64]}, "LT008", "data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}, "LT007", "needs 24 bytes"),
    ({"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}, "LT007", "needs 12 bytes"),
])
def test_bad_tensor_entries(tmp_path, entry, code, fragment):
    raises(header_file(tmp_path, {"a.lora_A": entry}), code, fragment)


def test_huge_numbers(tmp_path):
    # 5000 digits is past Python's int-parsing limit: a clean LT003, no ValueError escapes.
    raises(header_file(tmp_path, '{"a.lora_A":{"dtype":"F32","shape":[' + "9" * 5000
                       + '],"data_offsets":[0,24]}}'), "LT003")
    big = {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 24]}
    raises(header_file(tmp_path, {"a.lora_A": big}), "LT006", "shape")
    # Each dimension fits in 63 bits but the product does not: Python ints, no overflow.
    wide = {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 24]}
    raises(header_file(tmp_path, {"a.lora_A": wide}), "LT007", "needs 85070591730234615")
    far = {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 2**95]}
    raises(header_file(tmp_path, {"a.lora_A": far}), "LT008", "data_offsets")
    nan = '{"a.lora_A":{"dtype":"F32","shape":[NaN],"data_offsets":[0,24]}}'
    raises(header_file(tmp_path, nan), "LT006", "shape")


@pytest.mark.parametrize("offsets_b, data_len, fragment", [
    ([16, 40], 40, "overlaps"),
    ([28, 52], 52, "leaves a gap"),
    ([24, 48], 52, "trailing bytes"),
    ([24, 48], 44, "truncated"),
])
def test_data_must_be_contiguous_and_fully_covered(tmp_path, offsets_b, data_len, fragment):
    header = {"a.lora_A": ENTRY,
              "a.lora_B": {"dtype": "F32", "shape": [2, 3], "data_offsets": offsets_b}}
    raises(header_file(tmp_path, header, b"\0" * data_len), "LT008", fragment)


def test_order_of_entries_does_not_matter_and_empty_tensors_are_allowed(tmp_path):
    header = {"b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "a": {"dtype": "F32", "shape": [0, 3], "data_offsets": [24, 24]},
              "s": {"dtype": "F64", "shape": [], "data_offsets": [24, 32]}}
    data = np.arange(6, dtype="<f4").tobytes() + np.float64(2.5).tobytes()
    h = read_header(header_file(tmp_path, header, data))
    assert list(h.tensors) == ["b", "a", "s"]  # file (offset) order
    np.testing.assert_array_equal(read_numpy(h, h.tensors["b"]),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
    assert read_numpy(h, h.tensors["a"]).shape == (0, 3)
    assert read_numpy(h, h.tensors["s"]) == 2.5


def test_trailing_space_padding_is_allowed(tmp_path):
    text = json.dumps({"a.lora_A": ENTRY}) + " " * 5
    h = read_header(header_file(tmp_path, text))
    assert h.header_size == len(text) and h.data_start == 8 + len(text)
    assert h.tensors["a.lora_A"].nbytes == 24


def test_errors_render_with_code_and_path(tmp_path):
    p = header_file(tmp_path, {"a.lora_A": ENTRY}, length=10_000)
    with pytest.raises(LoraToolError) as e:
        read_header(p)
    assert str(e.value).startswith(f"[LT001] {p}: header length 10000")


# --- values --------------------------------------------------------------------------------

def test_nonfinite_count_reads_bf16_bit_patterns():
    bits = np.array([0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F7F, 0xFF7F, 0x0000, 0x8000, 0x3F80],
                    dtype=np.uint16)
    assert nonfinite_count(bits, "BF16") == 4  # +-Inf and two NaNs; max finite is fine
    f16 = np.array([np.inf, -np.inf, np.nan, 65504, 0], dtype=np.float16)
    assert nonfinite_count(f16, "F16") == 3
    assert nonfinite_count(np.array([1, 2], dtype=np.int32), "I32") == 0


# --- the writer ----------------------------------------------------------------------------

ENTRIES = [("a", "F32", (2, 3)), ("b", "F16", (4,))]


def test_writer_round_trip_and_layout(tmp_path):
    dest = tmp_path / "w.safetensors"
    a = np.arange(6, dtype="<f4")
    b = np.array([1, 2, 3, 4], dtype="<f2")
    with SafetensorsWriter(dest, ENTRIES, {"k": "v"}) as w:
        w.write("a", a.tobytes())
        w.write("b", b)
        w.commit()
    raw = dest.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["a"]["data_offsets"] == [0, 24] and header["b"]["data_offsets"] == [24, 32]
    assert raw[8 + n:] == a.tobytes() + b.tobytes()
    h = read_header(dest)
    assert h.metadata == {"k": "v"}
    assert [os.path.basename(p) for p in os.listdir(tmp_path)] == ["w.safetensors"]


def test_writer_header_is_canonical_json(tmp_path):
    dest = tmp_path / "w.safetensors"
    with SafetensorsWriter(dest, [("z", "F32", (1,)), ("a", "F32", (1,))],
                           {"b": "\u00e9", "a": "x"}) as w:
        w.write("z", np.zeros(1, "<f4"))
        w.write("a", np.ones(1, "<f4"))
        w.commit()
    raw = dest.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode("ascii")
    assert n % 8 == 0 and text == text.rstrip(" ") + " " * (n - len(text.rstrip(" ")))
    assert text.rstrip(" ") == ('{"__metadata__":{"a":"x","b":"\\u00e9"},'
                                '"a":{"data_offsets":[4,8],"dtype":"F32","shape":[1]},'
                                '"z":{"data_offsets":[0,4],"dtype":"F32","shape":[1]}}')


def test_writer_refuses_out_of_order_and_wrong_sizes(tmp_path):
    dest = tmp_path / "w.safetensors"
    with pytest.raises(ContainerError) as e:
        with SafetensorsWriter(dest, ENTRIES) as w:
            w.write("b", np.zeros(4, "<f2"))
    assert e.value.code == "LT008" and "out of order" in e.value.message
    with pytest.raises(ContainerError) as e:
        with SafetensorsWriter(dest, ENTRIES) as w:
            w.write("a", np.zeros(5, "<f4"))
    assert e.value.code == "LT007" and "20 bytes given" in e.value.message
    with pytest.raises(ContainerError) as e:
        with SafetensorsWriter(dest, ENTRIES) as w:
            w.write("a", np.zeros(6, "<f4"))
            w.commit()
    assert e.value.code == "LT008" and "only 1 of 2" in e.value.message
    with pytest.raises(ContainerError) as e:
        SafetensorsWriter(dest, [("a", "F32", (1,)), ("a", "F32", (1,))])
    assert e.value.code == "LT004"
    assert os.listdir(tmp_path) == [], "a failed write leaves neither file nor temporary"


def test_writer_does_not_overwrite_without_permission(tmp_path):
    dest = tmp_path / "w.safetensors"
    dest.write_bytes(b"keep")
    with pytest.raises(LoraToolError) as e:
        SafetensorsWriter(dest, ENTRIES)
    assert e.value.code == "LT503"
    assert dest.read_bytes() == b"keep"
    with SafetensorsWriter(dest, [("a", "F32", (1,))], overwrite=True) as w:
        w.write("a", np.zeros(1, "<f4"))
        w.commit()
    assert read_header(dest).tensors["a"].shape == (1,)


# --- integrity hash ------------------------------------------------------------------------

def _spec_hash(items) -> str:
    """The recipe of spec section "Integrity hash", written out independently."""
    h = hashlib.sha256()
    for name, dtype, shape, data in sorted(items, key=lambda it: it[0].encode()):
        h.update(name.encode() + b"\x00" + dtype.encode() + b"\x00"
                 + ("[" + ",".join(map(str, shape)) + "]").encode() + b"\x00"
                 + len(data).to_bytes(8, "little") + data)
    return "sha256:" + h.hexdigest()


def test_tensor_hash_recipe():
    items = [("m.lora_B", "F32", (3, 2), np.arange(6, dtype="<f4").tobytes()),
             ("m.lora_A", "BF16", (2, 1), b"\x80\x3f\x00\x40"),
             ("e", "F64", (0,), b""),
             ("s", "F16", (), b"\x00\x3c")]
    assert tensor_hash(items) == _spec_hash(items)
    assert tensor_hash(reversed(items)) == tensor_hash(items)
    h = TensorHasher()
    for name, dtype, shape, data in sorted(items):
        h.begin(name, dtype, shape, len(data))
        h.update(data[:1])
        h.update(data[1:])  # chunked feeding gives the same digest
    assert h.hexdigest() == _spec_hash(items)
    # Each part of the recipe matters: dtype, shape and name change the digest.
    changed = [("m.lora_B", "F32", (2, 3), items[0][3]), *items[1:]]
    assert tensor_hash(changed) != tensor_hash(items)


# --- the official safetensors library ------------------------------------------------------

def test_our_files_load_with_safetensors(tmp_path, tiny_adapter):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from loratool.adapter import save_adapter
    from loratool.interop.native import canonical_tensors
    tiny_adapter.modules["conv1"].A = tiny_adapter.modules["conv1"].A.to(torch.bfloat16)
    tiny_adapter.modules["conv1"].B = tiny_adapter.modules["conv1"].B.to(torch.bfloat16)
    tiny_adapter.modules["embed"].A = tiny_adapter.modules["embed"].A.to(torch.float16)
    tiny_adapter.modules["embed"].B = tiny_adapter.modules["embed"].B.to(torch.float16)
    path = str(tmp_path / "a.safetensors")
    save_adapter(tiny_adapter, path)
    loaded = load_file(path)
    expected = canonical_tensors(tiny_adapter)
    assert loaded.keys() == expected.keys()
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    with safe_open(path, "pt") as f:
        assert f.metadata() == read_header(path).metadata


def test_safetensors_files_load_with_loratool(tmp_path):
    import torch
    from safetensors.torch import save_file

    from loratool.adapter import load_adapter
    from loratool.tensors import read_tensor
    g = torch.Generator().manual_seed(3)
    tensors = {"x.lora_A": torch.randn(2, 5, generator=g).to(torch.bfloat16),
               "x.lora_B": torch.randn(4, 2, generator=g).to(torch.bfloat16),
               "big": torch.randn(3, 7, generator=g, dtype=torch.float64),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5, dtype=torch.float16),
               "ints": torch.arange(5, dtype=torch.int64)}
    path = str(tmp_path / "st.safetensors")
    save_file(tensors, path, metadata={"who": "safetensors"})
    h = read_header(path)
    assert h.metadata == {"who": "safetensors"}
    for name, t in tensors.items():
        assert torch.equal(read_tensor(h, h.tensors[name]), t), name

    # A loratool adapter written by the safetensors library (its own layout) reads back.
    meta = {"loratool.format": "loratool.adapter", "loratool.format_version": "1.0",
            "loratool.scaling": "standard", "loratool.alpha": "4.0",
            "loratool.target_modules": '["x"]',
            "loratool.modules": '{"x":{"kind":"linear","layout":"out_in"}}'}
    ad_path = str(tmp_path / "adapter.safetensors")
    save_file({k: tensors[k] for k in ("x.lora_A", "x.lora_B")}, ad_path, metadata=meta)
    ad = load_adapter(ad_path)
    assert torch.equal(ad.modules["x"].A, tensors["x.lora_A"])
    assert ad.modules["x"].scale == 2.0
