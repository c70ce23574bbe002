"""Single-file Stable Diffusion checkpoints (SD 1.x/2.x, SDXL: the original LDM names) as
merge bases for kohya/LyCORIS files, whose names are diffusers module paths.

In an LDM checkpoint the UNet is ``model.diffusion_model.*`` with the original block names
(``input_blocks.4.1.proj_in``), the text encoder ``cond_stage_model.transformer.*`` (SD 1.x)
or ``conditioner.embedders.0.transformer.*`` / ``conditioner.embedders.1.model.*`` (SDXL:
CLIP ViT-L in transformers' names, OpenCLIP ViT-bigG in its own). sd-scripts names SD 1.x
UNet modules by their diffusers paths (``lora_unet_down_blocks_0_attentions_0_proj_in``) and
SDXL ones by the LDM paths (``lora_unet_input_blocks_4_1_proj_in``), text encoders by
transformers' CLIP paths (``lora_te_text_model_encoder_layers_0_mlp_fc1``). The mapping is
the one sd-scripts (library/model_util.py, sdxl_model_util.py) and diffusers
(single_file_utils) apply between the two layouts: ``input_blocks.(L+1)·b + j + 1`` holds
resnet/attention j of down block b (L layers per block), ``output_blocks.(L+1)·b + j`` those
of up block b, the downsampler is ``input_blocks.k.0.op``, the upsampler the last ``.conv``
of its output block, ``middle_block.0/1/2`` = resnet 0, attention 0, resnet 1, and resnet
layers are renamed (``norm1`` -> ``in_layers.0``, ``conv1`` -> ``in_layers.2``, ...). The
block structure is read from the checkpoint's own keys, so any layer count works.

The OpenCLIP text encoder fuses q, k and v into one ``in_proj_weight``: modules on q/k/v of
``te2`` are refused by name (LT411); ``out_proj``, ``fc1``, ``fc2`` map to ``attn.out_proj``,
``mlp.c_fc``, ``mlp.c_proj``.
"""

from __future__ import annotations

UNET = "model.diffusion_model."
# sd-scripts' model part -> where that text encoder lives in a single file (first found wins)
TEXT_ENCODERS = {"te": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
                 "te1": ("conditioner.embedders.0.transformer.",),
                 "te2": ("conditioner.embedders.1.model.",)}
_FIXED = {"conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
          "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
          "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
          "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
          "mid_block.resnets.1.": "middle_block.2."}
# diffusers ResnetBlock2D -> LDM ResBlock
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}
_RESNET_BACK = {v: k for k, v in RESNET.items()}
# transformers' CLIP layer -> OpenCLIP resblock (te2); q/k/v are fused in attn.in_proj_weight
_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}


def is_ldm(keys) -> bool:
    return any(k.startswith(UNET) for k in keys)


def unet_prefixes(keys) -> dict[str, str]:
    """diffusers prefix -> LDM prefix (both ending in '.') of every block of the UNet whose
    LDM keys (``model.diffusion_model.*``) are among ``keys``."""
    ldm = {k[len(UNET):] for k in keys if k.startswith(UNET)}

    def blocks(kind):
        return sorted({int(k.split(".")[1]) for k in ldm if k.startswith(kind + ".")
                       and k.split(".")[1].isdigit()})

    def has(prefix):
        return any(k.startswith(prefix) for k in ldm)
    inputs, outputs = blocks("input_blocks"), blocks("output_blocks")
    ops = [i for i in inputs if has(f"input_blocks.{i}.0.op.")]
    # L + 1 input blocks per down block: the first downsampler closes down block 0
    step = ops[0] if ops else max(inputs, default=0)
    out = dict(_FIXED)
    for i in inputs[1:]:
        b, j = (i - 1) // step, (i - 1) % step
        if i in ops:
            out[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{i}.0.op."
            continue
        out[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
        if has(f"input_blocks.{i}.1."):
            out[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
    for i in outputs:
        b, j = i // step, i % step
        out[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{i}.0."
        for k in (1, 2):
            if has(f"output_blocks.{i}.{k}.conv."):
                out[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{i}.{k}.conv."
            elif k == 1 and has(f"output_blocks.{i}.1."):
                out[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{i}.1."
    return out


def _longest_first(prefixes: dict[str, str]) -> list[tuple[str, str]]:
    """(prefix, target) pairs, longest prefix first: the first that matches is the most
    specific. Sorted once per table, not per path."""
    return sorted(prefixes.items(), key=lambda kv: len(kv[0]), reverse=True)


def _is_resnet(dp: str) -> bool:
    return ".resnets." in dp or dp.startswith("mid_block.resnets.")


def diffusers_to_ldm(path: str, prefixes: dict[str, str]) -> str | None:
    """The LDM path (without ``model.diffusion_model.``) of a diffusers UNet path, or None."""
    return _to_ldm(path, _longest_first(prefixes))


def _to_ldm(path: str, ordered: list[tuple[str, str]]) -> str | None:
    for dp, lp in ordered:
        if (path + ".").startswith(dp):
            rest = path[len(dp):]
            if _is_resnet(dp):
                head, dot, tail = rest.partition(".")
                rest = RESNET.get(head, head) + dot + tail
            return (lp + rest).rstrip(".")
    return None


def _index(keys) -> dict[str, dict[str, str]]:
    """part -> {underscored module path as sd-scripts spells it: base module path}."""
    weights = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
    back = _longest_first({lp: dp for dp, lp in unet_prefixes(keys).items()})
    unet = {}
    for w in weights:
        if not w.startswith(UNET):
            continue
        ldm = w[len(UNET):]
        unet[ldm.replace(".", "_")] = w  # SDXL names (sd-scripts' LDM-style UNet)
        for lp, dp in back:
            if (ldm + ".").startswith(lp):
                rest = ldm[len(lp):]
                if _is_resnet(dp):
                    for lname, dname in _RESNET_BACK.items():
                        if rest == lname or rest.startswith(lname + "."):
                            rest = dname + rest[len(lname):]
                            break
                unet[(dp + rest).rstrip(".").replace(".", "_")] = w
                break
    out = {"unet": unet}
    for part, places in TEXT_ENCODERS.items():
        found = {}
        for place in places:
            for w in weights:
                if not w.startswith(place):
                    continue
                hf = w[len(place):]
                if part == "te2":
                    hf = _openclip_to_hf(hf)
                    if hf is None:
                        continue
                # transformers 4 paths (sd-scripts') and 5 (no ``text_model.`` level)
                names = [hf, hf[len("text_model."):] if hf.startswith("text_model.")
                         else "text_model." + hf]
                for n in names:
                    found.setdefault(n.replace(".", "_"), w)
            if found:
                break
        out[part] = found
    return out


def _openclip_to_hf(path: str) -> str | None:
    """``transformer.resblocks.3.mlp.c_fc`` -> ``text_model.encoder.layers.3.mlp.fc1``."""
    parts = path.split(".")
    if len(parts) < 4 or parts[:2] != ["transformer", "resblocks"]:
        return None
    rest = ".".join(parts[3:])
    for hf, oc in _OPENCLIP.items():
        if rest == oc:
            return f"text_model.encoder.layers.{parts[2]}.{hf}"
    return None


def name_map(keys, module_names) -> tuple[dict[str, str], list[str]]:
    """{adapter module: base module path} for the modules of kohya/LyCORIS parts (``unet.``,
    ``te.``, ``te1.``, ``te2.``) found in an LDM checkpoint with ``keys``; and the modules
    refused by name (te2 q/k/v). Modules not found are left to the merge's own matching."""
    index = _index(keys)
    out, fused = {}, []
    for name in module_names:
        part, dot, rest = name.partition(".")
        if not dot or part not in index:
            continue
        key = rest.replace(".", "_")
        hit = index[part].get(key)
        if hit is not None:
            out[name] = hit
        elif part == "te2" and key.endswith(("self_attn_q_proj", "self_attn_k_proj",
                                             "self_attn_v_proj")):
            fused.append(name)
    return out, fused


def ldm_index_of_diffusers(keys) -> dict[str, str]:
    """{underscored LDM UNet path: diffusers path} for a diffusers UNet with ``keys``: what
    SDXL kohya names (``lora_unet_input_blocks_4_1_proj_in``, sd-scripts' LDM-style UNet) mean
    in a diffusers pipeline's ``unet/``."""
    weights = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]

    def count(prefix):
        return sorted({int(w[len(prefix):].split(".")[0]) for w in weights
                       if w.startswith(prefix) and w[len(prefix):].split(".")[0].isdigit()})
    lpb = len(count("down_blocks.0.resnets.")) or 1
    step = lpb + 1
    pre = dict(_FIXED)
    for b in count("down_blocks."):
        for j in count(f"down_blocks.{b}.resnets."):
            pre[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{step * b + j + 1}.0."
        for j in count(f"down_blocks.{b}.attentions."):
            pre[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{step * b + j + 1}.1."
        pre[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{step * (b + 1)}.0.op."
    for b in count("up_blocks."):
        attn = count(f"up_blocks.{b}.attentions.")
        for j in count(f"up_blocks.{b}.resnets."):
            pre[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{step * b + j}.0."
        for j in attn:
            pre[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{step * b + j}.1."
        pre[f"up_blocks.{b}.upsamplers.0.conv."] = (
            f"output_blocks.{step * b + lpb}.{2 if attn else 1}.conv.")
    out = {}
    ordered = _longest_first(pre)
    for w in weights:
        ldm = _to_ldm(w, ordered)
        if ldm is not None:
            out[ldm.replace(".", "_")] = w
    return out
