"""Hostile inputs against every command: each run ends with exit 0 or 1 and `Error: [LTnnn]`.

Valid seed files of every supported format (loratool, PEFT directory, kohya, loralib ``.pt``,
and base checkpoints: single safetensors, sharded directory, ``.pt``) are mutated into
hostile ones: truncation at every region boundary, header length fields of 0 / past the end /
near 2^64, broken and deeply nested or huge JSON, duplicate keys, non-string metadata,
overlapping and out-of-range offsets, shapes whose byte size overflows, unknown dtypes,
0-element tensors, NaN/Inf, PEFT configs with wrong types, sharded indexes with missing shards
or shards outside their directory, symlinks to devices, directories, nowhere and themselves,
FIFOs, and random byte flips (hypothesis).

Every command of ``loratool.cli.COMMANDS`` is exercised (the command table in
``_hostile_commands``; a command that fails to import fails its cases). Each case asserts: exit code 0 or 1 (2 only for Click's own "path does
not exist"), on 1 a first stderr line ``Error: [LTnnn]`` that is not LT000 (an internal
error), no traceback, no hang, no leftover temporary file, and every input byte-identical
afterwards. The in-process runs lower RLIMIT_AS to the process size + 3 GiB, so a header
that talks an allocation of terabytes into existence fails the case instead of the machine.

CI runs a bounded, deterministic set. ``LORATOOL_FUZZ_EXAMPLES=N`` runs N hypothesis
examples per fuzz test with fresh randomness (e.g. ``LORATOOL_FUZZ_EXAMPLES=5000 python -m
pytest tests/test_hostile.py -k fuzz``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _hostile_helpers as H

CASES_RUN = {"n": 0}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return H.build_seeds(str(tmp_path_factory.mktemp("seeds")))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hostile"))


def _clean(outdir: str) -> list[str]:
    """Empty ``outdir``; return names of temporary files left behind (a failure)."""
    left = [n for n in os.listdir(outdir) if n.startswith(".loratool-tmp-")]
    for n in os.listdir(outdir):
        p = os.path.join(outdir, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    return left


CHEAP = ("inspect", "inspect --stats", "validate")


def select(invs, case_name, *, rotate=1):
    """CI: the header/data readers on every case, plus ``rotate`` of the other commands
    chosen by a stable hash of the case name (so every command meets many cases, and the
    whole table is covered across the catalogue). LORATOOL_FUZZ_EXAMPLES: every command."""
    if H.long_fuzz() or rotate is None:
        return invs
    cheap = [i for i in invs if i.label in CHEAP]
    rest = [i for i in invs if i.label not in CHEAP]
    if len(rest) <= rotate:
        return invs
    k = zlib.crc32(case_name.encode())
    return cheap + [rest[(k + j * 7) % len(rest)] for j in range(rotate)]


def run_matrix(cases, invocations_for, outdir, *, timeout=30, failures=None, rotate=1):
    """Run the invocations of every case; return [(case, label, problem)]."""
    failures = [] if failures is None else failures
    os.makedirs(outdir, exist_ok=True)
    ran = CASES_RUN["n"]
    cases = list(cases)
    assert cases, "no case generated: the matrix would pass without running anything"
    for case_name, path in cases:
        hung = False
        for inv in select(invocations_for(path), case_name, rotate=rotate):
            if hung:  # one hang per case is reported; the rest would only burn time
                failures.append((case_name, inv.label, "skipped after a hang on this input"))
                continue
            inputs = H.input_paths(inv.args)
            before = H.tree_hashes(inputs)
            r = H.run_inprocess(inv.args, timeout=timeout)
            CASES_RUN["n"] += 1
            why = H.problem(inv.args, r)
            after = H.tree_hashes(inputs)
            if why is None and before != after:
                changed = sorted(k for k in set(before) | set(after)
                                 if before.get(k) != after.get(k))
                why = f"input modified: {changed}"
            left = _clean(outdir)
            if why is None and left:
                why = f"temporary files left behind: {left}"
            if why is not None:
                failures.append((case_name, inv.label, why))
                hung = why.startswith("hang")
    # every case yields at least one invocation (select() rotates through them)
    assert CASES_RUN["n"] - ran >= len(cases), (CASES_RUN["n"] - ran, len(cases))
    return failures


def _report(failures, limit=60):
    """Failures grouped by (input, problem), listing the commands that showed it."""
    groups: dict[tuple[str, str], list[str]] = {}
    for case, label, why in failures:
        groups.setdefault((case, why[:400]), []).append(label)
    lines = [f"{len(failures)} failing run(s), {len(groups)} distinct:"]
    for (case, why), labels in list(groups.items())[:limit]:
        lines.append(f"  {case} [{', '.join(labels)}]: {why}")
    return "\n".join(lines)


def _materialize(root, name, blob, suffix=".safetensors") -> str:
    path = os.path.join(root, name + suffix)
    with open(path, "wb") as f:
        f.write(blob)
    return path


# --- adapters -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["loratool", "kohya"])
@pytest.mark.slow
def test_safetensors_adapter_mutations(seeds, work, fmt):
    src = seeds.adapters()[fmt]
    with open(src, "rb") as f:
        data = f.read()
    root = os.path.join(work, f"st-{fmt}")
    os.makedirs(root)
    muts = H.safetensors_mutations(data)
    muts += (H.loratool_metadata_mutations(data) if fmt == "loratool"
             else H.kohya_mutations(data))
    cases = [(n, _materialize(root, n, b)) for n, b in muts]
    outdir = os.path.join(work, f"out-{fmt}")
    failures = run_matrix(cases, lambda p: H.adapter_invocations(p, seeds, outdir, fmt=fmt),
                          outdir)
    assert not failures, _report(failures)


@pytest.mark.slow
def test_peft_directory_mutations(seeds, work):
    root = os.path.join(work, "peft")
    os.makedirs(root)
    dirs = H.peft_dir_mutations(seeds.peft, lambda n: os.path.join(root, n))
    outdir = os.path.join(work, "out-peft")
    cases = [(os.path.basename(d), d) for d in dirs]
    # FIFOs and /dev/zero hang or never end if anything reads them blindly: short timeout.
    failures = run_matrix(cases, lambda p: H.adapter_invocations(p, seeds, outdir, fmt="peft"),
                          outdir, timeout=20)
    assert not failures, _report(failures)


def test_loralib_pt_mutations(seeds, work):
    with open(seeds.loralib, "rb") as f:
        data = f.read()
    root = os.path.join(work, "loralib")
    os.makedirs(root)
    cases = [(n, _materialize(root, n, b, ".pt")) for n, b in H.pt_mutations(data)]
    # the same bytes under the other pickle suffix
    cases += [(n + "_bin", _materialize(root, n, b, ".bin"))
              for n, b in H.pt_mutations(data)[:6]]
    outdir = os.path.join(work, "out-loralib")
    failures = run_matrix(cases, lambda p: H.adapter_invocations(p, seeds, outdir,
                                                                 fmt="loralib"), outdir)
    assert not failures, _report(failures)


# --- base checkpoints ---------------------------------------------------------------------

@pytest.mark.slow
def test_base_safetensors_mutations(seeds, work):
    with open(seeds.base, "rb") as f:
        data = f.read()
    root = os.path.join(work, "base-st")
    os.makedirs(root)
    cases = [(n, _materialize(root, n, b)) for n, b in H.safetensors_mutations(data)]
    outdir = os.path.join(work, "out-base-st")
    failures = run_matrix(cases, lambda p: H.base_invocations(p, seeds, outdir), outdir)
    assert not failures, _report(failures)


def test_base_pt_mutations(seeds, work):
    with open(seeds.base_pt, "rb") as f:
        data = f.read()
    root = os.path.join(work, "base-pt")
    os.makedirs(root)
    cases = [(n, _materialize(root, n, b, ".pt")) for n, b in H.pt_mutations(data)]
    outdir = os.path.join(work, "out-base-pt")
    failures = run_matrix(cases, lambda p: H.base_invocations(p, seeds, outdir, suffix=".pt"),
                          outdir)
    assert not failures, _report(failures)


def sharded_mutations(seed_dir: str, root: str) -> list[tuple[str, str]]:
    """Hostile sharded checkpoints: index and shard defects."""
    index_name = "model.safetensors.index.json"
    with open(os.path.join(seed_dir, index_name)) as f:
        index = json.load(f)
    shard1 = sorted(set(index["weight_map"].values()))[0]
    outside = os.path.join(root, "outside.safetensors")
    shutil.copy(os.path.join(seed_dir, shard1), outside)
    cases = []

    def clone(name, *, index_obj=None, index_text=None):
        d = os.path.join(root, name)
        shutil.copytree(seed_dir, d, symlinks=True)
        if index_obj is not None or index_text is not None:
            with open(os.path.join(d, index_name), "w") as f:
                f.write(index_text if index_text is not None else json.dumps(index_obj))
        cases.append((name, d))
        return d

    def remap(target):
        wm = {k: (target if v == shard1 else v) for k, v in index["weight_map"].items()}
        return {**index, "weight_map": wm}

    clone("shard_parent_dir", index_obj=remap("../outside.safetensors"))
    clone("shard_absolute", index_obj=remap(outside))
    clone("shard_subdir", index_obj=remap("sub/x.safetensors"))
    clone("shard_dotdot", index_obj=remap(".."))
    clone("shard_empty_name", index_obj=remap(""))
    clone("shard_backslash", index_obj=remap("..\\outside.safetensors"))
    clone("shard_nul", index_obj=remap("x\0y"))
    clone("shard_int", index_obj=remap(5))
    clone("shard_index_itself", index_obj=remap(index_name))
    clone("shard_missing", index_obj=remap("model-00009-of-00009.safetensors"))
    d = clone("shard_deleted")
    os.unlink(os.path.join(d, shard1))
    d = clone("shard_symlink_dev_zero")
    os.unlink(os.path.join(d, shard1))
    os.symlink("/dev/zero", os.path.join(d, shard1))
    d = clone("shard_symlink_loop")
    os.unlink(os.path.join(d, shard1))
    os.symlink(os.path.join(d, shard1), os.path.join(d, shard1))
    d = clone("shard_fifo")
    os.unlink(os.path.join(d, shard1))
    os.mkfifo(os.path.join(d, shard1))
    d = clone("shard_is_dir")
    os.unlink(os.path.join(d, shard1))
    os.mkdir(os.path.join(d, shard1))
    d = clone("shard_truncated")
    with open(os.path.join(d, shard1), "r+b") as f:
        f.truncate(40)
    d = clone("shard_bad_header_len")
    with open(os.path.join(d, shard1), "r+b") as f:
        f.write(struct.pack("<Q", 2**64 - 1))
    wm = dict(index["weight_map"])
    wm["ghost.weight"] = shard1
    clone("index_names_missing_tensor", index_obj={**index, "weight_map": wm})
    wm = dict(index["weight_map"])
    wm.pop(next(iter(wm)))
    clone("index_omits_tensor", index_obj={**index, "weight_map": wm})
    for name, text in {"not_json": "{", "list": "[]", "no_weight_map": "{}",
                       "weight_map_list": '{"weight_map": []}',
                       "weight_map_null": '{"weight_map": null}',
                       "deep": '{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}",
                       "dup_keys": '{"weight_map": {}, "weight_map": {}}'}.items():
        clone(f"index_{name}", index_text=text)
    d = clone("index_huge_sparse")
    with open(os.path.join(d, index_name), "r+b") as f:
        f.truncate(1 << 32)
    d = clone("index_fifo")
    os.unlink(os.path.join(d, index_name))
    os.mkfifo(os.path.join(d, index_name))
    d = clone("index_symlink_dev_zero")
    os.unlink(os.path.join(d, index_name))
    os.symlink("/dev/zero", os.path.join(d, index_name))
    d = clone("index_is_dir")
    os.unlink(os.path.join(d, index_name))
    os.mkdir(os.path.join(d, index_name))
    # the same tensor in two shards: ambiguous
    from safetensors.torch import save_file
    d = clone("tensor_in_two_shards")
    import torch
    first = next(iter(index["weight_map"]))
    save_file({first: torch.zeros(1)}, os.path.join(d, "extra.safetensors"))
    return cases


def test_sharded_base_mutations(seeds, work):
    root = os.path.join(work, "sharded")
    os.makedirs(root)
    cases = sharded_mutations(seeds.base_sharded, root)
    outdir = os.path.join(work, "out-sharded")
    failures = run_matrix(cases, lambda p: H.base_invocations(p, seeds, outdir, suffix=""),
                          outdir, timeout=20)
    # shards outside the directory must never be read: the error must say so
    assert not failures, _report(failures)


def test_sharded_index_outside_directory_is_refused(seeds, work):
    root = os.path.join(work, "sharded-escape")
    os.makedirs(root)
    cases = dict(sharded_mutations(seeds.base_sharded, root))
    for name in ("shard_parent_dir", "shard_absolute", "shard_subdir", "shard_dotdot"):
        r = H.run_inprocess(["merge", cases[name], seeds.loratool, "-o",
                             os.path.join(root, f"merged-{name}")])
        assert r.exit_code == 1, (name, r.stdout, r.stderr)
        assert r.stderr.startswith("Error: [LT402]"), (name, r.stderr)
        assert "shards must be plain file names in the index's directory" in r.stderr, r.stderr


# --- special paths ----------------------------------------------------------------------------

def test_special_paths(seeds, work):
    """Symlinks to devices, directories, nowhere and themselves; FIFOs; a sparse 1 TiB file."""
    specials = H.special_paths(os.path.join(work, "special"))
    outdir = os.path.join(work, "out-special")
    cases = list(specials.items())
    def invocations(p):
        out = H.adapter_invocations(p, seeds, outdir)
        if p.endswith("sparse_1tb.safetensors"):
            # validate scans all data by design (1 TiB here): its header-only mode instead
            out = [i for i in out if i.label != "validate"]
            out.append(H.Invocation("validate --header-only",
                                    ("validate", p, "--json", "--header-only")))
        return out

    failures = run_matrix(cases, invocations, outdir, timeout=10, rotate=None)
    failures = run_matrix(cases, lambda p: H.base_invocations(p, seeds, outdir), outdir,
                          timeout=10, failures=failures, rotate=None)
    assert not failures, _report(failures)


def test_sparse_terabyte_header_only(seeds, work):
    """A real 1 TiB (sparse) file: header-only inspect answers at once, nothing allocated."""
    specials = H.special_paths(os.path.join(work, "special2"))
    r = H.run_inprocess(["inspect", specials["sparse_1tb.safetensors"], "--json"])
    assert H.problem(["inspect"], r) is None, r.stderr
    r = H.run_inprocess(["inspect", specials["sparse_1tb.safetensors"], "--stats", "--json"])
    assert H.problem(["inspect"], r) is None, r.stderr


def test_output_paths_that_are_special(seeds, work):
    """-o pointing at an input through a symlink, at a dangling symlink, at a directory."""
    writers = [inv for inv in H.adapter_invocations(seeds.loratool, seeds, work)
               if inv.writes]
    if not writers:
        return
    root = os.path.join(work, "outspecial")
    os.makedirs(root)
    link_to_input = os.path.join(root, "link-to-input.safetensors")
    os.symlink(seeds.loratool, link_to_input)
    dangling = os.path.join(root, "dangling.safetensors")
    os.symlink(os.path.join(root, "nowhere", "x"), dangling)
    a_dir = os.path.join(root, "a-dir")
    os.mkdir(a_dir)
    in_a_file = os.path.join(seeds.loratool, "child.safetensors")
    failures = []
    for inv in writers:
        args = list(inv.args)
        o = next((i for i, a in enumerate(args) if a in ("-o", "--output", "--out")), None)
        if o is None:
            continue
        for tag, dest in (("link_to_input", link_to_input), ("dangling", dangling),
                          ("dir", a_dir), ("parent_is_file", in_a_file),
                          ("input_itself", seeds.loratool)):
            args[o + 1] = dest
            before = H.tree_hashes([seeds.root])
            r = H.run_inprocess(args)
            why = H.problem(args, r)
            if why is None and r.exit_code == 0:
                why = f"exit {r.exit_code}: writing to {tag} must be refused without --overwrite"
            if why is None and H.tree_hashes([seeds.root]) != before:
                why = "an input changed"
            if why:
                failures.append((tag, inv.label, why))
            assert os.path.islink(dangling) and os.path.isdir(a_dir)
    assert not failures, _report(failures)


# --- hypothesis: random corruption ----------------------------------------------------------

_counter = {"n": 0}


@st.composite
def corruptions(draw, size):
    """A list of (op, position, value) edits; positions are biased towards the header."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        region = draw(st.sampled_from(["prefix", "header", "anywhere"]))
        hi = {"prefix": 8, "header": min(size, 512), "anywhere": size}[region]
        pos = draw(st.integers(0, max(hi - 1, 0)))
        val = draw(st.integers(0, 255))
        n = draw(st.integers(1, 16))
        ops.append((op, pos, val, n))
    return ops


def corrupt(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, val, n in ops:
        pos = min(pos, len(b))
        if op == "flip" and pos < len(b):
            b[pos] ^= (val or 1)
        elif op == "set" and pos < len(b):
            b[pos:pos + n] = bytes([val]) * len(b[pos:pos + n])
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = bytes([val]) * n
        elif op == "delete":
            del b[pos:pos + n]
    return bytes(b)


def _fuzz_one(seeds, work, kind, ops, pick):
    """Corrupt one seed (kind) with ``ops``, run the cheap commands plus one picked writer."""
    _counter["n"] += 1
    root = os.path.join(work, "fuzz")
    os.makedirs(root, exist_ok=True)
    outdir = os.path.join(root, "out")
    os.makedirs(outdir, exist_ok=True)
    tag = f"f{_counter['n']}"
    if kind in ("peft_config", "peft_weights"):
        d = os.path.join(root, tag)
        shutil.copytree(seeds.peft, d)
        target = os.path.join(d, "adapter_config.json" if kind == "peft_config"
                              else "adapter_model.safetensors")
        with open(target, "rb") as f:
            blob = corrupt(f.read(), ops)
        with open(target, "wb") as f:
            f.write(blob)
        path, invs = d, H.adapter_invocations(d, seeds, outdir, fmt="peft")
    elif kind.startswith("base"):
        src = seeds.base if kind == "base" else seeds.base_pt
        suffix = ".safetensors" if kind == "base" else ".pt"
        with open(src, "rb") as f:
            path = _materialize(root, tag, corrupt(f.read(), ops), suffix)
        invs = H.base_invocations(path, seeds, outdir, suffix=suffix)
    else:
        src = seeds.adapters()[kind]
        suffix = ".pt" if kind == "loralib" else ".safetensors"
        with open(src, "rb") as f:
            path = _materialize(root, tag, corrupt(f.read(), ops), suffix)
        invs = H.adapter_invocations(path, seeds, outdir, fmt=kind)
    cheap = [i for i in invs if not i.writes]
    writers = [i for i in invs if i.writes]
    chosen = cheap + ([writers[pick % len(writers)]] if writers else [])
    failures = run_matrix([(f"{kind}:{ops}", path)], lambda p: chosen, outdir, timeout=30)
    assert not failures, _report(failures)


FUZZ_SETTINGS = settings(max_examples=H.fuzz_examples(40), derandomize=not H.long_fuzz(),
                         deadline=None, database=None, print_blob=True,
                         suppress_health_check=list(HealthCheck))


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_adapters(seeds, work, data):
    kind = data.draw(st.sampled_from(["loratool", "kohya", "loralib", "peft_config",
                                      "peft_weights"]))
    size = 600 if kind == "peft_config" else 4096
    ops = data.draw(corruptions(size))
    _fuzz_one(seeds, work, kind, ops, data.draw(st.integers(0, 20)))


@settings(max_examples=H.fuzz_examples(20), derandomize=not H.long_fuzz(), deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_bases(seeds, work, data):
    kind = data.draw(st.sampled_from(["base", "base_pt"]))
    ops = data.draw(corruptions(4096))
    _fuzz_one(seeds, work, kind, ops, data.draw(st.integers(0, 20)))


# --- real subprocesses: hangs, stderr tracebacks, memory bound -------------------------------

def _subprocess_cases(seeds, work):
    root = os.path.join(work, "sub")
    os.makedirs(root, exist_ok=True)
    with open(seeds.loratool, "rb") as f:
        data = f.read()
    muts = dict(H.safetensors_mutations(data, full=True))
    picked = {n: _materialize(root, n, muts[n]) for n in (
        "hlen_2^64-1", "shape_terabytes_consistent", "shape_overflow_i64", "deep_nest_100k",
        "huge_metadata_8MB", "zero_rank_huge_dims")}
    with open(seeds.kohya, "rb") as f:
        kd = dict(H.safetensors_mutations(f.read(), full=False))
    picked["kohya_zero_rank_huge_dims"] = _materialize(root, "kz", kd["zero_rank_huge_dims"])
    specials = H.special_paths(os.path.join(root, "special"))
    picked["fifo"] = specials["fifo.safetensors"]
    picked["sparse_1tb"] = specials["sparse_1tb.safetensors"]
    picked["dev_zero"] = specials["to_dev_zero.safetensors"]
    pdirs = H.peft_dir_mutations(seeds.peft, lambda n: os.path.join(root, "peft", n))
    for d in pdirs:
        if os.path.basename(d) in ("cfg_r_huge", "config_fifo", "weights_zero_rank_huge_dims",
                                   "cfgtext_deep"):
            picked["peft_" + os.path.basename(d)] = d
    # Each input: the header path (no torch import, fast) and, for every other input, one
    # command that loads tensors, rotating over the commands.
    heavy = ("inspect --stats", "merge", "resize --rank 2", "compose", "convert --to loratool")
    jobs = []
    for i, (name, path) in enumerate(sorted(picked.items())):
        outdir = os.path.join(root, "out-" + name)
        os.makedirs(outdir, exist_ok=True)
        fmt = "kohya" if name.startswith("kohya") else "peft" if name.startswith("peft") \
            else "loratool"
        invs = {inv.label: inv for inv in H.adapter_invocations(path, seeds, outdir, fmt=fmt)}
        want = ["inspect"] + ([heavy[(i // 2) % len(heavy)]] if i % 2 == 0 or H.long_fuzz()
                              else [])
        jobs += [(name, invs[w]) for w in want if w in invs]
    outdir = os.path.join(root, "out-base")
    os.makedirs(outdir, exist_ok=True)
    for name in ("shape_terabytes_consistent", "zero_rank_huge_dims"):
        bad = _materialize(root, "base_" + name, dict(H.safetensors_mutations(
            open(seeds.base, "rb").read(), full=False))[name])
        jobs += [("base_" + name, inv) for inv in H.base_invocations(bad, seeds, outdir)]
    jobs += [("base_fifo", inv) for inv in H.base_invocations(picked["fifo"], seeds,
                                                               outdir)]
    return jobs


@pytest.mark.slow
def test_subprocess_bounded(seeds, work):
    """The worst cases again in a real process: 3 GiB address space, 60 s, stderr checked."""
    jobs = _subprocess_cases(seeds, work)

    def one(job):
        name, inv = job
        return name, inv, H.run_subprocess(inv.args, timeout=60, mem=3 << 30)

    failures = []
    with ThreadPoolExecutor(2) as pool:
        for name, inv, r in pool.map(one, jobs):
            CASES_RUN["n"] += 1
            why = H.problem(inv.args, r)
            if why:
                failures.append((name, inv.label, why))
    assert not failures, _report(failures)


def test_base_pt_sidecar_mutations(seeds, work):
    """A .pt base carries loratool metadata in a sidecar JSON beside it: hostile sidecars."""
    from loratool.checkpoint import sidecar_path
    root = os.path.join(work, "sidecar")
    os.makedirs(root)
    cases = []
    for name, text in {"not_json": "{", "list": "[]", "non_string": '{"a": 1}',
                       "deep": "[" * 100_000 + "]" * 100_000, "bad_utf8": b"\xff{}",
                       "merged_record_garbage": '{"loratool.merged": "[[[{"}',
                       "merged_record_wrong_types": '{"loratool.merged": "[{\\"scale\\": '
                                                    '\\"x\\", \\"hash\\": 5}]"}',
                       "fifo": None, "dir": None, "dev_zero": None}.items():
        d = os.path.join(root, name)
        os.makedirs(d)
        base = os.path.join(d, "base.pt")
        shutil.copy(seeds.base_pt, base)
        side = sidecar_path(base)
        if name == "fifo":
            os.mkfifo(side)
        elif name == "dir":
            os.mkdir(side)
        elif name == "dev_zero":
            os.symlink("/dev/zero", side)
        else:
            with open(side, "wb") as f:
                f.write(text if isinstance(text, bytes) else text.encode())
        cases.append((f"sidecar_{name}", base))
    outdir = os.path.join(work, "out-sidecar")
    failures = run_matrix(cases, lambda p: H.base_invocations(p, seeds, outdir, suffix=".pt"),
                          outdir, timeout=15, rotate=None)
    assert not failures, _report(failures)
