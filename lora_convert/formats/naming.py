"""Module names across layouts.

In memory every format names a module by its dotted model path. Diffusion adapters put the
pipeline component first (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``) and use diffusers' UNet names;
LLM adapters (PEFT, MLX) have no component (``model.layers.0.self_attn.q_proj``).

kohya/LyCORIS flatten the same path with underscores under a prefix (``lora_unet_``,
``lora_te1_``). Dots -> underscores is trivial; the way back needs to know which underscores
belong to identifiers (``to_q``, ``transformer_blocks``), so a vocabulary of known multi-word
identifiers is joined greedily, as diffusers' own kohya converters do with replacement lists.
kohya's SDXL UNet uses the original SGM/LDM block names (``input_blocks.4.1``), mapped here to
and from diffusers' ``down_blocks.1.attentions.0`` (both UNets have two layers per block).
"""
from __future__ import annotations

import re

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
KOHYA_PREFIX_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                          "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
KOHYA_PREFIXES = tuple(sorted(KOHYA_PREFIX_COMPONENT, key=len, reverse=True))

# Roots of module paths, by component, for names that arrive without one (PEFT of one model).
UNET_ROOTS = {"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
              "add_embedding", "conv_norm_out"}
SGM_ROOTS = {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}
BFL_FLUX_ROOTS = {"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in",
                  "guidance_in", "final_layer"}
TRANSFORMER_ROOTS = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                     "time_text_embed", "norm_out", "proj_out", "pos_embed"}
TEXT_ROOTS = {"text_model"}

VOCABULARY = {
    # diffusers UNet / transformers
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks", "proj_in",
    "proj_out", "to_q", "to_k", "to_v", "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "norm_out", "add_q_proj",
    "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context", "proj_mlp", "x_embedder",
    "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
    "pos_embed", "norm_q", "norm_k",
    # SGM / LDM UNet (kohya SDXL)
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # CLIP / T5 text encoders
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
    "wi_0", "wi_1", "relative_attention_bias", "layer_norm", "shared",
    # LLMs
    "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head", "qkv_proj", "gate_up_proj",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj", "c_fc",
    # Flux (BFL layout, used by kohya)
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer", "in_layer", "out_layer",
    "adaLN_modulation",
}
_MAX_WORDS = max(len(w.split("_")) for w in VOCABULARY)


def underscored_to_dotted(flat: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    tokens, out, i = flat.split("_"), [], 0
    while i < len(tokens):
        for n in range(min(_MAX_WORDS, len(tokens) - i), 0, -1):
            word = "_".join(tokens[i:i + n])
            if n == 1 or word in VOCABULARY:
                out.append(word)
                i += n
                break
    return ".".join(out)


def split_component(name: str) -> tuple[str | None, str]:
    head, _, rest = name.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, name)


def infer_component(path: str) -> str | None:
    """The pipeline component a component-less module path belongs to, when its root says so."""
    root = path.split(".", 1)[0]
    if root in UNET_ROOTS or root in SGM_ROOTS:
        return "unet"
    if root in TEXT_ROOTS:
        return "text_encoder"
    if root in TRANSFORMER_ROOTS or root in BFL_FLUX_ROOTS:
        return "transformer"
    return None


def is_bfl_flux(path: str) -> bool:
    return path.split(".", 1)[0] in BFL_FLUX_ROOTS


# ------------------------------------------------------------ SGM <-> diffusers UNet

_RESNET_SGM_TO_DIFF = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2",
                       "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_RESNET_DIFF_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFF.items()}
_FLAT_SGM_TO_DIFF = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "out.0": "conv_norm_out",
                     "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                     "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_FLAT_DIFF_TO_SGM = {v: k for k, v in _FLAT_SGM_TO_DIFF.items()}
SDXL_ATTENTION_UP_BLOCKS = (0, 1)  # SDXL up_blocks with attentions (their upsampler sits at index 2)


def _swap_prefix(path: str, table: dict) -> str | None:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def sgm_to_diffusers(path: str) -> str:
    """``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``; unknown paths unchanged."""
    flat = _swap_prefix(path, _FLAT_SGM_TO_DIFF)
    if flat is not None:
        return flat
    m = re.match(r"^middle_block\.(\d+)(?:\.(.+))?$", path)
    if m:
        inner = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}.get(int(m.group(1)))
        rest = m.group(2) or ""
        if inner is None:
            return path
        return _join("mid_block", inner, rest if inner.startswith("attentions") else _resnet_inner(rest))
    m = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$", path)
    if not m:
        return path
    head, n, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
    if head == "input_blocks":
        block, i = divmod(n - 1, 3)
        if i == 2:
            return _join("down_blocks", block, "downsamplers.0.conv") if (j, rest) == ("0", "op") else path
        return _block_inner("down_blocks", block, i, j, rest, path)
    block, i = divmod(n, 3)
    if rest == "conv" and j in ("1", "2") and i == 2:
        return _join("up_blocks", block, "upsamplers.0.conv")
    return _block_inner("up_blocks", block, i, j, rest, path)


def _block_inner(head: str, block: int, i: int, j: str, rest: str, path: str) -> str:
    if j == "0":
        return _join(head, block, "resnets", i, _resnet_inner(rest))
    if j == "1":
        return _join(head, block, "attentions", i, rest)
    return path


def _resnet_inner(rest: str) -> str:
    swapped = _swap_prefix(rest, _RESNET_SGM_TO_DIFF)
    return rest if swapped is None else swapped


def diffusers_to_sgm(path: str, attention_up_blocks=SDXL_ATTENTION_UP_BLOCKS) -> str:
    """Inverse of sgm_to_diffusers (for kohya SDXL files); unknown paths unchanged."""
    flat = _swap_prefix(path, _FLAT_DIFF_TO_SGM)
    if flat is not None:
        return flat
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
                 r"(?:\.(.+))?$", path)
    if m:
        head, block, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        return _to_sgm_block(head, block, kind, i, rest, path, attention_up_blocks)
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$", path)
    if m:
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        n = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, i))
        if n is None:
            return path
        return _join("middle_block", n, _resnet_back(rest) if kind == "resnets" else rest)
    return path


def _to_sgm_block(head, block, kind, i, rest, path, attention_up_blocks) -> str:
    if head == "down_blocks":
        if kind == "downsamplers":
            return _join("input_blocks", 3 * block + 3, 0, "op") if (i, rest) == (0, "conv") else path
        n = 3 * block + i + 1
    else:
        if kind == "upsamplers":
            j = 2 if block in attention_up_blocks else 1
            return _join("output_blocks", 3 * block + 2, j, "conv") if (i, rest) == (0, "conv") else path
        n = 3 * block + i
    if kind == "resnets":
        return _join(head.replace("down_blocks", "input_blocks").replace("up_blocks", "output_blocks"), n, 0,
                     _resnet_back(rest))
    if kind == "attentions":
        return _join("input_blocks" if head == "down_blocks" else "output_blocks", n, 1, rest)
    return path


def _resnet_back(rest: str) -> str:
    swapped = _swap_prefix(rest, _RESNET_DIFF_TO_SGM)
    return rest if swapped is None else swapped


# ------------------------------------------------------------ kohya <-> in-memory

def kohya_to_module(stem: str) -> tuple[str, str] | None:
    """``lora_unet_input_blocks_4_1_proj_in`` -> (``unet.down_blocks.1.attentions.0.proj_in``, prefix)."""
    for prefix in KOHYA_PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            path = underscored_to_dotted(stem[len(prefix):])
            component = KOHYA_PREFIX_COMPONENT[prefix]
            if component == "unet":
                if is_bfl_flux(path):
                    component = "transformer"  # kohya keeps lora_unet_ for Flux's transformer
                elif path.split(".", 1)[0] in SGM_ROOTS:
                    path = sgm_to_diffusers(path)
            return f"{component}.{path}", prefix
    if stem.startswith("lycoris_") and len(stem) > len("lycoris_"):
        return underscored_to_dotted(stem[len("lycoris_"):]), "lycoris_"
    return comfy_to_module(stem)


# ComfyUI's own LoRA keys: the model's dotted module paths under its state-dict prefixes.
COMFY_DIFFUSION = "diffusion_model."
COMFY_TEXT = {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2"}


def comfy_to_module(stem: str) -> tuple[str, str] | None:
    """``diffusion_model.input_blocks.4.1.proj_in`` -> (``unet.down_blocks.1.attentions.0.proj_in``,
    prefix); Flux's ``diffusion_model.double_blocks.0.img_attn.qkv`` -> ``transformer.double_blocks…``;
    ``text_encoders.clip_l.transformer.text_model…`` -> ``text_encoder.text_model…``."""
    if stem.startswith(COMFY_DIFFUSION) and len(stem) > len(COMFY_DIFFUSION):
        path = stem[len(COMFY_DIFFUSION):]
        if path.split(".", 1)[0] in SGM_ROOTS:
            return f"unet.{sgm_to_diffusers(path)}", COMFY_DIFFUSION
        component = infer_component(path)
        return (f"{component}.{path}", COMFY_DIFFUSION) if component in ("unet", "transformer") else None
    for prefix, component in COMFY_TEXT.items():
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return f"{component}.{stem[len(prefix):]}", prefix
    return None


def module_to_kohya(name: str, variant: str) -> str:
    """In-memory name -> kohya stem for `variant` ("SD1.x/2.x", "SDXL", "Flux")."""
    component, path = split_component(name)
    if component is None:
        component = infer_component(path)
        if component is None:
            from ..errors import UnsupportedError

            raise UnsupportedError(f"module {name!r} has no pipeline component (unet/text_encoder/...) "
                                   "that a kohya prefix could name")
    if component in ("unet", "transformer"):
        if component == "transformer" and not is_bfl_flux(path):
            from ..errors import UnsupportedError

            raise UnsupportedError(f"module {name!r}: kohya's Flux layout uses the original (BFL) module names "
                                   "with fused qkv; converting diffusers' transformer names to them is not supported")
        if variant == "SDXL":
            path = diffusers_to_sgm(path)
        prefix = "lora_unet_"
    elif component == "text_encoder":
        prefix = "lora_te_" if variant == "SD1.x/2.x" else "lora_te1_"
    else:
        prefix = {"text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}.get(component)
        if prefix is None:
            from ..errors import UnsupportedError

            raise UnsupportedError(f"module {name!r}: component {component!r} has no kohya prefix")
    return prefix + path.replace(".", "_")


def variant_of(names, metadata: dict | None = None) -> str:
    """Which model family a diffusion adapter's (in-memory) module names belong to."""
    names = [n if split_component(n)[0] else f"{infer_component(n)}.{n}" for n in names]
    if any(n.startswith("transformer.") and is_bfl_flux(split_component(n)[1]) for n in names):
        return "Flux"
    if any(n.startswith(("transformer.single_transformer_blocks.", "transformer.x_embedder",
                         "transformer.time_text_embed.guidance_embedder.")) for n in names):
        return "Flux"  # diffusers' Flux names (SD3's MMDiT has none of these)
    base = (metadata or {}).get("ss_base_model_version", "")
    sdxl_marks = ("text_encoder_2.", "unet.up_blocks.0.attentions", "unet.add_embedding")
    if base.startswith("sdxl") or any(n.startswith(sdxl_marks) for n in names) or any(
            re.search(r"\.transformer_blocks\.[1-9]", n) for n in names if n.startswith("unet.")):
        return "SDXL"
    if base.startswith("flux"):
        return "Flux"
    return "SD1.x/2.x"


# ------------------------------------------------------------ layer kinds of known architectures

# LyCORIS LoHa/LoKr without a Tucker core store a conv kernel flattened (r × in·kh·kw), exactly
# like a linear layer's factor: the layer kind must come from the architecture. diffusers'
# UNet2DConditionModel (SD1.x, SD2.x, SDXL; kohya's SGM names are mapped to it on reading):
_UNET_CONV3 = re.compile(r"^(?:conv_in|conv_out|(?:down_blocks|up_blocks)\.\d+\.(?:downsamplers|upsamplers)\.\d+\.conv|"
                         r"(?:(?:down_blocks|up_blocks)\.\d+\.|mid_block\.)resnets\.\d+\.conv[12])$")
_UNET_CONV1 = re.compile(r"^(?:(?:down_blocks|up_blocks)\.\d+\.|mid_block\.)resnets\.\d+\.conv_shortcut$")
_UNET_PROJ = re.compile(r"^(?:(?:down_blocks|up_blocks)\.\d+\.|mid_block\.)attentions\.\d+\.proj_(?:in|out)$")
# Leaves that are nn.Linear wherever they occur (transformers / diffusers attention and MLPs).
LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1",
                 "fc2", "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
                 "lm_head", "query", "key", "value", "dense", "qkv_proj", "gate_up_proj", "linear_1", "linear_2",
                 "time_emb_proj", "wi_0", "wi_1", "wo", "q", "k", "v", "o"}


def layer_kernel(name: str, linear_projection: bool | None = None):
    """The layer kind of module `name` (in-memory name) where the architecture fixes it:
    ``(kh, kw)`` for a conv, ``()`` for a linear layer, None when unknown. `linear_projection`
    says whether the UNet's attention proj_in/proj_out are linear (SD2.x, SDXL) or 1×1 convs
    (SD1.x); None: not known."""
    component, path = split_component(name)
    component = component or infer_component(path)
    if component == "unet":
        if path.split(".", 1)[0] in SGM_ROOTS:
            path = sgm_to_diffusers(path)
        if _UNET_CONV3.match(path):
            return (3, 3)
        if _UNET_CONV1.match(path):
            return (1, 1)
        if _UNET_PROJ.match(path):
            return None if linear_projection is None else () if linear_projection else (1, 1)
        return ()  # every other UNet layer LyCORIS targets is nn.Linear
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        return ()
    if component == "transformer":
        return None if path.startswith("pos_embed") else ()  # SD3's patch embedding is a conv
    leaf = path.rsplit(".", 1)[-1]
    if leaf.isdigit() and "." in path:  # to_out.0, ff.net.2
        leaf = path.rsplit(".", 2)[-2]
    return () if leaf in LINEAR_LEAVES or leaf == "to_out" else None


def unet_linear_projection(names, metadata: dict | None, cross_attention_dim: int | None) -> bool | None:
    """Whether the UNet's attention proj_in/proj_out are linear: SDXL and SD2.x (True), SD1.x
    (1×1 convs, False), from the variant, kohya's ``ss_v2`` / ``ss_base_model_version``
    metadata, or the cross-attention width (768: SD1.x, 1024: SD2.x); None when none says."""
    meta = metadata or {}
    if variant_of(names, meta) == "SDXL":
        return True
    base = meta.get("ss_base_model_version", "")
    if base.startswith("sd_v2") or meta.get("ss_v2") == "True":
        return True
    if base.startswith("sd_v1") or meta.get("ss_v2") == "False":
        return False
    return {768: False, 1024: True}.get(cross_attention_dim)
