"""Stand-ins for diffusers' six flow-matching DreamBooth LoRA scripts, written from their
interfaces: each has the lines sdplug's patch anchors on (argument parsing, the scheduler and its
copy, the optimizer before ``get_scheduler``, the inline draw, the weighting, the loss, the step
counter), the script's own sigma convention (Lumina 2's reversed interpolation and target, SD3's
preconditioned output, Z-Image's negated prediction, Qwen-Image's 5-D latents) and its way of
holding prompt embeddings, around a tiny convolution that trains on random latents offline.

Each records what its step used (latents, noise, sigmas, model time, noisy input, target,
prediction, loss, the prompt rows) in ``output_dir/standin.pt``."""

from __future__ import annotations

from pathlib import Path

_HEAD = r'''#!/usr/bin/env python
import argparse
import copy
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler as _Scheduler


def check_min_version(version):
    return version


check_min_version("0.40.0.dev0")

SCHEDULER = dict(num_train_timesteps=1000, shift=__SHIFT__, use_dynamic_shifting=__DYNAMIC__)


class FlowMatchEulerDiscreteScheduler(_Scheduler):
    @classmethod
    def from_pretrained(cls, path, subfolder=None, **kwargs):
        return cls(**{**SCHEDULER, **kwargs})


def compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean=None, logit_std=None, mode_scale=None):
    import math

    if weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,)))
    u = torch.rand(size=(batch_size,))
    if weighting_scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def compute_loss_weighting_for_sd3(weighting_scheme, sigmas=None):
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (3.141592653589793 * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def get_scheduler(*args, **kwargs):
    return None


class Encoder(torch.nn.Module):
    """A text encoder: a prompt's rows are a function of its text (the empty prompt's are zeros
    plus a bias the tests know)."""

    def __init__(self, width, seed):
        super().__init__()
        self.width, self.seed = width, seed
        self.config = argparse.Namespace(hidden_size=width, projection_dim=width)

    def forward(self, prompts, length):
        rows = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(self.seed + sum(map(ord, prompt)))
            rows.append(torch.randn(length, self.width, generator=generator) if prompt else torch.full((length, self.width), -1.0))
        return torch.stack(rows)


class Transformer(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t, text):
        squeeze = x.dim() == 5
        frames = x.squeeze(2) if squeeze else x
        out = self.conv(frames) + t.view(-1, 1, 1, 1) / 1000 + text.mean((1, 2)).view(-1, 1, 1, 1)
        return out.unsqueeze(2) if squeeze else out


class Dataset:
    custom_instance_prompts = None


class _Accelerator:
    device = torch.device("cpu")

    def backward(self, loss):
        loss.backward()

    def end_training(self):
        pass


accelerator = _Accelerator()
RECORD = []


def record(**values):
    RECORD.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in values.items()})


def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=2)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--optimizer", type=str, default="AdamW")
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-04)
    parser.add_argument("--weighting_scheme", type=str, default="__SCHEME__", choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--mode_scale", type=float, default=1.29)
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--cache_latents", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", type=str, default=None)
    parser.add_argument("--height", type=int, default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--latent_channels", type=int, default=4)
__ARGS__
    if input_args is not None:
        args = parser.parse_args(input_args)
    else:
        args = parser.parse_args()

    return args


def main(args):
    torch.manual_seed(args.seed or 0)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(None, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    transformer = Transformer(args.latent_channels)
    train_dataset = Dataset()
__ENCODERS__
    params_to_optimize = list(transformer.parameters())
    optimizer_class = torch.optim.AdamW
    if args.optimizer == "AdamW":
        optimizer = optimizer_class(
            params_to_optimize,
            lr=args.learning_rate,
            betas=(args.adam_beta1, 0.999),
            weight_decay=args.adam_weight_decay,
        )
    else:
        optimizer = optimizer_class(params_to_optimize, lr=args.learning_rate)

    lr_scheduler = get_scheduler(
        "constant",
        optimizer=optimizer,
    )

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    prompts_all = ["a photo of sks dog"] * args.train_batch_size
    if args.with_prior_preservation:
        prompts_all += ["a photo of a dog"] * args.train_batch_size
    global_step = 0
    for epoch in range(0, 1):
        for step in range(args.max_train_steps):
            batch = {"prompts": list(prompts_all)}
            if True:
                prompts = batch["prompts"]
__PROMPTS__
                # Convert images to latent space
                model_input = torch.randn(len(prompts), args.latent_channels, __FRAMES__args.height, args.width)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                u = compute_density_for_timestep_sampling(
                    weighting_scheme=args.weighting_scheme,
                    batch_size=bsz,
                    logit_mean=args.logit_mean,
                    logit_std=args.logit_std,
                    mode_scale=args.mode_scale,
                )
                indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
                timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
__STEP__
                weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
__TARGET__
                full_pred, full_target = model_pred, target
                if args.with_prior_preservation:
                    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                    target, target_prior = torch.chunk(target, 2, dim=0)
                    weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
                    prior_loss = torch.mean(
                        (weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
                            target_prior.shape[0], -1
                        ),
                        1,
                    )
                    prior_loss = prior_loss.mean()

                loss = torch.mean(
                    (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
                    1,
                )
                loss = loss.mean()

                if args.with_prior_preservation:
                    loss = loss + args.prior_loss_weight * prior_loss

                accelerator.backward(loss)
                record(latents=model_input, noise=noise, timesteps=timesteps, sigmas=sigmas, noisy=noisy_model_input, target=full_target, pred=full_pred, loss=loss, text=text_rows)
                optimizer.step()
                optimizer.zero_grad()

            if True:
                global_step += 1

    os.makedirs(args.output_dir, exist_ok=True)
    saved = {"steps": RECORD, "optimizer": type(optimizer).__name__, "lr": optimizer.param_groups[0]["lr"]}
    torch.save(saved, os.path.join(args.output_dir, "standin.pt"))
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    main(args)
'''

_NOISY = "                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise\n"
# per script: scheduler (shift, dynamic), default --weighting_scheme, extra arguments, encoders,
# how prompts become rows, the model call and the target
SCRIPTS = {
    "train_dreambooth_lora_flux.py": dict(
        shift=3.0,
        dynamic=True,
        scheme="none",
        args='    parser.add_argument("--guidance_scale", type=float, default=3.5)\n',
        encoders="""    text_encoder_one, text_encoder_two = Encoder(6, 1), Encoder(5, 2)
    text_encoders = [text_encoder_one, text_encoder_two]
    tokenizers = [None, None]

    def compute_text_embeddings(prompt, text_encoders, tokenizers):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        with torch.no_grad():
            prompt_embeds = text_encoders[1](prompt, 7)
            pooled_prompt_embeds = text_encoders[0](prompt, 1)[:, 0]
            text_ids = torch.zeros(7, 3)
        return prompt_embeds, pooled_prompt_embeds, text_ids
""",
        prompts="""                prompt_embeds, pooled_prompt_embeds, text_ids = compute_text_embeddings(
                    prompts, text_encoders, tokenizers
                )
""",
        step=_NOISY
        + """                text_rows = {"t5xxl": prompt_embeds, "clip_l": pooled_prompt_embeds}
                model_pred = transformer(noisy_model_input, timesteps, prompt_embeds + pooled_prompt_embeds.mean(1).view(-1, 1, 1))
""",
        target="                target = noise - model_input\n",
    ),
    "train_dreambooth_lora_flux2.py": dict(
        shift=3.0,
        dynamic=True,
        scheme="none",
        args='    parser.add_argument("--guidance_scale", type=float, default=3.5)\n'
        '    parser.add_argument("--remote_text_encoder", action="store_true")\n',
        encoders="""    text_encoder = Encoder(6, 5)
    text_encoding_pipeline = text_encoder

    def compute_text_embeddings(prompt, text_encoding_pipeline):
        with torch.no_grad():
            return text_encoding_pipeline([prompt], 5), torch.zeros(1, 5, 4)

    static_prompt_embeds, static_text_ids = compute_text_embeddings("a photo of sks dog", text_encoding_pipeline)
    if not args.remote_text_encoder:
        text_encoding_pipeline = text_encoding_pipeline.to("cpu")
        del text_encoder
""",
        prompts="""                prompt_embeds = static_prompt_embeds.repeat_interleave(len(prompts), dim=0)
""",
        step=_NOISY
        + """                text_rows = prompt_embeds
                model_pred = transformer(noisy_model_input, timesteps, prompt_embeds)
""",
        target="                target = noise - model_input\n",
    ),
    "train_dreambooth_lora_sd3.py": dict(
        shift=3.0,
        dynamic=False,
        scheme="logit_normal",
        args='    parser.add_argument("--precondition_outputs", type=int, default=1)\n'
        '    parser.add_argument("--max_sequence_length", type=int, default=5)\n',
        # CLIP-L (4 wide) | CLIP-G (6 wide) on 3 "CLIP tokens", then T5 (10 wide) on max_sequence_length tokens
        encoders="""    text_encoder_one, text_encoder_two, text_encoder_three = Encoder(4, 6), Encoder(6, 7), Encoder(10, 8)
    text_encoders = [text_encoder_one, text_encoder_two, text_encoder_three]
    tokenizers = [None, None, None]

    if not args.train_text_encoder:

        def compute_text_embeddings(prompt, text_encoders, tokenizers):
            prompt = [prompt] if isinstance(prompt, str) else prompt
            with torch.no_grad():
                l, g = text_encoders[0](prompt, 3), text_encoders[1](prompt, 3)
                t5 = text_encoders[2](prompt, args.max_sequence_length)
                return torch.cat([torch.cat([l, g], dim=-1), t5], dim=-2), torch.cat([l.mean(1), g.mean(1)], dim=-1)

    instance_prompt_hidden_states, instance_pooled_prompt_embeds = compute_text_embeddings(
        "a photo of sks dog", text_encoders, tokenizers
    )

    # Clear the memory here
    if not args.train_text_encoder:
        del tokenizers, text_encoders
        del text_encoder_one, text_encoder_two, text_encoder_three
    prompt_embeds = instance_prompt_hidden_states
    pooled_prompt_embeds = instance_pooled_prompt_embeds
""",
        prompts="",
        step=_NOISY
        + """                text_rows = {"embeds": prompt_embeds.expand(len(prompts), -1, -1), "pooled": pooled_prompt_embeds.expand(len(prompts), -1)}
                model_pred = transformer(noisy_model_input, timesteps, text_rows["embeds"] + text_rows["pooled"].mean(1).view(-1, 1, 1))
                if args.precondition_outputs:
                    model_pred = model_pred * (-sigmas) + noisy_model_input
""",
        target="""                if args.precondition_outputs:
                    target = model_input
                else:
                    target = noise - model_input
""",
    ),
    "train_dreambooth_lora_qwen_image.py": dict(
        shift=1.0,
        dynamic=True,
        scheme="none",
        args='    parser.add_argument("--caption_dropout", type=float, default=0.0)\n',
        encoders="""    import random

    text_encoder = Encoder(6, 9)
    text_encoding_pipeline = text_encoder

    def compute_text_embeddings(prompt, text_encoding_pipeline):
        with torch.no_grad():
            embeds = text_encoding_pipeline([prompt], 5)
            mask = torch.ones(1, 5, dtype=torch.long) if prompt else torch.tensor([[1, 0, 0, 0, 0]])
            return embeds, mask

    instance_prompt_embeds, instance_prompt_embeds_mask = compute_text_embeddings("a photo of sks dog", text_encoding_pipeline)
    if args.caption_dropout > 0:
        empty_prompt_embeds, empty_prompt_embeds_mask = compute_text_embeddings("", text_encoding_pipeline)
    text_encoding_pipeline = text_encoding_pipeline.to("cpu")
    del text_encoder
""",
        prompts="""                n_inst = len(prompts)
                instance_pairs = [(instance_prompt_embeds, instance_prompt_embeds_mask)] * n_inst

                if args.caption_dropout > 0:
                    instance_pairs = [
                        (empty_prompt_embeds, empty_prompt_embeds_mask)
                        if random.random() < args.caption_dropout
                        else pair
                        for pair in instance_pairs
                    ]
                prompt_embeds = torch.cat([pair[0] for pair in instance_pairs])
                prompt_embeds_mask = torch.cat([pair[1] for pair in instance_pairs])
                text_rows = {"embeds": prompt_embeds, "mask": prompt_embeds_mask}
""",
        frames="1, ",
        step=_NOISY + "                model_pred = transformer(noisy_model_input, timesteps / 1000 * 1000, prompt_embeds)\n",
        target="                target = noise - model_input\n",
    ),
    "train_dreambooth_lora_z_image.py": dict(
        shift=3.0,
        dynamic=False,
        scheme="none",
        args="",
        encoders="""    text_encoder = Encoder(6, 10)
    text_encoding_pipeline = text_encoder

    def compute_text_embeddings(prompt, text_encoding_pipeline):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        with torch.no_grad():
            return [row[: 2 + len(p) % 3] for row, p in zip(text_encoding_pipeline(prompt, 5), prompt)]  # variable lengths

    prompt_embeds = compute_text_embeddings("a photo of sks dog", text_encoding_pipeline)
    text_encoding_pipeline = text_encoding_pipeline.to("cpu")
    del text_encoder
""",
        # the script's own list rebinding (its shared list grows by len(prompts) each step)
        prompts="""                num_repeat_elements = len(prompts)
                prompt_embeds = [pe for pe in prompt_embeds for _ in range(num_repeat_elements)]
""",
        step=_NOISY
        + """                text_rows = [pe.clone() for pe in prompt_embeds[: len(prompts)]]
                timestep_normalized = (1000 - timesteps) / 1000
                model_pred = transformer(noisy_model_input, timestep_normalized * 1000, torch.stack([pe.mean(0) for pe in text_rows])[:, None])
                model_pred = -model_pred
""",
        target="                target = noise - model_input\n",
    ),
    "train_dreambooth_lora_lumina2.py": dict(
        shift=6.0,
        dynamic=False,
        scheme="none",
        args="",
        encoders="""    text_encoder = Encoder(6, 4)
    text_encoding_pipeline = text_encoder

    def compute_text_embeddings(prompt, text_encoding_pipeline):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        with torch.no_grad():
            prompt_embeds = text_encoding_pipeline(prompt, 5)
            prompt_attention_mask = torch.ones(len(prompt), 5, dtype=torch.long)
            prompt_attention_mask[[i for i, p in enumerate(prompt) if not p], 1:] = 0
        return prompt_embeds, prompt_attention_mask

    prompt_embeds, prompt_attention_mask = compute_text_embeddings("a photo of sks dog", text_encoding_pipeline)
""",
        prompts="",
        step="""                noisy_model_input = (1.0 - sigmas) * noise + sigmas * model_input
                timesteps = timesteps / noise_scheduler.config.num_train_timesteps
                model_pred = transformer(
                    noisy_model_input,
                    timesteps * 1000,
                    prompt_embeds.repeat(len(prompts), 1, 1) * prompt_attention_mask.repeat(len(prompts), 1)[..., None]
                    if not train_dataset.custom_instance_prompts
                    else prompt_embeds,
                )
                text_rows = {"embeds": prompt_embeds.repeat(len(prompts), 1, 1), "mask": prompt_attention_mask.repeat(len(prompts), 1)}
""",
        target="                target = model_input - noise\n",
    ),
}


def standin_source(script: str) -> str:
    spec = SCRIPTS[script]
    source = _HEAD
    for key, value in (
        ("__SHIFT__", repr(spec["shift"])),
        ("__DYNAMIC__", repr(spec["dynamic"])),
        ("__SCHEME__", spec["scheme"]),
        ("__ARGS__\n", spec["args"]),
        ("__ENCODERS__\n", spec["encoders"]),
        ("__PROMPTS__\n", spec["prompts"]),
        ("__FRAMES__", spec.get("frames", "")),
        ("__STEP__\n", spec["step"]),
        ("__TARGET__\n", spec["target"]),
    ):
        source = source.replace(key, value)
    return source


def make_flow_standin(directory: Path, script: str) -> Path:
    """Write the stand-in of ``script`` as ``DIR/examples/dreambooth/SCRIPT``; returns its path."""
    path = Path(directory) / "examples" / "dreambooth" / script
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(standin_source(script))
    return path
