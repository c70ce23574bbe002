"""Benchmark: `loratool merge` against the naive path, PEFT and the `cp` floor.

Builds a LLaMA-shaped fp32 checkpoint (random init, saved by transformers as one
model.safetensors) and a rank-16 adapter on every projection (q, k, v, o, gate, up, down), then
runs each case in a fresh process, several rounds (each round its cases in a seeded shuffled
order), sampling the process's memory from /proc/<pid>/status every few milliseconds:

  loratool   python -m loratool merge BASE ADAPTER -o OUT --device DEVICE
  naive      safetensors load_file (whole state dict) + W += s B@A + save_file
  peft       LlamaForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload
             + save_pretrained
  cp         cp BASE OUT (the I/O floor)
  torch      python -c "import torch" (the interpreter floor)
  loratool-peft   the loratool merge with the PEFT adapter file (adapter_model.safetensors)
  loratool-bf16 / cp-bf16   the merge and the copy of a bf16 copy of the base (--bf16 builds it)
  loratool-fsync / loratool-peft-fsync / cp-sync   the same with --fsync, and cp + sync FILE

Issue 11's fixture (2.8 GB fp32, 12 layers), on tmpfs and then on disk, one at a time:

    python benchmarks/merge.py --layers 12 --repeats 3 --bf16 --workdir /dev/shm --skip-check \
        --cases cp loratool loratool-peft cp-bf16 loratool-bf16 peft
    python benchmarks/merge.py --layers 12 --repeats 3 --workdir /var/tmp \
        --cases cp-sync loratool-fsync loratool-peft-fsync

Reported per case: median wall time, median peak RSS (VmHWM/VmRSS) and median peak anonymous
RSS (RssAnon: heap, not the page cache that mmap'd files add to RSS), and ratios. Run twice
with different layer counts to see that loratool's memory does not grow with the checkpoint.

    python benchmarks/merge.py --layers 4 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HIDDEN, INTER, VOCAB, HEADS = 2048, 5632, 32000, 32
RANK, ALPHA = 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(root: str, layers: int, bf16: bool = False) -> dict:
    """Base dir (config.json + model.safetensors), PEFT adapter dir, loratool adapter file;
    with ``bf16`` also a bf16 copy of the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loratool.adapter import save_adapter
    from loratool.model import Adapter, LoraModule
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                      tie_word_embeddings=False, torch_dtype="float32")
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    base_dir = os.path.join(root, "base")
    model.save_pretrained(base_dir, safe_serialization=True, max_shard_size="100GB")
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                  target_modules=TARGETS))
    modules = {}
    g = torch.Generator().manual_seed(1)
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            A = mod.lora_A["default"].weight
            B = mod.lora_B["default"].weight
            with torch.no_grad():
                B.copy_(torch.randn(B.shape, generator=g) * 0.01)
            path = name.removeprefix("base_model.model.")
            modules[path] = LoraModule(path, "linear", "out_in", A.detach().clone(),
                                       B.detach().clone(), ALPHA)
    peft_dir = os.path.join(root, "peft-adapter")
    peft_model.save_pretrained(peft_dir)
    lt_path = os.path.join(root, "adapter.safetensors")
    save_adapter(Adapter(modules=modules, alpha=ALPHA), lt_path)
    del model, peft_model
    n_modules = len(modules)
    del modules
    base = os.path.join(base_dir, "model.safetensors")
    base_bf16 = os.path.join(root, "model-bf16.safetensors")
    if bf16:
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(base, "pt") as f:
            save_file({k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}, base_bf16,
                      metadata={"format": "pt"})
    return {"base_dir": base_dir, "base": base, "peft": peft_dir, "adapter": lt_path,
            "base_bf16": base_bf16, "size": os.path.getsize(base), "modules": n_modules}


NAIVE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
base, adapter, out = sys.argv[1:4]
sd = load_file(base)
ad = load_file(adapter)
import json
from safetensors import safe_open
with safe_open(adapter, "pt") as f:
    meta = f.metadata()
alpha = float(meta["loratool.alpha"])
for k in [k for k in ad if k.endswith(".lora_A")]:
    m = k[: -len(".lora_A")]
    A, B = ad[k], ad[m + ".lora_B"]
    sd[m + ".weight"] += (alpha / A.shape[0]) * (B @ A)
save_file(sd, out, metadata={"format": "pt"})
"""

PEFT = r"""
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
base_dir, adapter_dir, out = sys.argv[1:4]
model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter_dir)
merged = model.merge_and_unload()
merged.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
"""


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: list[str], env=None) -> dict:
    """Wall time, CPU time (user + system, from wait4), peak RSS and peak anonymous RSS of
    one fresh process. CPU time is reported because wall time on a shared machine depends on
    what else runs; the ratios of CPU times are the load-independent comparison."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_rss = peak_anon = 0
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        s = _status(p.pid)
        peak_rss = max(peak_rss, s.get("VmHWM", 0), s.get("VmRSS", 0))
        peak_anon = max(peak_anon, s.get("RssAnon", 0))
        time.sleep(0.003)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed with exit code {p.returncode}")
    # (wait4's ru_maxrss is not used: a child starts with its parent's high-water mark, which
    # here is the model the benchmark built.)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": peak_rss,
            "anon": peak_anon}


def _rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def run_size(root: str, layers: int, repeats: int, device: str, cases: list[str],
             bf16: bool = False, check: bool = True) -> dict:
    # built in a child process: the model and the bf16 conversion leave the builder with
    # gigabytes of freed-but-kept heap, and that memory pressure slowed the timed runs (cp of
    # the fp32 base measured 3.7-4.1 s after an in-process build, 1.5-2.3 s otherwise)
    built = subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", root,
                            "--layers", str(layers)] + (["--bf16"] if bf16 else []),
                           check=True, stdout=subprocess.PIPE, text=True)
    data = json.loads(built.stdout.strip().splitlines()[-1])
    peft_file = os.path.join(data["peft"], "adapter_model.safetensors")
    py = sys.executable
    merge = [py, "-m", "loratool", "merge", "--device", device, "--quiet"]
    out = os.path.join(root, "out")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    commands = {
        "loratool": [py, "-m", "loratool", "merge", data["base"], data["adapter"], "-o",
                     out + ".safetensors", "--device", device, "--quiet"],
        "naive": [py, "-c", NAIVE, data["base"], data["adapter"], out + ".safetensors"],
        "peft": [py, "-c", PEFT, data["base_dir"], data["peft"], out],
        "cp": ["cp", data["base"], out + ".safetensors"],
        "torch": [py, "-c", "import torch"],
        "loratool-peft": merge + [data["base"], peft_file, "-o", out + ".safetensors"],
        "loratool-bf16": merge + [data["base_bf16"], data["adapter"], "-o",
                                  out + ".safetensors"],
        "cp-bf16": ["cp", data["base_bf16"], out + ".safetensors"],
        "loratool-fsync": merge + [data["base"], data["adapter"], "-o", out + ".safetensors",
                                   "--fsync"],
        "loratool-peft-fsync": merge + [data["base"], peft_file, "-o", out + ".safetensors",
                                        "--fsync"],
        "cp-sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', data["base"],
                    out + ".safetensors"],
    }
    for path in (data["base"], data["base_bf16"]):  # warm cache
        if os.path.exists(path):
            subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    results: dict[str, list[dict]] = {c: [] for c in cases}
    for k in range(repeats):
        # each round in its own order (seeded): on disk the run right after `cp-sync` paid
        # 1.5-2.5 s more system time, which in a fixed (or rotated) order always fell on the
        # same case; the sync after removing an output takes part of it out of the timed runs
        order = list(cases)
        random.Random(k).shuffle(order)
        for case in order:
            _rm(out)
            _rm(out + ".safetensors")
            os.sync()
            results[case].append(measure(commands[case], env))
    if check:
        _check(data, out, env)
    _rm(out)
    _rm(out + ".safetensors")
    summary = {c: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "rss",
                                                                      "anon")}
               for c, rs in results.items()}
    return {"layers": layers, "size": data["size"], "modules": data["modules"],
            "device": device, "repeats": repeats, "cases": summary, "runs": results}


def _check(data: dict, out: str, env) -> None:
    """The loratool output equals the naive fp32 merge to within fp32 rounding."""
    subprocess.run([sys.executable, "-m", "loratool", "merge", data["base"], data["adapter"],
                    "-o", out + ".safetensors", "--quiet", "--overwrite"], env=env, check=True)
    subprocess.run([sys.executable, "-c", NAIVE, data["base"], data["adapter"],
                    out + ".naive.safetensors"], env=env, check=True)
    from safetensors import safe_open
    worst = 0.0
    with safe_open(out + ".safetensors", "pt") as a, safe_open(out + ".naive.safetensors",
                                                               "pt") as b:
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    os.unlink(out + ".naive.safetensors")
    print(f"check: max |loratool - naive| = {worst:.3g}", file=sys.stderr)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(res: dict) -> str:
    cases = res["cases"]
    lines = [f"### {res['layers']} layers, {_gib(res['size'])} fp32 checkpoint, "
             f"{res['modules']} rank-{RANK} modules, device {res['device']}, "
             f"median of {res['repeats']}", "",
             "| case | wall (s) | CPU (s) | peak RSS | peak anon RSS | wall / loratool | "
             "CPU / loratool |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lt = cases.get("loratool", {})
    for c, s in cases.items():
        rw = f"{s['wall'] / lt['wall']:.2f}x" if lt else "-"
        rc = f"{s['cpu'] / lt['cpu']:.2f}x" if lt and lt["cpu"] else "-"
        lines.append(f"| {c} | {s['wall']:.2f} | {s['cpu']:.2f} | {_gib(s['rss'])} | "
                     f"{_gib(s['anon'])} | {rw} | {rc} |")
    lines.append("")
    for case, floor in (("loratool", "cp"), ("loratool-peft", "cp"),
                        ("loratool-bf16", "cp-bf16"), ("loratool-fsync", "cp-sync"),
                        ("loratool-peft-fsync", "cp-sync")):
        if case in cases and floor in cases:
            ratio = cases[case]["wall"] / cases[floor]["wall"]
            # the same ratio run by run (each round runs every case once, in turn): the
            # machine's slow and fast spells hit both sides of a pair alike
            paired = statistics.median(a["wall"] / b["wall"] for a, b in
                                       zip(res["runs"][case], res["runs"][floor]))
            lines.append(f"{case} / {floor}: wall {ratio:.2f}x (median of per-round "
                         f"ratios {paired:.2f}x)")
    if "peft" in cases and "loratool-peft" in cases:
        lines.append(f"PEFT path / loratool-peft: wall "
                     f"{cases['peft']['wall'] / cases['loratool-peft']['wall']:.2f}x")
    if lt:
        lines.append("")
        for c, label in (("peft", "PEFT / loratool (target >= 5x)"),
                         ("naive", "naive / loratool")):
            if c in cases:
                lines.append(f"{label}: wall {cases[c]['wall'] / lt['wall']:.2f}x, "
                             f"CPU {cases[c]['cpu'] / lt['cpu']:.2f}x")
        if "cp" in cases:
            lines.append(f"loratool / cp (target <= 4x): wall "
                         f"{lt['wall'] / cases['cp']['wall']:.2f}x")
        if "torch" in cases:
            # loratool merge of loratool-format adapters no longer imports torch; the import's
            # cost is shown for scale: it is what the torch-based paths pay before any work.
            lines.append(f"`import torch` alone: {cases['torch']['wall']:.2f} s wall "
                         f"({cases['torch']['wall'] / lt['wall']:.2f}x loratool merge)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8],
                    help="decoder layers per checkpoint (4 -> 1.25 GiB, 8 -> 2.0 GiB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--cases", nargs="+", default=["loratool", "naive", "peft", "cp", "torch"])
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: /tmp)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--bf16", action="store_true", help="also build a bf16 copy of the base")
    ap.add_argument("--skip-check", action="store_true",
                    help="skip the comparison with the naive merge (it needs 2 more copies)")
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:  # the child process of run_size
        data = build(args.build_only, args.layers[0], args.bf16)
        print(json.dumps(data), flush=True)
        return 0
    all_results = []
    for layers in args.layers:
        root = tempfile.mkdtemp(prefix="loratool-bench-", dir=args.workdir)
        try:
            res = run_size(root, layers, args.repeats, args.device, args.cases, args.bf16,
                           not args.skip_check)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        all_results.append(res)
        print(report(res), flush=True)
        print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
