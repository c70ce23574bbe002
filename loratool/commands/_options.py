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


_RULES = ("rank", "fro", "sv_ratio", "cumulative")
_CERTIFIED_RULES = ("max_error", "auto_rank")


def _rule_options(*, prefix: str = "", cumulative_note: str = "") -> list:
    """--rank/--fro/--sv-ratio/--cumulative, each help text after ``prefix``."""
    return [
        click.option("--rank", type=click.IntRange(min=1),
                     help=prefix + "Fixed rank K for every module."),
        click.option("--fro", type=click.FloatRange(0, 1, min_open=True),
                     help=prefix + "Smallest rank keeping fraction F of each delta's "
                                   "Frobenius norm."),
        click.option("--sv-ratio", type=click.FloatRange(min=1),
                     help=prefix + "Keep singular values s_i >= s_max / R."),
        click.option("--cumulative", type=click.FloatRange(0, 1, min_open=True),
                     help=prefix + "Smallest rank keeping fraction C of the sum of singular "
                                   "values" + (cumulative_note or ".")),
    ]


def truncation_options(f):
    """``convert``'s optional truncation of a LyCORIS module's exact plain-LoRA form: at most
    one of resize's four rules (the library refuses two), no clamps."""
    for option in reversed(_rule_options(prefix="LyCORIS sources: truncate the exact "
                                                 "plain-LoRA form. ")):
        f = option(f)
    return f


def rank_rule_options(*, certified: bool = False):
    """The rank rule of ``resize`` and ``extract``: --rank/--fro/--sv-ratio/--cumulative
    (with ``certified``, also --max-error and --auto-rank, which need the true error of each
    truncation) and the --max-rank/--min-rank clamps. Exactly one rule MUST be given (usage
    error otherwise, exit 2); the values reach the command as keyword arguments of the
    library's names (``rank``, ``fro``, ``sv_ratio``, ... ``max_rank``, ``min_rank``)."""
    names = _RULES + (_CERTIFIED_RULES if certified else ())
    options = _rule_options(cumulative_note=" (exact SVD of every tensor: slow on large ones)"
                            if certified else "")
    if certified:
        options += [
            click.option("--max-error", type=click.FloatRange(0, 1, max_open=True),
                         help="Smallest rank with ||dW - BA||_F <= E ||dW||_F (certified)."),
            click.option("--auto-rank", is_flag=True,
                         help="The singular values above the tuned dtype's rounding-noise "
                              "floor (for adapters merged into bf16/fp16 checkpoints)."),
        ]
    options += [
        click.option("--max-rank", type=click.IntRange(min=1),
                     help="Upper bound on every module's rank."),
        click.option("--min-rank", type=click.IntRange(min=1),
                     help="Lower bound on every module's rank."),
    ]

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            given = [n for n in names if kwargs[n] not in (None, False)]
            if len(given) != 1:
                flags = ["--" + n.replace("_", "-") for n in names]
                raise click.UsageError(
                    f"give exactly one of {', '.join(flags)}" + (
                        f" (got {', '.join('--' + n.replace('_', '-') for n in given)})"
                        if given else ""))
            return f(*args, **kwargs)
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate
