"""Faults: a killed process, a full disk, and outputs that must not be written.

* SIGKILL at random points of merge, resize, compose and convert (real subprocesses on inputs
  of a few MB): the destination is absent, or the previous file intact, or the complete new
  one, never a truncated one. What a kill leaves is a temporary ``.loratool-tmp-*`` beside
  the destination (documented in SECURITY.md; a later run does not touch it).
* A full disk: the writer's file raises ENOSPC mid-write (in process), the file-size limit
  RLIMIT_FSIZE cuts every write of a real subprocess (EFBIG), and where this machine lets us
  mount one, a 64 KiB tmpfs: a clear ``Error: [LT505]``, no partial output, no temp file.
* Output equal to an input (also through a symlink), an existing output without
  ``--overwrite``, a missing or unwritable directory: clear errors, nothing changed.
Every input is hashed before and after each command.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import _hostile_helpers as H

TEMP = ".loratool-tmp-"


# --- inputs of a few MB, so that a kill lands inside the work ------------------------------

def _big_inputs(root: str) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    from loratool.adapter import save_adapter
    from loratool.model import Adapter, LoraModule
    os.makedirs(root, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    n_mod, dim, rank = 8, 512, 32
    base = {f"layers.{i}.proj.weight": torch.randn(dim, dim, generator=g) for i in range(n_mod)}
    base_path = os.path.join(root, "big_base.safetensors")
    save_file(base, base_path)  # 8 MiB
    out = {"base": base_path}
    for tag, seed in (("adapter", 1), ("adapter2", 2)):
        g = torch.Generator().manual_seed(seed)
        mods = {f"layers.{i}.proj": LoraModule(
            f"layers.{i}.proj", "linear", "out_in", torch.randn(rank, dim, generator=g),
            torch.randn(dim, rank, generator=g), 16.0) for i in range(n_mod)}
        path = os.path.join(root, f"big_{tag}.safetensors")
        save_adapter(Adapter(modules=mods, alpha=16.0), path)  # 1 MiB
        out[tag] = path
    return out


def _kill_jobs(big: dict, root: str) -> list[tuple[str, list[str], str]]:
    """(label, args without -o, output suffix) for each existing writing command."""
    jobs = []
    jobs.append(("merge", ["merge", big["base"], big["adapter"]], ".safetensors"))
    jobs.append(("resize", ["resize", big["adapter"], "--rank", "8"], ".safetensors"))
    jobs.append(("compose", ["compose", big["adapter"], f"{big['adapter2']}:-0.5"],
                 ".safetensors"))
    jobs.append(("convert-peft", ["convert", big["adapter"], "--to", "peft"], ""))
    if H.long_fuzz():
        jobs.append(("convert-kohya", ["convert", big["adapter"], "--to", "kohya"],
                     ".safetensors"))
    return jobs


def _snapshot(path: str):
    """Content of a file, or of a directory (name -> bytes), or None when absent."""
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        out = {}
        for r, _, files in os.walk(path):
            for f in files:
                with open(os.path.join(r, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(r, f), path)] = fh.read()
        return out
    with open(path, "rb") as f:
        return f.read()


def _kill_run(args, dest_dir, delay, poll_temp):
    """Start ``args``, SIGKILL it after ``delay`` seconds, or as soon as a temporary output
    appears in ``dest_dir`` (``poll_temp``); returns the exit status."""
    p = subprocess.Popen(H.child_argv(args, mem=0), env=H.child_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < 120:
            if poll_temp and any(n.startswith(TEMP) for n in os.listdir(dest_dir)):
                time.sleep(delay)
                break
            if not poll_temp and time.monotonic() - t0 >= delay:
                break
            time.sleep(0.0005 if poll_temp else 0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    return p.returncode


@pytest.mark.slow
def test_sigkill_leaves_no_partial_output(tmp_path):
    """Kill each writer at random points; the destination is absent, the old file, or complete."""
    big = _big_inputs(str(tmp_path / "in"))
    jobs = _kill_jobs(big, str(tmp_path))
    if not jobs:
        return
    rng = random.Random(int(os.environ.get("LORATOOL_FUZZ_SEED", "1234")))
    kills = 2 if not H.long_fuzz() else max(3, H.fuzz_examples(3))
    inputs_before = H.tree_hashes(big.values())

    def reference(job):
        label, args, suffix = job
        d = tmp_path / f"ref-{label}"
        d.mkdir()
        dest = str(d / f"out{suffix}")
        t0 = time.monotonic()
        r = H.run_subprocess([*args, "-o", dest], timeout=300, mem=0)
        return label, dest, time.monotonic() - t0, r

    with ThreadPoolExecutor(2) as pool:
        refs = {label: (dest, secs, r) for label, dest, secs, r in pool.map(reference, jobs)}
    for label, (dest, secs, r) in refs.items():
        assert r.exit_code == 0, (label, r.stderr)

    plan = []
    for label, args, suffix in jobs:
        ref_dest, secs, _ = refs[label]
        for k in range(kills):
            previous = k % 2 == 1  # every other run replaces an existing output (--overwrite)
            poll = k == 0
            delay = 0.0 if poll else rng.uniform(0.25 * secs, 1.05 * secs)
            plan.append((label, args, suffix, ref_dest, k, previous, poll, delay))

    def one(item):
        label, args, suffix, ref_dest, k, previous, poll, delay = item
        d = tmp_path / f"kill-{label}-{k}"
        d.mkdir()
        dest = str(d / f"out{suffix}")
        if previous:
            if suffix:
                with open(dest, "wb") as f:
                    f.write(b"previous output, must survive or be replaced whole\n" * 100)
            else:
                os.mkdir(dest)
                with open(os.path.join(dest, "old.txt"), "w") as f:
                    f.write("previous")
        old = _snapshot(dest)
        extra = ["--overwrite"] if previous else []
        rc = _kill_run([*args, "-o", dest, *extra], str(d), delay, poll)
        return item, dest, old, rc

    failures, killed = [], 0
    with ThreadPoolExecutor(2) as pool:
        for item, dest, old, rc in pool.map(one, plan):
            label, _, _, ref_dest, k, previous, poll, delay = item
            killed += rc == -signal.SIGKILL
            now = _snapshot(dest)
            if now is None and not previous:
                pass
            elif previous and now == old:
                pass
            elif now == _snapshot(ref_dest):
                pass
            elif now is None and previous and not os.path.basename(dest).endswith(
                    ".safetensors"):
                pass  # a directory replaced in two renames: killed in between, none left
            else:
                failures.append(f"{label} kill #{k} after {delay:.3f}s (rc {rc}): destination "
                                f"is neither absent, the previous output nor complete")
            for n in os.listdir(os.path.dirname(dest)):
                if n.startswith(TEMP) and not (n.endswith(".part") or ".part" in n
                                               or n.endswith(".safetensors")):
                    failures.append(f"{label}: stale temporary {n!r} is not .loratool-tmp-*.part")
    assert not failures, "\n".join(failures)
    assert H.tree_hashes(big.values()) == inputs_before
    print(f"\n[test_faults] {len(plan)} runs, {killed} killed mid-run")


def test_stale_temporaries_do_not_block_a_later_run(tmp_path, tiny_seeds):
    """A killed run's temporaries stay (clearly named); the next run succeeds beside them."""
    seeds = tiny_seeds
    writers = _writers(seeds, str(tmp_path))
    for inv in writers[:4]:
        args = list(inv.args)
        o = args.index("-o") if "-o" in args else None
        if o is None:
            continue
        dest = args[o + 1]
        parent = os.path.dirname(dest)
        stale_file = os.path.join(parent, TEMP + "deadbeef.part")
        stale_dir = os.path.join(parent, TEMP + "cafebabe.part")
        with open(stale_file, "wb") as f:
            f.write(b"x")
        os.makedirs(stale_dir, exist_ok=True)
        r = H.run_inprocess(args)
        assert r.exit_code == 0, (inv.label, r.stderr)
        assert os.path.exists(stale_file) and os.path.isdir(stale_dir)
        left = [n for n in os.listdir(parent) if n.startswith(TEMP)]
        assert sorted(left) == sorted([os.path.basename(stale_file),
                                       os.path.basename(stale_dir)]), left
        shutil.rmtree(stale_dir)
        os.unlink(stale_file)


# --- full disk -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_seeds(tmp_path_factory):
    return H.build_seeds(str(tmp_path_factory.mktemp("faultseeds")))


class _FullDisk:
    """A file object that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, f, budget):
        self._f, self._left = f, budget

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._f.write(data)

    def pwrite(self, data, offset):  # the merge's positional writes (checkpoint.StreamWriter)
        n = memoryview(data).nbytes
        if n > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        os.pwrite(self._f.fileno(), data, offset)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


_WORKING: dict = {}


def _writers(seeds, outdir):
    """Every writing invocation that succeeds on the valid seeds (a refusal such as
    `convert --to kohya` of an embedding module is correct behaviour, not a fault case)."""
    invs = [inv for inv in H.adapter_invocations(seeds.loratool, seeds, outdir) if inv.writes]
    invs += [H.Invocation("merge sharded", ("merge", seeds.base_sharded, seeds.loratool, "-o",
                                            os.path.join(outdir, "sharded-out")), True),
             H.Invocation("merge .pt", ("merge", seeds.base_pt, seeds.loratool, "-o",
                                        os.path.join(outdir, "pt-out.pt")), True)]
    if seeds.root not in _WORKING:
        ok = set()
        scratch = os.path.join(seeds.root, "_baseline")
        for inv in invs:
            os.makedirs(scratch, exist_ok=True)
            args = [os.path.join(scratch, os.path.basename(a)) if a in _outputs_of(inv) else a
                    for a in inv.args]
            if H.run_inprocess(args).exit_code == 0:
                ok.add(inv.label)
            shutil.rmtree(scratch)
        _WORKING[seeds.root] = ok
    return [inv for inv in invs if inv.label in _WORKING[seeds.root]]


def _outputs_of(inv):
    args = list(inv.args)
    return [args[i + 1] for i, a in enumerate(args) if a in ("-o", "--output")]


@pytest.mark.parametrize("budget", [0, 100, 1000])
def test_enospc_mid_write(tmp_path, tiny_seeds, monkeypatch, budget):
    """Every writer, with a disk that fills after ``budget`` bytes of an output file."""
    from loratool import atomic
    real = atomic._fdopen
    monkeypatch.setattr(atomic, "_fdopen", lambda fd: _FullDisk(real(fd), budget))
    # Writers that bypass AtomicFile are found by this test: their output would appear whole.
    outdir = str(tmp_path / "out")
    os.makedirs(outdir)
    failures = []
    for inv in _writers(tiny_seeds, outdir):
        before = H.tree_hashes([tiny_seeds.root])
        r = H.run_inprocess(inv.args)
        why = H.problem(inv.args, r)
        if why is None and r.exit_code != 1:
            why = f"exit {r.exit_code}: a full disk must fail the command"
        elif why is None and "[LT505]" not in r.stderr:
            why = f"expected Error: [LT505], got {r.stderr[:300]!r}"
        left = os.listdir(outdir)
        if why is None and left:
            why = f"left behind after ENOSPC: {left}"
        if why is None and H.tree_hashes([tiny_seeds.root]) != before:
            why = "an input changed"
        if why:
            failures.append(f"[{inv.label}] {why}")
        for n in os.listdir(outdir):
            p = os.path.join(outdir, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_file_size_limit_subprocess(tmp_path, tiny_seeds):
    """RLIMIT_FSIZE in a real process: every write beyond 2 KiB fails with EFBIG, whatever
    writes it (safetensors writer, torch.save, json): clear error, nothing left."""
    outdir = str(tmp_path / "out")
    os.makedirs(outdir)
    invs = _writers(tiny_seeds, outdir)
    if not H.long_fuzz():  # one per distinct writing path (resize/compose/unmerge save like
        # convert --to loratool); all of them in the long run
        distinct = {"convert --to loratool", "convert --to peft", "convert --to loralib",
                    "merge", "merge sharded", "merge .pt"}
        invs = [i for i in invs if i.label in distinct]

    def one(inv):
        sub = os.path.join(outdir, str(abs(hash(inv.label))))
        os.makedirs(sub)
        args = [sub if False else a for a in inv.args]
        args = [os.path.join(sub, os.path.basename(a)) if a in _outputs_of(inv) else a
                for a in args]
        return inv, sub, H.run_subprocess(args, timeout=120, mem=0, fsize=2048)

    failures = []
    before = H.tree_hashes([tiny_seeds.root])
    with ThreadPoolExecutor(2) as pool:
        for inv, sub, r in pool.map(one, invs):
            why = H.problem(inv.args, r)
            if why is None and r.exit_code != 1:
                why = f"exit {r.exit_code}"
            elif why is None and "[LT505]" not in r.stderr:
                why = f"expected [LT505]: {r.stderr[:300]!r}"
            if why is None and os.listdir(sub):
                why = f"left behind: {os.listdir(sub)}"
            if why:
                failures.append(f"[{inv.label}] {why}")
    assert H.tree_hashes([tiny_seeds.root]) == before
    assert not failures, "\n".join(failures)


def test_real_full_tmpfs(tmp_path, tiny_seeds):
    """A 64 KiB tmpfs, when this machine allows mounting one (root in a container): the real
    ENOSPC from the kernel. Skipped elsewhere; the two tests above cover the same paths."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + p.stderr.decode()[:200])
    try:
        big = _big_inputs(str(tmp_path / "in"))
        for args in (["merge", big["base"], big["adapter"]], ["resize", big["adapter"],
                                                              "--rank", "8"]):
            dest = str(mnt / "out.safetensors")
            r = H.run_inprocess([*args, "-o", dest])
            assert r.exit_code == 1, (args, r.stdout, r.stderr)
            assert r.stderr.startswith("Error: [LT505]"), r.stderr
            assert os.listdir(mnt) == [], os.listdir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --- outputs that must be refused -------------------------------------------------------

def _set_output(inv, dest):
    args = list(inv.args)
    i = args.index("-o")
    args[i + 1] = dest
    return args


def test_output_equal_to_an_input(tmp_path, tiny_seeds):
    seeds = tiny_seeds
    outdir = str(tmp_path)
    failures = []
    for inv in _writers(seeds, outdir):
        inputs = [a.rsplit(":", 1)[0] if not os.path.exists(a) else a for a in inv.args[1:]
                  if os.path.isabs(a.rsplit(":", 1)[0])]
        inputs = [p for p in inputs if os.path.exists(p) and p not in _outputs_of(inv)]
        for inp in inputs:
            link = os.path.join(outdir, "link-" + os.path.basename(inp))
            if not os.path.lexists(link):
                os.symlink(inp, link)
            for dest, how in ((inp, "itself"), (link, "via symlink")):
                for overwrite in ([], ["--overwrite"]):
                    before = H.tree_hashes([seeds.root])
                    args = _set_output(inv, dest) + overwrite
                    r = H.run_inprocess(args)
                    # LT502 (output is an input) or LT503 (exists); another LT5xx refusal
                    # of the output path (e.g. "a sharded output must be a directory") is
                    # fine too, as long as nothing was written.
                    ok = r.exit_code in (1, 2) and H.problem(args, r) is None and (
                        r.exit_code == 2 or "Error: [LT5" in r.stderr)
                    if not ok:
                        failures.append(f"[{inv.label}] -o {how} {os.path.basename(inp)} "
                                        f"{overwrite}: exit {r.exit_code} {r.stderr[:300]!r}")
                    if H.tree_hashes([seeds.root]) != before:
                        failures.append(f"[{inv.label}] input {inp} CHANGED ({how})")
                        return pytest.fail("\n".join(failures))
    assert not failures, "\n".join(failures)


def test_existing_output_without_overwrite(tmp_path, tiny_seeds):
    failures = []
    for inv in _writers(tiny_seeds, str(tmp_path)):
        dest = _outputs_of(inv)[0]
        if dest.endswith((".safetensors", ".pt")):
            with open(dest, "wb") as f:
                f.write(b"keep me")
        else:
            os.makedirs(dest)
            with open(os.path.join(dest, "keep.txt"), "wb") as f:
                f.write(b"keep me")
        old = _snapshot(dest)
        r = H.run_inprocess(inv.args)
        if r.exit_code != 1 or "[LT503]" not in r.stderr or H.problem(inv.args, r):
            failures.append(f"[{inv.label}] exit {r.exit_code} {r.stderr[:300]!r}")
        if _snapshot(dest) != old:
            failures.append(f"[{inv.label}] existing output was changed")
        left = [n for n in os.listdir(os.path.dirname(dest)) if n.startswith(TEMP)]
        if left:
            failures.append(f"[{inv.label}] temporaries left: {left}")
        shutil.rmtree(dest) if os.path.isdir(dest) else os.unlink(dest)
    assert not failures, "\n".join(failures)


def test_missing_or_unwritable_output_directory(tmp_path, tiny_seeds):
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    targets = {"missing dir": str(tmp_path / "nope" / "deeper"),
               "parent is a file": os.path.join(tiny_seeds.loratool, "x"),
               "read-only dir": str(ro)}
    if os.geteuid() == 0:  # root writes through mode bits: use a place nobody can create in
        targets["read-only dir"] = "/proc"
    failures = []
    try:
        for inv in _writers(tiny_seeds, str(tmp_path)):
            name = os.path.basename(_outputs_of(inv)[0])
            for tag, parent in targets.items():
                args = _set_output(inv, os.path.join(parent, name))
                before = H.tree_hashes([tiny_seeds.root])
                r = H.run_inprocess(args)
                if r.exit_code not in (1, 2) or H.problem(args, r) or (
                        r.exit_code == 1 and not any(c in r.stderr for c in
                                                     ("[LT504]", "[LT505]"))):
                    failures.append(f"[{inv.label}] {tag}: exit {r.exit_code} "
                                    f"{r.stderr[:300]!r}")
                if H.tree_hashes([tiny_seeds.root]) != before:
                    failures.append(f"[{inv.label}] {tag}: an input changed")
    finally:
        os.chmod(ro, 0o700)
    assert not os.listdir(ro)
    assert not failures, "\n".join(failures)
