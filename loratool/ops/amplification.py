"""How each delta relates to its base weight: ``inspect(adapter, base=...)``.

Hu et al. 2021 ("LoRA", section 7.3): with U, V the top-k left and right singular vectors of
dW, ``||U^T W V||_F`` is W projected on dW's subspace; the amplification factor is
``||dW||_F / ||U^T W V||_F``. Two baselines put it in context: W projected on its own top-k
singular directions, and on a random k-dimensional subspace (seeded). Definitions and
tolerances: spec/lowrank.md section 7.

The base is streamed tensor by tensor through the checkpoint readers (memory: a few copies of
one base tensor, whatever the model's size); U and V come from the factored kernel.
Modules are matched to base tensors by the rules merge uses (loratool.naming, and merge's
orientation rule for transposed and conv weights).
"""

from __future__ import annotations

import hashlib
import os

from ..errors import CheckpointError, OperationError

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_LISTED = 40


def module_seed(seed: int, module: str) -> int:
    """The random baseline's generator seed for one module (independent of module order):
    the first 8 bytes, little-endian, of sha256("<seed>:<module>"), masked to 63 bits."""
    digest = hashlib.sha256(f"{seed}:{module}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise OperationError(f"seed {seed!r} must be an integer in [0, 2^63)", code="LT536")
    return seed


def reading_options(path: str, base, options: dict) -> dict:
    """Foreign formats read names and layouts against the base, as merge reads them."""
    from ..interop import detect_format
    if detect_format(os.fspath(path)) != "loratool":
        return {"base": os.fspath(base), **options}
    return dict(options)


def _targets(adapter, base_tensors: dict, base: str) -> dict[str, list[tuple]]:
    """base tensor name -> [(module, orientation)]; every module that cannot be analyzed
    against the base is listed in one LT411 error (DoRA modules are left out: no delta)."""
    from ..experts import is_experts
    from ..naming import resolve_modules
    from .merge.plan import _orientation, _shape_hint  # the same rule merge applies
    # DoRA has no delta; a LoRA on expert parameters (target_parameters) has one per expert,
    # which this per-matrix analysis does not cover: both are left out (no row)
    modules = {n: m for n, m in adapter.modules.items()
               if m.magnitude is None and not is_experts(m)}
    mapping, unmatched = resolve_modules(modules, list(base_tensors))
    problems = [(m, "has no target: no base tensor `" + m + ".weight` (nor one ending in it)")
                for m in unmatched]
    plan: dict[str, list[tuple]] = {}
    for module, target in sorted(mapping.items()):
        key = target + ".weight"
        dtype, shape = base_tensors[key]
        orient = _orientation(modules[module].info, shape)
        if orient is None:
            problems.append((module, _shape_hint(modules[module].info, shape)))
        elif dtype not in FLOAT_DTYPES:
            problems.append((module, f"base tensor `{key}` is {dtype}; the analysis needs "
                                     "F16, BF16, F32 or F64 weights (dequantize the base first)"))
        else:
            plan.setdefault(key, []).append((module, orient))
    if problems:
        lines = [f"  module `{m}` {why}" for m, why in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        raise CheckpointError(f"{len(problems)} adapter module(s) cannot be matched with "
                              f"{base}:\n" + "\n".join(lines), code="LT411")
    return plan


def _stream(base: str, wanted):
    """Yield (name, torch tensor) for each wanted base tensor, one at a time, in file order."""
    import torch

    from ..checkpoint import list_tensors, open_source
    from ..tensors import TORCH_DTYPES, from_bytes
    # A sharded checkpoint names each tensor's shard; a single file (safetensors or .pt)
    # names itself.
    files: dict[str, None] = {}
    for t in list_tensors(base).values():
        if t.name in wanted:
            files.setdefault(t.file, None)
    for file in files:
        with open_source(file) as source:
            for t in source.tensors:
                if t.name not in wanted:
                    continue
                if not t.nbytes:
                    yield t.name, from_bytes(b"", t.dtype, t.shape)
                    continue
                buf = bytearray(t.nbytes)
                source.read_into(t, buf)
                # A view of the buffer, not a copy: one raw copy of the tensor in memory.
                yield t.name, torch.frombuffer(buf, dtype=torch.uint8).view(
                    TORCH_DTYPES[t.dtype]).reshape(t.shape)
                del buf


def random_projection_norm(W2, k: int, seed: int, module: str) -> float:
    """||U_R^T W2 V_R||_F for the seeded random k-dimensional subspaces of ``module``."""
    import torch

    from ..linalg import projection_norm, random_basis
    g = torch.Generator().manual_seed(module_seed(seed, module))
    Ur = random_basis(W2.shape[0], k, g)
    Vr = random_basis(W2.shape[1], k, g)
    return projection_norm(W2, Ur, Vr)


def amplification_row(m, W2, seed: int) -> dict:
    """Every quantity of spec/lowrank.md section 7 for one module and its [out, n] base view."""
    import torch

    from ..linalg import projection_norm, singular_bases
    B2, A2 = m.factors(torch.float64)
    S, U, V = singular_bases(B2, A2, m.scale)
    k = U.shape[1]
    W2 = W2.to(torch.float64)
    delta_norm = float(torch.linalg.vector_norm(S))
    base_norm = float(torch.linalg.matrix_norm(W2))
    proj = projection_norm(W2, U, V)
    top = float(torch.linalg.vector_norm(torch.linalg.svdvals(W2)[:k]))
    rand = random_projection_norm(W2, k, seed, m.name)
    return {"rank": k, "delta_norm": delta_norm, "base_norm": base_norm,
            "projection_norm": proj,
            "amplification": delta_norm / proj if proj > 0 else None,
            "top_projection_norm": top, "random_projection_norm": rand}


def amplification(adapter_path: str | os.PathLike, base: str | os.PathLike, *, seed: int = 0,
                  **options) -> dict:
    """Per module the amplification analysis against ``base``: {"base", "seed", "modules":
    {name: row}, "dora": [names left out]} (rows as ``amplification_row``, plus ``base_tensor``).
    """
    check_seed(seed)
    adapter_path, base = os.fspath(adapter_path), os.fspath(base)
    if not os.path.exists(base):
        raise CheckpointError(f"base checkpoint {base} does not exist", code="LT401")
    from ..checkpoint import list_tensors
    base_tensors = {n: (t.dtype, t.shape) for n, t in list_tensors(base).items()}
    from ..adapter import load_adapter
    adapter = load_adapter(adapter_path, **reading_options(adapter_path, base, options))
    plan = _targets(adapter, base_tensors, base)
    rows = {}
    read = 0
    for name, W in _stream(base, plan):
        read += W.numel() * W.element_size()
        for module, orient in plan[name]:
            m = adapter.modules[module]
            # The [out, n] matrix that dW is added to (merge's "rows"/"cols" orientation).
            W2 = W.reshape(W.shape[0], -1) if orient == "rows" else W.T
            rows[module] = {"base_tensor": name, **amplification_row(m, W2, seed)}
        del W
    return {"base": base, "seed": seed, "bytes_read": read, "modules": rows,
            "dora": sorted(n for n, m in adapter.modules.items() if m.magnitude is not None)}


def add_amplification(report: dict, path: str, base, seed: int, options: dict) -> None:
    """Put ``amplification`` rows into an ``inspect`` report (modules without one: DoRA)."""
    result = amplification(path, base, seed=seed, **options)
    for row in report["modules"]:
        row["amplification"] = result["modules"].get(row["name"])
    amps = [r["amplification"] for r in result["modules"].values()
            if r["amplification"] is not None]
    report["base"] = {"path": result["base"], "seed": result["seed"],
                      "bytes_read": result["bytes_read"], "modules": len(result["modules"]),
                      "dora_not_analyzed": result["dora"],
                      "amplification_min": min(amps) if amps else None,
                      "amplification_max": max(amps) if amps else None}
