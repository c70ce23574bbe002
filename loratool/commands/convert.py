from __future__ import annotations

import click

from .. import console
from ..interop import FORMATS
from ._options import source_options


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "dst", required=True, type=click.Path(),
              help="Output path: a .safetensors file (loratool, kohya), a directory (peft) or "
                   "a .pt file (loralib).")
@click.option("--to", "to", type=click.Choice(FORMATS),
              default="loratool", show_default=True, help="Target format.")
@source_options
@click.option("--base", type=click.Path(exists=True, dir_okay=True), default=None,
              help="Base checkpoint: recovers kohya module paths, weight layouts, loralib "
                   "embeddings and Conv2d modules.")
@click.option("--map", "name_map", multiple=True, metavar="OLD=NEW",
              help="Rename a module (or a prefix ending in '.'; NEW may be empty) and match it "
                   "to that base path. Repeatable.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def convert_cmd(src, dst, to, base, name_map, overwrite, as_json, source):
    """Convert an adapter between loratool, PEFT, kohya/sd-scripts and loralib formats.

    The source format is detected. Conversion is lossless where the target can express the
    adapter; anything folded (a per-module alpha, rsLoRA scaling) is reported, and what the
    target cannot hold (DoRA in kohya, an embedding in kohya...) is refused with the reason.
    With --to loralib, --alpha is also the lora_alpha the loralib file is meant for (the
    factors are rescaled to keep every delta exact).

    \b
    Examples:
      loratool convert peft_adapter/ -o adapter.safetensors
      loratool convert adapter.safetensors -o peft_out/ --to peft
      loratool convert lora_sd.safetensors -o out.safetensors --base unet.safetensors
      loratool convert gpt2_lora.pt -o out.safetensors --alpha 32 --enable-lora 1,0,1 \\
          --fan-in-fan-out
    """
    from ..naming import parse_map
    from ..ops.convert import convert
    report = convert(src, dst, to=to, overwrite=overwrite, base=base,
                     name_map=parse_map(name_map) or None, **source)
    data = report.to_dict()
    if as_json:
        console.print_json(data)
        # stderr too: a dropped tensor is never dropped without a word
        console.render_dropped([{"adapter": data["source"], "tensor": t}
                                for t in data["unknown_tensors"]])
        return
    c = console.out()
    reps = (f", {len(data['replacements'])} replaced tensor(s)" if data["replacements"]
            else "")
    c.print(f"{data['source']} ({data['source_format']}) -> {data['destination']} "
            f"({data['target_format']}): {data['modules']} module(s){reps}", markup=False,
            highlight=False)
    for note in data["notes"]:
        c.print(f"  note: {note}", markup=False, highlight=False)
