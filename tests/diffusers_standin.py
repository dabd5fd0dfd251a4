'''A stand-in for diffusers' train_text_to_image_lora.py, written from its interfaces: the same
anchor lines sdplug's patch finds (argument parsing, scheduler, xformers switch, optimizer, the
inline step, saving), around a tiny convolution that trains on random latents offline.'''
STANDIN = r'''#!/usr/bin/env python
import argparse
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler as _DDPMScheduler


class DDPMScheduler(_DDPMScheduler):
    @classmethod
    def from_pretrained(cls, path, subfolder=None):
        return cls(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")


def check_min_version(version):
    return version


check_min_version("0.40.0.dev0")


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=2)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--prediction_type", type=str, default=None)
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    parser.add_argument("--noise_offset", type=float, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", type=str, default=None)
    args = parser.parse_args()

    return args


class Unet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.embed = torch.nn.Embedding(50, 4)

    def forward(self, x, t, hidden, return_dict=False):
        return (self.conv(x) + hidden.mean(1)[:, :, None, None],)


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
    seen_ids = []
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
                seen_ids.append(batch["input_ids"].clone())

                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

                # Gather the losses across all processes for logging (if we use distributed training).
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            if True:
                global_step += 1

    os.makedirs(args.output_dir, exist_ok=True)
    torch.save({"seen_ids": seen_ids, "optimizer": type(optimizer).__name__}, os.path.join(args.output_dir, "standin.pt"))
    accelerator.end_training()


class _Accelerator:
    def end_training(self):
        pass


accelerator = _Accelerator()

if __name__ == "__main__":
    main()
'''


def make_standin(directory):
    """Write the stand-in as ``DIR/examples/text_to_image/train_text_to_image_lora.py``; returns its path."""
    from pathlib import Path

    path = Path(directory) / "examples" / "text_to_image" / "train_text_to_image_lora.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STANDIN)
    return path
