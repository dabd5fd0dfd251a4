"""Stand-ins for diffusers' train_text_to_image_lora.py and train_dreambooth_lora.py, written
from their interfaces: the same anchor lines sdplug's patch finds (argument parsing, scheduler,
xformers switch, optimizer, the inline step, saving), around a tiny convolution that trains on
random latents offline. Each records what its step used (latents, noise, timesteps, noisy input,
target, prediction, loss, caption rows), the optimizer and the attention processor in
``output_dir/standin.pt``, so tests can replay the plan's draws and compare."""

from pathlib import Path

_HEAD = r"""#!/usr/bin/env python
import argparse
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler as _DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor


class DDPMScheduler(_DDPMScheduler):
    @classmethod
    def from_pretrained(cls, path, subfolder=None):
        return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")  # SD's


def check_min_version(version):
    return version


check_min_version("0.40.0.dev0")


class Unet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.embed = torch.nn.Embedding(50, 4)
        self.processor = AttnProcessor()

    @property
    def attn_processors(self):
        return {"mid_block.attentions.0.processor": self.processor}

    def set_attn_processor(self, processor):
        self.processor = processor

    def forward(self, x, t, hidden, return_dict=False):
        return (self.conv(x) + hidden.mean(1)[:, :, None, None],)


class _Accelerator:
    def backward(self, loss):
        loss.backward()

    def end_training(self):
        pass


accelerator = _Accelerator()
RECORD = []


def record(**values):
    RECORD.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in values.items()})


def save_record(args, optimizer, unet):
    os.makedirs(args.output_dir, exist_ok=True)
    saved = {"steps": RECORD, "seen_ids": [r["ids"] for r in RECORD], "optimizer": type(optimizer).__name__}
    saved.update(lr=optimizer.param_groups[0]["lr"], processor=type(unet.processor).__name__)
    torch.save(saved, os.path.join(args.output_dir, "standin.pt"))


def common_args(parser):
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=2)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", type=str, default=None)
"""

STANDIN = (
    _HEAD
    + r"""

def parse_args():
    parser = argparse.ArgumentParser()
    common_args(parser)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--prediction_type", type=str, default=None)
    parser.add_argument("--noise_offset", type=float, default=0)
    args = parser.parse_args()

    return args


def main():
    args = parse_args()
    torch.manual_seed(args.seed or 0)
    noise_scheduler = DDPMScheduler.from_pretrained(None, subfolder="scheduler")
    unet = Unet()
    text_encoder = lambda ids, return_dict=False: (unet.embed(ids),)  # noqa: E731
    caption_column = "text"

    def tokenize_captions(examples, is_train=True):
        return torch.tensor([[1 + len(c), 2, 3, 0] if c else [1, 0, 0, 0] for c in examples[caption_column]])

    if args.enable_xformers_memory_efficient_attention:
        if False:
            pass
        else:
            raise ValueError("xformers is not available. Make sure it is installed correctly")

    lora_layers = filter(lambda p: p.requires_grad, unet.conv.parameters())
    optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(
        lora_layers,
        lr=args.learning_rate,
        betas=(args.adam_beta1, 0.999),
        weight_decay=args.adam_weight_decay,
    )

    global_step = 0
    for epoch in range(0, 1):
        for step in range(args.max_train_steps):
            batch = {"input_ids": tokenize_captions({caption_column: ["a photo"] * args.train_batch_size})}
            if True:
                latents = torch.randn(args.train_batch_size, 4, 8, 8)
                noise = torch.randn_like(latents)
                if args.noise_offset:
                    noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1))

                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                timesteps = timesteps.long()

                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]

                if args.prediction_type is not None:
                    noise_scheduler.register_to_config(prediction_type=args.prediction_type)

                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

                # Gather the losses across all processes for logging (if we use distributed training).
                record(latents=latents, noise=noise, timesteps=timesteps, noisy=noisy_latents, target=target, pred=model_pred, loss=loss, ids=batch["input_ids"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            if True:
                global_step += 1

    save_record(args, optimizer, unet)
    accelerator.end_training()


if __name__ == "__main__":
    main()
"""
)

DREAMBOOTH_STANDIN = (
    _HEAD
    + r"""

def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    common_args(parser)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--pre_compute_text_embeddings", action="store_true")
    parser.add_argument("--tokenizer_max_length", type=int, default=None)

    if input_args is not None:
        args = parser.parse_args(input_args)
    else:
        args = parser.parse_args()

    return args


def tokenize_prompt(tokenizer, prompt, tokenizer_max_length=None):
    ids = torch.tensor([[1 + len(prompt), 2, 3, 0] if prompt else [1, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def main(args):
    torch.manual_seed(args.seed or 0)
    noise_scheduler = DDPMScheduler.from_pretrained(None, subfolder="scheduler")
    unet = Unet()
    tokenizer = None

    if args.enable_xformers_memory_efficient_attention:
        if False:
            pass
        else:
            raise ValueError("xformers is not available. Make sure it is installed correctly")

    optimizer_class = torch.optim.AdamW
    params_to_optimize = list(filter(lambda p: p.requires_grad, unet.conv.parameters()))
    optimizer = optimizer_class(
        params_to_optimize,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    def compute_text_embeddings(prompt):
        with torch.no_grad():
            return unet.embed(tokenize_prompt(tokenizer, prompt)["input_ids"])

    validation_prompt_negative_prompt_embeds = compute_text_embeddings("") if args.pre_compute_text_embeddings else None
    prompts = ["a photo of sks dog"] * args.train_batch_size
    if args.with_prior_preservation:
        prompts += ["a photo of a dog"] * args.train_batch_size

    global_step = 0
    for epoch in range(0, 1):
        for step in range(args.max_train_steps):
            if args.pre_compute_text_embeddings:
                batch = {"input_ids": torch.cat([compute_text_embeddings(p) for p in prompts])}
            else:
                tokens = [tokenize_prompt(tokenizer, p) for p in prompts]
                batch = {"input_ids": torch.cat([t["input_ids"] for t in tokens]), "attention_mask": [t["attention_mask"] for t in tokens]}
            if True:
                model_input = torch.randn(len(prompts), 4, 8, 8)

                noise = torch.randn_like(model_input)
                bsz, channels, height, width = model_input.shape
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device
                )
                timesteps = timesteps.long()

                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)

                # Get the text embedding for conditioning
                if args.pre_compute_text_embeddings:
                    encoder_hidden_states = batch["input_ids"]
                else:
                    encoder_hidden_states = unet.embed(batch["input_ids"])

                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]

                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

                full_pred, full_target = model_pred, target
                if args.with_prior_preservation:
                    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                    target, target_prior = torch.chunk(target, 2, dim=0)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
                    loss = loss + args.prior_loss_weight * prior_loss
                else:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

                accelerator.backward(loss)
                masks = torch.cat(batch["attention_mask"]) if "attention_mask" in batch else None
                record(latents=model_input, noise=noise, timesteps=timesteps, noisy=noisy_model_input, target=full_target, pred=full_pred, loss=loss, ids=batch["input_ids"], masks=masks)
                optimizer.step()
                optimizer.zero_grad()

            if True:
                global_step += 1

    save_record(args, optimizer, unet)
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    main(args)
"""
)


def make_standin(directory):
    """Write the text-to-image stand-in as ``DIR/examples/text_to_image/train_text_to_image_lora.py``; returns its path."""
    path = Path(directory) / "examples" / "text_to_image" / "train_text_to_image_lora.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STANDIN)
    return path


def make_dreambooth_standin(directory):
    """Write the dreambooth stand-in as ``DIR/examples/dreambooth/train_dreambooth_lora.py``; returns its path."""
    path = Path(directory) / "examples" / "dreambooth" / "train_dreambooth_lora.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DREAMBOOTH_STANDIN)
    return path
