"""Build a tiny random-weight SD1.5-structured pipeline folder and an imagefolder dataset, offline."""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

out = Path(sys.argv[1])
torch.manual_seed(0)

# tokenizer: a tiny BPE vocabulary, written in CLIP's file format
words = ["a", "photo", "of", "sks", "dog", "cat", "red", "blue", "picture", "on", "sofa"]
chars = sorted(set("".join(words)))
vocab = {}
for c in chars:
    vocab.setdefault(c, len(vocab))
    vocab.setdefault(c + "</w>", len(vocab))
merges = []
for w in words:
    parts = list(w[:-1]) + [w[-1] + "</w>"]
    while len(parts) > 1:
        a, b = parts[0], parts[1]
        merges.append(f"{a} {b}")
        parts = [a + b] + parts[2:]
        vocab.setdefault(parts[0], len(vocab))
for t in ("<|startoftext|>", "<|endoftext|>"):
    vocab[t] = len(vocab)
tok_dir = out / "tokenizer"
tok_dir.mkdir(parents=True, exist_ok=True)
(tok_dir / "vocab.json").write_text(json.dumps(vocab))
(tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
tokenizer = CLIPTokenizer(
    str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16, pad_token="<|endoftext|>"
)
tokenizer.save_pretrained(tok_dir)

te = CLIPTextModel(
    CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
)
te.save_pretrained(out / "text_encoder")
vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)
vae.save_pretrained(out / "vae")
unet = UNet2DConditionModel(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=4,
)
unet.save_pretrained(out / "unet")
DDPMScheduler(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
).save_pretrained(out / "scheduler")
(out / "model_index.json").write_text(
    json.dumps(
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
    )
)
data = Path(sys.argv[2])
data.mkdir(parents=True, exist_ok=True)
with open(data / "metadata.jsonl", "w") as f:
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 100, 200 - 20 * i)).save(data / f"{i}.png")
        f.write(json.dumps({"file_name": f"{i}.png", "text": "a photo of sks dog" if i % 2 else "a red cat on sofa"}) + "\n")
print("built", out, data)
