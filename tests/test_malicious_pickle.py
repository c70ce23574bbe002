"""Malicious pickles: every command refuses them, and the code inside never runs.

Each file holds an object whose unpickling would create a marker file (through os.system,
open-for-write or exec). The files come in every shape a pickle reaches loratool in: torch's
zip format (``torch.save``), torch's legacy format, a raw pickle stream named ``.pt``/``.bin``/
``.pth``/``.ckpt``, a state dict mixing real tensors with one poisoned entry, and a PEFT
directory whose weights are a poisoned ``adapter_model.bin``. Every existing command that takes
the file as an adapter or as a base checkpoint must end with ``Error: [LTnnn]`` (exit 1) and
the marker must never appear. A static check asserts the library has no unpickling path other
than ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import pickle
import shutil

import pytest

import _hostile_helpers as H


class _Payload:
    """Unpickling this object calls ``how`` with arguments that create ``marker``."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "open":
            return open, (self.marker, "w")
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _evil_files(root: str, markers: str) -> dict[str, str]:
    import torch
    os.makedirs(root, exist_ok=True)
    os.makedirs(markers, exist_ok=True)
    files = {}

    def marker(name):
        return os.path.join(markers, name + ".marker")

    def zip_pt(name, obj, **kw):
        path = os.path.join(root, name)
        torch.save(obj, path, **kw)
        files[name] = path

    for how in ("system", "open", "exec"):
        zip_pt(f"zip_{how}.pt", {"layers.0.q_proj.lora_A": _Payload(marker(f"zip_{how}"), how)})
    zip_pt("legacy_system.pt", {"x": _Payload(marker("legacy"), "system")},
           _use_new_zipfile_serialization=False)
    g = torch.Generator().manual_seed(0)
    zip_pt("mixed.pt", {"layers.0.q_proj.lora_A": torch.randn(4, 12, generator=g),
                        "layers.0.q_proj.lora_B": torch.randn(10, 4, generator=g),
                        "layers.0.v_proj.lora_A": _Payload(marker("mixed"), "open")})
    zip_pt("wrapped.pt", {"state_dict": {"w": _Payload(marker("wrapped"), "exec")}})
    zip_pt("base_like.pt", {**H.base_state(), "norm.weight": _Payload(marker("base_like"),
                                                                       "system")})
    for suffix in (".pt", ".bin", ".pth", ".ckpt"):
        path = os.path.join(root, "raw" + suffix)
        with open(path, "wb") as f:
            pickle.dump({"w": _Payload(marker("raw" + suffix), "system")}, f, protocol=2)
        files["raw" + suffix] = path
    # a bare top-level payload, not inside a dict
    path = os.path.join(root, "bare.pt")
    with open(path, "wb") as f:
        pickle.dump(_Payload(marker("bare"), "open"), f)
    files["bare.pt"] = path
    # a PEFT directory whose only weights are a poisoned adapter_model.bin
    d = os.path.join(root, "peft_evil")
    os.makedirs(d)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(H.PEFT_CONFIG, f)
    torch.save({"base_model.model.layers.0.q_proj.lora_A.weight": _Payload(marker("peft"),
                                                                             "system")},
               os.path.join(d, "adapter_model.bin"))
    files["peft_evil"] = d
    # the same poisoned .bin beside a config, passed as the file itself
    files["peft_evil/adapter_model.bin"] = os.path.join(d, "adapter_model.bin")
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pickle"))
    seeds = H.build_seeds(os.path.join(root, "seeds"))
    markers = os.path.join(root, "markers")
    files = _evil_files(os.path.join(root, "evil"), markers)
    return seeds, files, markers, root


def _markers(markers: str) -> list[str]:
    return sorted(glob.glob(os.path.join(markers, "*")))


def test_payloads_would_run(tmp_path):
    """Sanity: the payloads do create their marker under plain pickle (so the tests mean
    something). Runs them in this test process, on purpose, once."""
    marker = str(tmp_path / "m")
    for how in ("system", "open", "exec"):
        obj = pickle.loads(pickle.dumps(_Payload(marker, how)))
        if hasattr(obj, "close"):
            obj.close()
        assert os.path.exists(marker), how
        os.unlink(marker)


def _invocations(seeds, path, outdir):
    inv = list(H.adapter_invocations(path, seeds, outdir, fmt="loralib"))
    inv += H.base_invocations(path, seeds, outdir, suffix=".pt")
    inv.append(H.Invocation("compose (second)", ("compose", seeds.loratool, path, "-o",
                                                 os.path.join(outdir, "c.safetensors")),
                            True))
    inv.append(H.Invocation("merge (second adapter)", (
        "merge", seeds.base, seeds.loratool, path, "-o",
        os.path.join(outdir, "m2.safetensors")), True))
    return inv


@pytest.mark.slow
def test_every_command_refuses_malicious_pickles(env):
    seeds, files, markers, root = env
    outdir = os.path.join(root, "out")
    os.makedirs(outdir)
    failures = []
    runs = 0
    for name, path in files.items():
        for inv in _invocations(seeds, path, outdir):
            before = H.tree_hashes([path])
            r = H.run_inprocess(inv.args, timeout=60)
            runs += 1
            why = H.problem(inv.args, r)
            if why is None and r.exit_code != 1:
                why = f"exit {r.exit_code}: a poisoned pickle must be refused"
            if _markers(markers):
                why = f"CODE RAN: {_markers(markers)}"
                for m in _markers(markers):
                    os.unlink(m)
            if why is None and H.tree_hashes([path]) != before:
                why = "input modified"
            if why:
                failures.append((name, inv.label, why))
            for n in os.listdir(outdir):
                p = os.path.join(outdir, n)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    print(f"\n[test_malicious_pickle] {runs} command runs on {len(files)} poisoned files")
    assert not failures, "\n".join(f"[{lab}] {n}: {w[:400]}" for n, lab, w in failures)


@pytest.mark.slow
def test_subprocess_refuses_malicious_pickles(env):
    """The installed entry point in a real process, for the two most common uses."""
    seeds, files, markers, root = env
    jobs = [["inspect", files["zip_system.pt"]], ["validate", files["raw.bin"], "--json"]]
    jobs.append(["merge", files["base_like.pt"], seeds.loratool, "-o",
                 os.path.join(root, "sub-merged.pt")])
    jobs.append(["convert", files["peft_evil"], "-o", os.path.join(root, "sub.safetensors")])
    for args in jobs:
        r = H.run_subprocess(args, timeout=120)
        assert r.exit_code == 1, (args, r.stdout, r.stderr)
        assert H.problem(args, r) is None, (args, r.stderr)
        assert not _markers(markers), (args, _markers(markers))


def test_library_refuses_malicious_pickles(env):
    from loratool.checkpoint import load_pickle_state_dict
    from loratool.errors import LoraToolError
    seeds, files, markers, root = env
    for name, path in files.items():
        if os.path.isdir(path):
            continue
        with pytest.raises(LoraToolError) as e:
            load_pickle_state_dict(path)
        assert e.value.code == "LT403", (name, e.value)
        with pytest.raises(LoraToolError):
            import loratool
            loratool.load_adapter(path, alpha=8.0)
    assert not _markers(markers)


def test_old_torch_is_refused(env, monkeypatch):
    """torch older than 2.10 lacks weights-only unpickler fixes: loading .pt is refused."""
    import torch

    from loratool.checkpoint import load_pickle_state_dict
    from loratool.errors import LoraToolError
    seeds, files, markers, root = env
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    with pytest.raises(LoraToolError) as e:
        load_pickle_state_dict(seeds.base_pt)
    assert e.value.code == "LT403" and "2.10" in str(e.value)
    from loratool.interop import base
    base._PICKLE_CACHE.clear()
    with pytest.raises(LoraToolError) as e:
        base.load_pickle(seeds.loralib)
    assert e.value.code == "LT403"


UNSAFE = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
          ("dill", "load"), ("dill", "loads"), ("marshal", "loads"), ("shelve", "open"),
          ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load")}


def test_library_has_no_unsafe_unpickling():
    """Static: no pickle.load anywhere, every torch.load passes weights_only=True, no
    numpy allow_pickle, no eval/exec."""
    pkg = os.path.join(H.REPO, "loratool")
    problems = []
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        rel = os.path.relpath(path, H.REPO)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = (fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name)
                    else None, fn.attr if isinstance(fn, ast.Attribute) else
                    getattr(fn, "id", None))
            kw = {k.arg: k.value for k in node.keywords}
            if name in UNSAFE:
                problems.append(f"{rel}:{node.lineno}: {name[0]}.{name[1]}")
            if name == ("torch", "load"):
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    problems.append(f"{rel}:{node.lineno}: torch.load without "
                                    "weights_only=True")
            if name[1] == "load" and name[0] in ("np", "numpy"):
                a = kw.get("allow_pickle")
                if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                    problems.append(f"{rel}:{node.lineno}: numpy.load with allow_pickle")
            if name == (None, "eval") or name == (None, "exec"):
                problems.append(f"{rel}:{node.lineno}: {name[1]}()")
    assert not problems, "\n".join(problems)
