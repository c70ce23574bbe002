"""Adapters initialised from the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): their base is
the residual model made at initialisation, not the original base (spec/merge.md, LT419).

Such an adapter records its initialisation (``Adapter.init``, metadata ``loratool.init``);
``merge`` refuses it unless told that the base given is that residual model.
"""

from __future__ import annotations

from ..errors import CheckpointError


def init_of(src, adapter) -> dict | None:
    """The recorded initialisation of a loaded adapter (numpy-loaded loratool files: header)."""
    init = getattr(adapter, "init", None)
    if init is None and isinstance(src, str) and not hasattr(adapter, "init"):
        from ..format import KEY_INIT, parse_init
        from ..stfile import read_header
        text = read_header(src).metadata.get(KEY_INIT)
        init = parse_init(text) if text is not None else None
    return init


def check_residual(loaded, base_is_residual: bool) -> list[str]:
    """Refuse (LT419) adapters whose base must be a residual model, unless
    ``base_is_residual``; then one note says so. ``loaded``: (label, init) pairs."""
    found = [(label, init) for label, init in loaded if init]
    if not found:
        return []
    shown = ", ".join(f"{label} ({init.get('method')})" for label, init in found[:5]) + (
        f" ({len(found) - 5} more)" if len(found) > 5 else "")
    if not base_is_residual:
        raise CheckpointError(
            f"{len(found)} adapter(s) were initialised from their base weights: {shown}. They "
            "apply to the residual model made at initialisation (W - B0 @ A0, or the quantized "
            "base for LoftQ), not to the original base; merged into the original they give "
            "wrong weights. Merge them into that residual model and pass --base-is-residual "
            "(base_is_residual=True in adapter_options), or convert the adapter with PEFT's "
            "path_initial_model_for_weight_conversion into a plain LoRA of the original base",
            code="LT419")
    return [f"--base-is-residual: the base is taken as the residual model of {shown}"]
