"""Build the small per-format adapters in fixtures/formats/.

    python scripts/make_format_fixtures.py        # needs peft and diffusers (the `test` extra)

kohya, LyCORIS and MLX files follow each layout's key rules (sd-scripts, LyCORIS and MLX-LM
are not pip-installable on every platform); the diffusers files are produced from the kohya
ones by diffusers' own converters (SGM block remapping, kohya key conversion, PEFT renaming,
get_peft_kwargs for lora_adapter_metadata), and the PEFT conv/embedding adapter by PEFT's
own save_pretrained. Every factor is seeded, so the files are reproducible.
"""
from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
GEN = torch.Generator().manual_seed(1234)


def reseed(name: str) -> None:
    """Each fixture draws from its own seed, so adding one leaves the others' values unchanged."""
    GEN.manual_seed(zlib.crc32(name.encode()))


def rand(*shape, scale=0.1):
    return torch.randn(*shape, generator=GEN) * scale


def lora(stem, out, inp, r, alpha=None, kernel=None, dtype=torch.float32):
    """kohya tensors of one module: conv when `kernel` is given (down r×in×kh×kw, up out×r×1×1)."""
    down = rand(r, inp, *kernel) if kernel else rand(r, inp)
    up = rand(out, r, 1, 1) if kernel else rand(out, r)
    t = {f"{stem}.lora_down.weight": down.to(dtype), f"{stem}.lora_up.weight": up.to(dtype)}
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return t


def kohya_meta(dim, alpha, base, **extra):
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_base_model_version": base, "ss_output_name": "fixture", "sshs_model_hash": "0" * 64,
            "sshs_legacy_hash": "00000000", "ss_training_comment": "lora_convert test fixture"}
    meta.update({k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in extra.items()})
    return meta


def kohya_sd15():
    h = torch.float16
    u = "lora_unet_down_blocks_0_attentions_0_"
    t = {}
    t |= lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 48, 48, 4, 2, dtype=h)
    t |= lora("lora_te_text_model_encoder_layers_0_mlp_fc1", 96, 48, 4, 4, dtype=h)
    t |= lora(u + "proj_in", 32, 32, 8, 4, kernel=(1, 1), dtype=h)  # SD1 proj_in is a 1x1 conv
    t |= lora(u + "transformer_blocks_0_attn1_to_q", 32, 32, 8, 8, dtype=h)
    t |= lora(u + "transformer_blocks_0_attn2_to_k", 32, 48, 4, None, dtype=h)  # no alpha: alpha = r
    t |= lora(u + "transformer_blocks_0_attn1_to_out_0", 32, 32, 8, 8, dtype=h)
    t |= lora(u + "transformer_blocks_0_ff_net_0_proj", 128, 32, 8, 8, dtype=h)
    t |= lora("lora_unet_down_blocks_0_resnets_0_conv1", 32, 32, 4, 1, kernel=(3, 3), dtype=h)
    t |= lora("lora_unet_down_blocks_0_resnets_0_time_emb_proj", 32, 64, 4, 2, dtype=h)
    t |= lora("lora_unet_down_blocks_0_downsamplers_0_conv", 32, 32, 4, 1, kernel=(3, 3), dtype=h)
    t |= lora("lora_unet_mid_block_attentions_0_proj_out", 64, 64, 8, 4, kernel=(1, 1), dtype=h)
    t |= lora("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 64, 48, 8, 8, dtype=h)
    return t, kohya_meta(8, 8, "sd_v1", ss_network_args={"conv_dim": "4", "conv_alpha": "1"})


def kohya_sdxl():
    t = {}
    t |= lora("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 48, 48, 4, 4)
    t |= lora("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", 64, 64, 8, 4)
    t |= lora("lora_te2_text_model_encoder_layers_0_mlp_fc2", 64, 128, 8, 4)
    t |= lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, 16, 8)
    t |= lora("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 64, 64, 16, 8)
    t |= lora("lora_unet_input_blocks_4_1_proj_in", 64, 64, 16, 8)
    t |= lora("lora_unet_input_blocks_1_0_in_layers_2", 32, 32, 4, 2, kernel=(3, 3))
    t |= lora("lora_unet_input_blocks_1_0_emb_layers_1", 32, 80, 4, 2)
    t |= lora("lora_unet_input_blocks_3_0_op", 32, 32, 4, 2, kernel=(3, 3))
    t |= lora("lora_unet_middle_block_1_transformer_blocks_0_ff_net_2", 64, 128, 16, 8)
    t |= lora("lora_unet_middle_block_0_out_layers_3", 64, 64, 4, 2, kernel=(3, 3))
    t |= lora("lora_unet_output_blocks_2_2_conv", 64, 64, 4, 2, kernel=(3, 3))
    t |= lora("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0", 64, 64, 16, 8)
    t |= lora("lora_unet_output_blocks_3_0_skip_connection", 32, 64, 4, 2, kernel=(1, 1))
    return t, kohya_meta(16, 8, "sdxl_base_v1-0", ss_network_args={"conv_dim": "4", "conv_alpha": "2"})


def kohya_locon():
    """LoCon with Tucker cores (sd-scripts + LyCORIS 'locon', use_tucker): lora_mid between down and up."""
    t = {}
    for stem, ch, r in (("lora_unet_down_blocks_0_resnets_0_conv1", 32, 4),
                        ("lora_unet_up_blocks_1_resnets_0_conv2", 48, 6)):
        t[f"{stem}.lora_down.weight"] = rand(r, ch, 1, 1)
        t[f"{stem}.lora_mid.weight"] = rand(r, r, 3, 3)
        t[f"{stem}.lora_up.weight"] = rand(ch, r, 1, 1)
        t[f"{stem}.alpha"] = torch.tensor(2.0)
    t |= lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 32, 32, 8, 4)
    meta = kohya_meta(8, 4, "sd_v1", ss_network_args={"algo": "locon", "use_tucker": True, "conv_dim": 4,
                                                       "conv_alpha": 2})
    meta["ss_network_module"] = "lycoris.kohya"
    return t, meta


def kohya_flux():
    t = {}
    t |= lora("lora_unet_double_blocks_0_img_attn_qkv", 192, 64, 8, 8, dtype=torch.bfloat16)
    t |= lora("lora_unet_double_blocks_0_txt_mlp_0", 128, 64, 8, 8, dtype=torch.bfloat16)
    t |= lora("lora_unet_single_blocks_0_linear1", 256, 64, 8, 4, dtype=torch.bfloat16)
    t |= lora("lora_unet_single_blocks_0_modulation_lin", 192, 64, 4, 4, dtype=torch.bfloat16)
    t |= lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 48, 48, 4, 4, dtype=torch.bfloat16)
    return t, kohya_meta(8, 8, "flux1")


def loha():
    """LoHa (LyCORIS): plain, Tucker conv, flattened conv (no Tucker), text encoder without alpha."""
    t = {}
    s = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t |= {f"{s}.hada_w1_a": rand(32, 4), f"{s}.hada_w1_b": rand(4, 32), f"{s}.hada_w2_a": rand(32, 4),
          f"{s}.hada_w2_b": rand(4, 32), f"{s}.alpha": torch.tensor(2.0)}
    s = "lora_unet_down_blocks_0_resnets_0_conv1"  # Tucker: _a is r×out, _b is r×in, t is r×r×kh×kw
    t |= {f"{s}.hada_t1": rand(4, 4, 3, 3), f"{s}.hada_w1_a": rand(4, 32), f"{s}.hada_w1_b": rand(4, 16),
          f"{s}.hada_t2": rand(4, 4, 3, 3), f"{s}.hada_w2_a": rand(4, 32), f"{s}.hada_w2_b": rand(4, 16),
          f"{s}.alpha": torch.tensor(4.0)}
    s = "lora_unet_down_blocks_0_resnets_0_conv2"  # no Tucker: kernel flattened into w_b (r × in·kh·kw)
    t |= {f"{s}.hada_w1_a": rand(16, 2), f"{s}.hada_w1_b": rand(2, 16 * 9), f"{s}.hada_w2_a": rand(16, 2),
          f"{s}.hada_w2_b": rand(2, 16 * 9), f"{s}.alpha": torch.tensor(1.0)}
    s = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    t |= {f"{s}.hada_w1_a": rand(48, 2), f"{s}.hada_w1_b": rand(2, 48), f"{s}.hada_w2_a": rand(48, 2),
          f"{s}.hada_w2_b": rand(2, 48)}
    meta = kohya_meta(4, 2, "sd_v1", ss_network_args={"algo": "loha", "conv_dim": 4, "conv_alpha": 4})
    meta["ss_network_module"] = "lycoris.kohya"
    return t, meta


def lokr():
    t = {}
    s = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # full w1, low-rank w2
    t |= {f"{s}.lokr_w1": rand(4, 4), f"{s}.lokr_w2_a": rand(8, 4), f"{s}.lokr_w2_b": rand(4, 8),
          f"{s}.alpha": torch.tensor(2.0)}
    s = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # low-rank w1, full w2
    t |= {f"{s}.lokr_w1_a": rand(4, 2), f"{s}.lokr_w1_b": rand(2, 4), f"{s}.lokr_w2": rand(8, 12),
          f"{s}.alpha": torch.tensor(1.0)}
    s = "lora_unet_down_blocks_0_resnets_0_conv1"  # Tucker conv w2
    t |= {f"{s}.lokr_w1": rand(4, 4), f"{s}.lokr_t2": rand(4, 4, 3, 3), f"{s}.lokr_w2_a": rand(4, 8),
          f"{s}.lokr_w2_b": rand(4, 8), f"{s}.alpha": torch.tensor(4.0)}
    s = "lora_unet_down_blocks_0_resnets_0_conv2"  # both full, conv w2 4-D: scale 1 whatever alpha says
    t |= {f"{s}.lokr_w1": rand(2, 2), f"{s}.lokr_w2": rand(16, 16, 3, 3), f"{s}.alpha": torch.tensor(7.0)}
    s = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # both full, linear
    t |= {f"{s}.lokr_w1": rand(2, 4), f"{s}.lokr_w2": rand(48, 12)}
    s = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"  # both low-rank: scale uses w2's rank
    t |= {f"{s}.lokr_w1_a": rand(4, 2), f"{s}.lokr_w1_b": rand(2, 4), f"{s}.lokr_w2_a": rand(12, 4),
          f"{s}.lokr_w2_b": rand(4, 12), f"{s}.alpha": torch.tensor(3.0)}
    meta = kohya_meta(4, 2, "sd_v1", ss_network_args={"algo": "lokr", "factor": -1})
    meta["ss_network_module"] = "lycoris.kohya"
    return t, meta


def to_diffusers(kohya: dict, sdxl: bool):
    """diffusers' own pipeline for kohya files: SGM remap, key conversion, PEFT renaming.
    Returns PEFT-style keys and {<component>.<module>: alpha}."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    state = dict(kohya)
    if sdxl:
        state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=2))
    state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if part:
            out.update({f"{comp}.{k}": v for k, v in _to_peft(comp, part).items()})
    # diffusers names some alphas after the old-style down key ("...to_q_lora.down.weight.alpha"):
    # run those names through the same conversion to find their module.
    named = {}
    for key, alpha in alphas.items():
        comp, _, rest = key.partition(".")
        rest = rest[:-len(".alpha")]
        probe = rest if rest.endswith(".down.weight") else rest + ".lora.down.weight"
        module = next(iter(_to_peft(comp, {probe: None}))).split(".lora_A.")[0]
        named[f"{comp}.{module}"] = alpha
    return out, named


def _to_peft(comp: str, part: dict) -> dict:
    """diffusers' renaming to PEFT keys; the text-encoder types are given, not inferred, because
    diffusers' inference misreads a mix of old (to_q_lora) and new (lora_linear_layer) keys."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    if comp == "unet":
        return convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
    return convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS)


def adapter_metadata(state: dict, alphas: dict) -> dict:
    """lora_adapter_metadata as diffusers builds it (get_peft_kwargs per component)."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    flat = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if not part:
            continue
        ranks = {k: v.shape[1] for k, v in part.items() if "lora_B" in k}
        comp_alphas = {k[len(comp) + 1:] + ".alpha": v for k, v in alphas.items() if k.startswith(comp + ".")}
        kw = get_peft_kwargs(ranks, comp_alphas, part, is_unet=True)
        flat.update({f"{comp}.{k}": v for k, v in kw.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True)}


def peft_conv_embedding(dest: Path):
    """A real PEFT adapter on a toy model with an Embedding, a 3x3 Conv2d and a Linear."""
    from peft import LoraConfig, get_peft_model

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.proj = torch.nn.Linear(16, 24)

    torch.manual_seed(0)
    cfg = LoraConfig(target_modules=["embed", "conv", "proj"], r=4, lora_alpha=8, rank_pattern={"conv": 2},
                     alpha_pattern={"proj": 3})
    model = get_peft_model(Toy(), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(rand(*p.shape))
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(dest)
    (dest / "README.md").unlink(missing_ok=True)


def mlx_tiny_llama(dest: Path):
    """MLX-LM layout (mlx_lm/tuner): lora_a in×r, lora_b r×out, absolute scale."""
    t = {}
    for layer in (0, 1):
        for mod, out, inp in (("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 32, 64)):
            t[f"model.layers.{layer}.{mod}.lora_a"] = rand(inp, 8)
            t[f"model.layers.{layer}.{mod}.lora_b"] = rand(8, out)
    t["model.layers.1.mlp.down_proj.lora_a"] = rand(96, 8)
    t["model.layers.1.mlp.down_proj.lora_b"] = rand(8, 64)
    t["model.embed_tokens.lora_a"] = rand(128, 8)  # LoRAEmbedding: num_embeddings × r
    t["model.embed_tokens.lora_b"] = rand(8, 64)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dest / "adapters.safetensors"), metadata={"format": "mlx"})
    cfg = {"model": "tiny-llama", "fine_tune_type": "lora", "num_layers": 2, "batch_size": 4, "iters": 100,
           "learning_rate": 1e-5, "seed": 0, "lora_parameters": {
               "rank": 8, "scale": 2.5, "dropout": 0.0,
               "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "model.embed_tokens"]}}
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=4) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures" / "formats")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for name, build in (("kohya-sd15", kohya_sd15), ("kohya-sdxl", kohya_sdxl), ("kohya-locon", kohya_locon),
                        ("kohya-flux", kohya_flux), ("lycoris-loha", loha), ("lycoris-lokr", lokr)):
        reseed(name)
        tensors, meta = build()
        save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)
    for src, sdxl, dest in (("kohya-sd15", False, out / "diffusers-sd15" / "pytorch_lora_weights.safetensors"),
                            ("kohya-sdxl", True, out / "diffusers-sdxl.safetensors")):
        state, alphas = to_diffusers(load_file(str(out / f"{src}.safetensors")), sdxl)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if sdxl:  # the modern layout: scale in lora_adapter_metadata
            save_file(state, str(dest), metadata=adapter_metadata(state, alphas))
        else:  # a community conversion: the kohya alphas kept as <module>.alpha keys
            state |= {f"{k}.alpha": torch.tensor(v, dtype=torch.float16) for k, v in alphas.items()}
            save_file(state, str(dest), metadata={"format": "pt"})
    reseed("peft-conv-emb")
    peft_conv_embedding(out / "peft-conv-emb")
    reseed("mlx-tiny-llama")
    mlx_tiny_llama(out / "mlx-tiny-llama")
    reseed("bad")
    bad = {"model.decoder.weight": rand(4, 4), "model.decoder.bias": rand(4), "unrelated.scale": rand(1)}
    save_file(bad, str(out / "bad-unknown.safetensors"))
    both = lora("lora_unet_down_blocks_0_resnets_0_conv1", 8, 8, 2, 2)
    both |= {"unet.down_blocks.0.resnets.0.conv2.lora_A.weight": rand(2, 8),
             "unet.down_blocks.0.resnets.0.conv2.lora_B.weight": rand(8, 2)}
    save_file(both, str(out / "bad-ambiguous.safetensors"))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}  {p.stat().st_size:,} B")


if __name__ == "__main__":
    main()
