"""A tiny SD-1.x-layout diffusers model folder for EveryDream2 on CPU, built in EveryDream2's own
venv (its transformers 4.38 must write the tokenizer it later reads). v-prediction schedule."""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

out = Path(sys.argv[1])
work = out.parent / "tokenizer-src"
work.mkdir(parents=True, exist_ok=True)
letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.-'"))
vocab = {}
for token in [*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]:
    vocab.setdefault(token, len(vocab))
(work / "vocab.json").write_text(json.dumps(vocab))
(work / "merges.txt").write_text("#version: 0.2\n")
tokenizer = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=32)
torch.manual_seed(0)
text_encoder = CLIPTextModel(
    CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
)
vae = AutoencoderKL(  # 4 levels: 256 x 256 images -> 4 x 32 x 32 latents, as SD's factor 8
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
)
unet = UNet2DConditionModel(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
scheduler = DDPMScheduler(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    steps_offset=1,
)
StableDiffusionPipeline(
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=tokenizer,
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
).save_pretrained(out)
print(f"tiny model in {out}")
