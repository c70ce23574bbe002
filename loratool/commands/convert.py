from __future__ import annotations

import click

from .. import console
from ..interop import FORMATS
from ._options import source_options, truncation_options


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "dst", required=True, type=click.Path(),
              help="Output path: a .safetensors file (loratool, kohya), a directory (peft), "
                   "a .pt file (loralib) or a .gguf file (gguf).")
@click.option("--to", "to", type=click.Choice(FORMATS),
              default="loratool", show_default=True, help="Target format.")
@source_options
@click.option("--base", type=click.Path(exists=True, dir_okay=True), default=None,
              help="Base checkpoint: recovers kohya module paths, weight layouts, loralib "
                   "embeddings and Conv2d modules. For GGUF (--to gguf, or a .gguf source): "
                   "a GGUF base or the base's config.json (architecture, head counts).")
@click.option("--gguf-type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
              help="With --to gguf: tensor type of the adapter (default f32).")
@click.option("--permute-qk/--no-permute-qk", "permute_qk", default=None,
              help="GGUF: whether llama.cpp permuted the q/k rows, for architectures loratool "
                   "does not know (llama: yes, qwen2/gemma/phi3...: no).")
@click.option("--map", "name_map", multiple=True, metavar="OLD=NEW",
              help="Rename a module (or a prefix ending in '.'; NEW may be empty) and match it "
                   "to that base path. Repeatable.")
@truncation_options
@click.option("--dtype", type=click.Choice(["fp64", "fp32", "fp16", "bf16"]), default=None,
              help="LyCORIS sources: dtype of the plain-LoRA factors (default fp64, exact).")
@click.option("--lycoris", "lycoris", type=click.Choice(["native", "lora"]), default="native",
              show_default=True,
              help="With --to loratool: keep LyCORIS modules as the format's LyCORIS kinds "
                   "(bit-exact, format 1.2) or write their plain-LoRA form.")
@click.option("--dense-svd", is_flag=True,
              help="LyCORIS sources: factor full `diff` modules by a dense SVD (error "
                   "reported) instead of refusing them for plain-LoRA targets.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def convert_cmd(src, dst, to, base, gguf_type, permute_qk, name_map, rank, fro, sv_ratio,
                cumulative, dtype, lycoris, dense_svd, overwrite, as_json, source):
    """Convert an adapter between loratool, PEFT, kohya/sd-scripts, loralib, LyCORIS and
    GGUF (llama.cpp) formats.

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
      loratool convert loha.safetensors -o peft_out/ --to peft --base unet.safetensors
      loratool convert lokr.safetensors -o lora.safetensors --to kohya --rank 64
      loratool convert loha.safetensors -o out.safetensors --lycoris lora --dtype fp16
      loratool convert gpt2_lora.pt -o out.safetensors --alpha 32 --enable-lora 1,0,1 \\
          --fan-in-fan-out
      loratool convert peft_adapter/ -o adapter.gguf --to gguf --base llama/config.json
      loratool convert adapter.gguf -o peft_out/ --to peft --base model-q8_0.gguf
    """
    from ..naming import parse_map
    from ..ops.convert import convert
    report = convert(src, dst, to=to, overwrite=overwrite, base=base, gguf_type=gguf_type,
                     permute_qk=permute_qk, name_map=parse_map(name_map) or None,
                     rank=rank, fro=fro, sv_ratio=sv_ratio, cumulative=cumulative,
                     dtype=dtype, lycoris=lycoris, dense_svd=dense_svd, **source)
    data = report.to_dict()
    if as_json:
        console.print_json(data)
        console.render_convert_dropped(data)
    else:
        console.render_convert(data)
