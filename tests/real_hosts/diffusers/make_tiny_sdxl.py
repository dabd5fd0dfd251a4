"""Build a tiny random-weight SDXL-structured pipeline folder offline, for the SDXL example scripts.

    python make_tiny_sdxl.py OUT TOKENIZER_DIR

Two CLIP text encoders (the second with a projection, as SDXL's), both using the tokenizer in
TOKENIZER_DIR (the tiny SD1.5 model's), a UNet with SDXL's added conditions (``text_time``: six
time ids and the pooled text embedding), a small VAE and an epsilon DDPM schedule.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

out, tokenizer_dir = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
for name in ("tokenizer", "tokenizer_2"):
    shutil.copytree(tokenizer_dir, out / name, dirs_exist_ok=True)
tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
vocab = tokenizer.get_vocab()
text_config = dict(
    vocab_size=len(vocab),
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=tokenizer.model_max_length,
    projection_dim=32,
    bos_token_id=vocab["<|startoftext|>"],
    eos_token_id=vocab["<|endoftext|>"],
    pad_token_id=vocab["<|endoftext|>"],
)
CLIPTextModel(CLIPTextConfig(**text_config)).save_pretrained(out / "text_encoder")
CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).save_pretrained(out / "text_encoder_2")
AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
).save_pretrained(out / "vae")
UNet2DConditionModel(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=4,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
).save_pretrained(out / "unet")
DDPMScheduler(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon"
).save_pretrained(out / "scheduler")
(out / "model_index.json").write_text(
    json.dumps(
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    )
)
print("built", out)
