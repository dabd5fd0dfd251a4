"""A tiny latent Stable Diffusion 1.x-layout model folder, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from sdplug.trainer import tiny


def build_unet(cross_attention_dim: int = tiny.TEXT_WIDTH, attention_head_dim: int = 8) -> UNet2DConditionModel:
    """A two-level SD-layout UNet on 4x16x16 latents (cross-attention down, mid and up)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=16,
    )


def build_pipeline(directory: Path, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    unet = build_unet()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny.build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny.build_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "model")
    return pipe
