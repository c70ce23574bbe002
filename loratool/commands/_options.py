"""The one home of the CLI's shared options and argument parsing.

``source_options``: options of every command that reads adapters. Some formats do not store everything needed to apply an adapter: loralib checkpoints hold no
alpha, no MergedLinear mask and no weight layout; a PEFT safetensors file may come without its
adapter_config.json. These options supply the missing facts, the same way in every command.
"""

from __future__ import annotations

import functools
import os

import click


def _enable_lora(ctx, param, value):
    if value is None:
        return None
    from ..errors import InteropError
    from ..interop.base import parse_enable_lora
    try:
        return parse_enable_lora(value)
    except InteropError as e:
        raise click.BadParameter(e.message) from None


def path_numbers(what: str, code: str):
    """Click callback for ``PATH[:NUMBER]...`` arguments (``merge`` scales, ``compose``
    weights): ``guards.parse_path_number`` on each, then each path must exist."""
    def callback(ctx, param, values):
        from ..errors import LoraToolError
        from ..guards import parse_path_number
        out = []
        for text in values:
            try:
                path, number = parse_path_number(text, what=what, code=code)
            except LoraToolError as e:
                raise click.BadParameter(e.message, ctx=ctx, param=param) from None
            if not os.path.exists(path):
                hint = ("" if ":" not in text else
                        f" (read {text!r} as path {path!r}, {what} {number!r}; a {what} is "
                        "written as a trailing :NUMBER, e.g. adapter.safetensors:0.5)")
                raise click.BadParameter(f"adapter {path!r} does not exist{hint}", ctx=ctx,
                                         param=param)
            out.append((path, number))
        return out
    return callback


def source_options(f):
    """Add --alpha/--enable-lora/--fan-in-fan-out/--allow-unknown; pass them as ``source``.

    ``source`` is the dict of options for ``load_adapter``: only the options given.
    """
    @functools.wraps(f)
    def wrapper(*args, alpha, enable_lora, fan_in_fan_out, allow_unknown, **kwargs):
        source = {"alpha": alpha, "enable_lora": enable_lora,
                  "fan_in_fan_out": fan_in_fan_out, "allow_unknown": allow_unknown or None}
        return f(*args, source={k: v for k, v in source.items() if v is not None}, **kwargs)

    options = [
        click.option("--alpha", type=float, default=None,
                     help="lora_alpha of adapters whose files do not store it (loralib "
                          "checkpoints, PEFT files without adapter_config.json)."),
        click.option("--enable-lora", "enable_lora", default=None, callback=_enable_lora,
                     metavar="1,0,1", help="loralib MergedLinear mask of the fused groups "
                                           "(GPT-2 c_attn with LoRA on q and v: 1,0,1)."),
        click.option("--fan-in-fan-out/--no-fan-in-fan-out", "fan_in_fan_out", default=None,
                     help="Linear weights are stored transposed [in, out] (GPT-2 Conv1D) / "
                          "[out, in] (torch.nn.Linear), when neither the base's shapes nor its "
                          "config.json tell."),
        click.option("--allow-unknown", is_flag=True,
                     help="Ignore tensors that are not LoRA factors (they are listed) instead "
                          "of failing."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
