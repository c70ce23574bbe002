"""Seed files of every supported format for the adversarial suites: tiny and matching one
another (an adapter of each format fits the base checkpoints), built in a temporary
directory (``build_seeds``)."""

from __future__ import annotations

import json
import os
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
    from _factory import four_kinds
    return four_kinds(seed, rank=rank, alpha=ALPHA, b_scale=scale_b)


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
    from _hostile_commands import run_inprocess  # the runners need Seeds: import when used
    out = os.path.join(root, "merged.safetensors")
    r = run_inprocess(["merge", s.base, s.loratool, "-o", out])
    if r.exit_code == 0 and os.path.exists(out):
        s.merged = out
    return s
