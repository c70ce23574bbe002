"""The command table and the runners of the adversarial suites.

* every CLI command, as argument lists built from the command's real Click options; a
  command that fails to import fails the tests that use it (no "not landed yet" fallback);
* runners: in process through Click's CliRunner (with a hang guard and an address-space
  bound) and in a subprocess (timeout, RLIMIT_AS), and the one assertion every case obeys;
* input integrity: hashes of every file a command reads, before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass

from _hostile_seeds import REPO, Seeds

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
