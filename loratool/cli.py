"""The ``loratool`` command line: a Click group whose commands load lazily.

Each command lives in ``loratool/commands/<name>.py`` and wraps the library function of the
same name. Commands are imported only when run, so ``--help``, ``inspect`` and ``validate``
never import torch. Errors are translated here, in one place: ``LoraToolError`` becomes
``Error: [CODE] message`` on stderr and exit code 1; Click's usage errors exit 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from . import __version__
from .rules import READ_FAILED, WRITE_FAILED

# name -> (module, attribute, one-line help shown by `loratool --help` without importing it)
COMMANDS = {
    "inspect": ("loratool.commands.inspect", "inspect_cmd",
                "Show an adapter's format, scaling and per-module ranks (header only)."),
    "validate": ("loratool.commands.validate", "validate_cmd",
                 "Check adapter files against every rule of the spec (for CI)."),
    "convert": ("loratool.commands.convert", "convert_cmd",
                "Convert between loratool, PEFT, kohya/sd-scripts and loralib adapters."),
    "merge": ("loratool.commands.merge", "merge_cmd",
              "Merge adapters into a base checkpoint, streaming, rounding once."),
    "extract": ("loratool.commands.extract", "extract_cmd",
                "Extract the LoRA adapter that turns a base checkpoint into a tuned one (inverse of merge)."),
    "unmerge": ("loratool.commands.merge", "unmerge_cmd",
                "Subtract merged adapters from a checkpoint (the inverse of merge)."),
    "resize": ("loratool.commands.resize", "resize_cmd",
               "Truncate adapter ranks exactly by SVD in factored form."),
    "compose": ("loratool.commands.compose", "compose_cmd",
                "Linear combination of adapters, exact or truncated to a rank."),
    "compare": ("loratool.commands.compose", "compare_cmd",
                "Per-module cosine similarity and norm ratio of two adapters' deltas."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        from .errors import LoraToolError
        try:
            return super().invoke(ctx)
        except LoraToolError as e:
            from .console import error
            error(str(e))
            ctx.exit(1)
        except OSError as e:
            # The atomic writers turn failed writes into LT505 (OperationError); an OSError
            # that gets here is a read of an input, unless it names one of our temporary
            # outputs (every output is written under atomic.TEMP_PREFIX first).
            from .atomic import TEMP_PREFIX
            from .console import error
            name = f" {e.filename}" if getattr(e, "filename", None) else ""
            ours = any(isinstance(f, str) and os.path.basename(f).startswith(TEMP_PREFIX)
                       for f in (e.filename, getattr(e, "filename2", None)))
            if ours:
                error(f"[{WRITE_FAILED}]{name}: {e.strerror or e}")
            else:
                error(f"[{READ_FAILED}]{name}: cannot read: {e.strerror or e}")
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MemoryError:
            # A file whose tensors really are larger than this machine's memory (the parser
            # refuses sizes the file does not back, so this is a real size, not a lie).
            from .console import error
            error("[LT590] not enough memory for the tensors of this input; nothing was "
                  "written (header-only commands such as `inspect` without --stats still work)")
            ctx.exit(1)
        except KeyboardInterrupt:
            from .console import error
            error("interrupted; no output was written")
            ctx.exit(130)
        except Exception as e:  # a bug in loratool: say so, without a traceback by default
            if os.environ.get("LORATOOL_DEBUG"):
                raise
            from .console import error
            error(f"[LT000] internal error ({type(e).__name__}: {e}); this is a loratool bug: "
                  "please report it with the command you ran (LORATOOL_DEBUG=1 shows the "
                  "traceback)")
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratool",
                      message="%(prog)s %(version)s (adapter format 1.2)")
def main():
    """loratool: inspect, validate, merge, resize, compose and convert LoRA adapters.

    Adapters may be loratool files, PEFT directories, kohya/sd-scripts files or loralib
    checkpoints; every command detects the format.

    \b
    Examples:
      loratool inspect examples/adapter.safetensors
      loratool validate adapters/ --format github
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
