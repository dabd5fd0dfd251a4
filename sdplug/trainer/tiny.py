"""The embedded default: a tiny Stable-Diffusion-architecture model built from configs.

Pixel space: a random-weights VAE reconstructs nothing, so the tiny default trains its UNet
directly on 32x32 RGB images scaled to [-1, 1] (no autoencoder; "latents" are pixels). The
UNet, CLIP text encoder and CLIP tokenizer are the same classes Stable Diffusion uses, only
smaller; the tokenizer's vocabulary is built locally from the words the synthetic captions use.
Nothing is downloaded.
"""

from __future__ import annotations

# diffusers.models and .schedulers.scheduling_ddpm, not diffusers' top level (the same classes):
# type checkers read the top level as its dummy objects (the branch for a missing torch).
from typing import Any

import torch
from diffusers.models import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdplug.trainer.synthetic import VOCABULARY

IMAGE_SIZE = 32
MAX_TOKENS = 16
TEXT_WIDTH = 64
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def build_tokenizer(words: tuple[str, ...] = VOCABULARY) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each known word as one token.

    Unknown words still tokenize, letter by letter (every lowercase letter is in the vocab).
    """
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.-'") | {c for w in words for c in w})
    vocab: dict[str, int] = {}
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in sorted(set(words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for token in SPECIAL:
        vocab.setdefault(token, len(vocab))
    # built in memory: several processes of one run may build it at once
    # ignore: transformers types merges as list[str], but passes them to tokenizers' BPE, which
    # takes (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=MAX_TOKENS)  # type: ignore[misc]


def build_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


# the embedded model trained as a rectified flow: the UNet is the same, the process is SD3's
FLOW_SHIFT = 1.0  # the tiny model's 32x32 pixels need no shift toward noise (SD3 shifts by 3 at 1024 px)


def build_flow_scheduler() -> Any:
    """The flow-matching scheduler of the embedded model on rectified flow (1000 steps, no shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def build_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """Stable Diffusion's training schedule (scaled_linear, 1000 steps).

    ``steps_offset = 1`` as in Stable Diffusion's own scheduler config: it only shifts inference
    timesteps by one, and diffusers' StableDiffusionPipeline warns about any other value.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
