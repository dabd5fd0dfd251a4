"""Write a random-weight Stable Diffusion 1.5-size diffusers model folder, offline, from configs only.

    python make_model.py OUTDIR TOKENIZER_DIR

sd-scripts needs full SD 1.5 shapes (it converts the diffusers UNet/VAE/text encoder to its own
modules by name and shape), so the configs are SD 1.5's; the weights are random (seed 0), no
download. Scheduler: DDPM, scaled_linear, v_prediction (run kohya with --v_parameterization).
Folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/ (a copy of TOKENIZER_DIR), scheduler/.
Written as fp32 safetensors, readable by diffusers 0.25 (sd-scripts v0.8.7) and newer (main).
"""

import json
import shutil
import sys
from pathlib import Path

import torch


def main(out: Path, tokenizer_dir: Path) -> None:
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (out / "model_index.json").exists():
        print(f"model exists: {out}")
        return
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(0)

    unet = UNet2DConditionModel(  # SD 1.5 v1-inference.yaml
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    del unet

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=512,
        layers_per_block=2,
        act_fn="silu",
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    del vae

    text_config = CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    CLIPTextModel(text_config).save_pretrained(tmp / "text_encoder", safe_serialization=True)

    DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(tmp / "scheduler")
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")

    (tmp / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    tmp.rename(out)
    print(f"model OK (diffusers {diffusers.__version__}, transformers {transformers.__version__}): {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
