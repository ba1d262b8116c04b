"""Flux between diffusers' names and the original (BFL) names kohya and ComfyUI use, with diffusers
itself: a PEFT LoRA on a tiny FluxTransformer2DModel built from a config, saved by diffusers,
converted (fused qkv / linear1 where kohya has them, split again for diffusers), and loaded by
diffusers' own loaders (including its kohya Flux converter) must change the output the same way."""
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lora_convert as lc
from lora_convert import formats
from lora_convert.cli import main

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

DOUBLE = r"transformer_blocks\.0\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)" \
         r"|ff\.net\.0\.proj|ff_context\.net\.2|norm1\.linear)"
OUTER = r"x_embedder|context_embedder|norm_out\.linear|proj_out|time_text_embed\.guidance_embedder\.linear_1"
SINGLE = r"single_transformer_blocks\.0\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)).eval()


@torch.no_grad()
def output(model):
    g = torch.Generator().manual_seed(1)
    img, txt = 6, 3
    return model(hidden_states=torch.randn(2, img, 4, generator=g),
                 encoder_hidden_states=torch.randn(2, txt, 12, generator=g),
                 pooled_projections=torch.randn(2, 10, generator=g), timestep=torch.tensor([0.3, 0.7]),
                 img_ids=torch.randn(img, 3, generator=g), txt_ids=torch.randn(txt, 3, generator=g),
                 guidance=torch.tensor([3.0, 3.0])).sample.double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def saved_adapter(dest, targets):
    model = tiny_flux()
    base = output(model)
    # norm_out / proj_out at scale 1: diffusers' kohya converter ignores the alpha of Flux's final layer
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, rank_pattern={"to_k": 3},
                                      alpha_pattern={r"norm_out\.linear": 2, "proj_out": 2}), adapter_name="src")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    delta = output(model) - base
    model.save_lora_adapter(str(dest), adapter_name="src")
    return delta


def loaded_delta(state_or_path, prefix="transformer"):
    model = tiny_flux()
    base = output(model)
    if not isinstance(state_or_path, dict):
        state_or_path = str(state_or_path / "pytorch_lora_weights.safetensors")
    model.load_lora_adapter(state_or_path, prefix=prefix, adapter_name="x")
    return output(model) - base


def test_diffusers_flux_fuses_into_kohya_as_diffusers_own_converter_splits_it(tmp_path):
    want = saved_adapter(tmp_path / "src", f"^({DOUBLE}|{OUTER})$")
    assert run("convert", tmp_path / "src", "--to", "kohya", "-o", tmp_path / "k.safetensors").exit_code == 0
    keys = load_file(tmp_path / "k.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # fused, BFL names
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in keys
    # diffusers' own kohya Flux converter (lora_state_dict) reads it back; it leaves the layers
    # outside the blocks without the transformer. prefix (its pipeline loader then skips them)
    state = diffusers.FluxPipeline.lora_state_dict(str(tmp_path / "k.safetensors"))
    state = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state.items()}
    assert rel(loaded_delta(state), want) < 1e-4
    # and our split of it loads the same way
    assert run("convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d").exit_code == 0
    assert rel(loaded_delta(tmp_path / "d"), want) < 1e-4


def test_single_block_linear1_fuses_and_splits(tmp_path):
    want = saved_adapter(tmp_path / "src", f"^({DOUBLE}|{SINGLE})$")
    lc.save(lc.compress(lc.load_adapter(tmp_path / "src"), outer="svd"), tmp_path / "mini")
    assert run("reconstruct", tmp_path / "mini", "--to", "kohya", "-o", tmp_path / "k.safetensors").exit_code == 0
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in load_file(tmp_path / "k.safetensors")
    assert run("convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d").exit_code == 0
    back = lc.load_adapter(tmp_path / "d")
    assert back.module("transformer.single_transformer_blocks.0.attn.to_k").rank == 3  # fused ranks split back
    assert rel(loaded_delta(tmp_path / "d"), want) < 1e-4


def test_comfyui_diffusion_model_prefix_is_read(tmp_path):
    """ComfyUI's keys: the BFL module paths under diffusion_model. (dots kept)."""
    want = saved_adapter(tmp_path / "src", f"^({DOUBLE}|{SINGLE})$")
    assert run("convert", tmp_path / "src", "--to", "kohya", "-o", tmp_path / "k.safetensors").exit_code == 0
    kohya = lc.load_adapter(tmp_path / "k.safetensors")
    comfy = {}
    for m in kohya.modules():
        stem = "diffusion_model." + m.name.removeprefix("transformer.")
        comfy |= {f"{stem}.lora_down.weight": m.down, f"{stem}.lora_up.weight": m.up,
                  f"{stem}.alpha": torch.tensor(m.alpha)}
    save_file(comfy, tmp_path / "comfy.safetensors")
    assert formats.detect(tmp_path / "comfy.safetensors") == "kohya"
    assert sorted(lc.load_adapter(tmp_path / "comfy.safetensors").module_names) == sorted(kohya.module_names)
    assert run("convert", tmp_path / "comfy.safetensors", "--to", "diffusers", "-o", tmp_path / "d").exit_code == 0
    assert rel(loaded_delta(tmp_path / "d"), want) < 1e-4
