"""A tiny SD-style UNet built from a diffusers config (no downloads), and one fixed input for it."""
from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, channels: tuple[int, int] = (16, 32), linear_projection: bool = False):
    """UNet2DConditionModel with SD's module names: conv_in/out (3x3, 4 channels), resnets with
    3x3 convs and a 1x1 conv_shortcut, attention with proj_in/proj_out (1x1 convs like SD1.x,
    or linear like SD2.x/SDXL with `linear_projection`), cross-attention of width 16."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=linear_projection).eval()


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 5, 16, generator=g))


@torch.no_grad()
def unet_output(unet, inputs) -> torch.Tensor:
    sample, t, ctx = inputs
    return unet(sample, t, encoder_hidden_states=ctx).sample.double()
