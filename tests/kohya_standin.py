"""A small stand-in for kohya sd-scripts: same module paths, hook signatures and call flow.

Written from sd-scripts' interfaces (no code of it): ``library/train_util.py`` and
``library/custom_train_functions.py`` with the functions the adapter hooks, and
``train_network.py`` / ``train_db.py`` whose training loops call them the way each version
does (main: ``NetworkTrainer.get_noise_pred_and_target`` / ``post_process_loss`` and a 3-tuple;
v0.8.7: everything inline in ``train()`` and a 4-tuple with ``huber_c``). A tiny model trains
a few steps on CPU in a second, and the scripts record what they saw (captions, noise,
optimizer) in ``output_dir/standin-record.json`` so tests can check the hooks from the host's
side too.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

TRAIN_UTIL_COMMON = '''
import argparse
import json
import random
import tomllib

import torch


class CrossAttention(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_k = torch.nn.Linear(dim, dim)
        self.to_v = torch.nn.Linear(dim, dim)
        self.use_sdpa = False
        self.use_xformers = False

    def set_use_sdpa(self, flag):
        self.use_sdpa = flag

    def set_use_memory_efficient_attention(self, xformers, mem_eff):
        self.use_xformers = xformers

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return x + weights @ v


class UNet2DConditionModel(torch.nn.Module):
    """A tiny stand-in UNet: conv in, one cross-attention, conv out."""

    def __init__(self, channels=4, dim=16):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels, dim, 3, padding=1)
        self.time = torch.nn.Embedding(1000, dim)
        self.attn = CrossAttention(dim)
        self.conv_out = torch.nn.Conv2d(dim, channels, 3, padding=1)

    def set_use_sdpa(self, flag):
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.set_use_sdpa(flag)

    def set_use_memory_efficient_attention(self, xformers, mem_eff):
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.set_use_memory_efficient_attention(xformers, mem_eff)

    def forward(self, x, t, context):
        h = self.conv_in(x) + self.time(t)[:, :, None, None]
        b, c, hh, ww = h.shape
        seq = self.attn(h.flatten(2).transpose(1, 2), context)
        return self.conv_out(seq.transpose(1, 2).reshape(b, c, hh, ww))


class BaseSubset:
    def __init__(self, args):
        self.caption_dropout_rate = getattr(args, "caption_dropout_rate", 0.0)
        self.caption_dropout_every_n_epochs = getattr(args, "caption_dropout_every_n_epochs", 0)
        self.caption_tag_dropout_rate = getattr(args, "caption_tag_dropout_rate", 0.0)
        self.shuffle_caption = getattr(args, "shuffle_caption", False)
        self.keep_tokens = getattr(args, "keep_tokens", 0)
        self.caption_prefix = None


class BaseDataset:
    def __init__(self, args):
        self.subset = BaseSubset(args)
        self.captions = [f"sks dog, photo {i}, grass, sunny" for i in range(8)]
        self.current_epoch = 0

    def set_current_epoch(self, epoch):
        self.current_epoch = epoch

    def process_caption(self, subset, caption):
        if subset.caption_prefix:
            caption = subset.caption_prefix + caption
        if subset.caption_dropout_rate > 0 and random.random() < subset.caption_dropout_rate:
            return ""
        if subset.shuffle_caption:
            tokens = [t.strip() for t in caption.split(",")]
            head, tail = tokens[: subset.keep_tokens], tokens[subset.keep_tokens :]
            random.shuffle(tail)
            caption = ", ".join(head + tail)
        return caption

    def batch(self, indices):
        return [self.process_caption(self.subset, self.captions[i]) for i in indices]


def add_training_arguments(parser):
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--v_parameterization", action="store_true")
    parser.add_argument("--zero_terminal_snr", action="store_true")
    parser.add_argument("--noise_offset", type=float, default=None)
    parser.add_argument("--multires_noise_iterations", type=int, default=None)
    parser.add_argument("--multires_noise_discount", type=float, default=0.3)
    parser.add_argument("--ip_noise_gamma", type=float, default=None)
    parser.add_argument("--min_timestep", type=int, default=None)
    parser.add_argument("--max_timestep", type=int, default=None)
    parser.add_argument("--loss_type", default="l2")
    parser.add_argument("--optimizer_type", default="")
    parser.add_argument("--xformers", action="store_true")
    parser.add_argument("--sdpa", action="store_true")
    parser.add_argument("--mem_eff_attn", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--cache_latents", action="store_true")
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=8)
    parser.add_argument("--persistent_data_loader_workers", action="store_true")
    parser.add_argument("--caption_dropout_rate", type=float, default=0.0)
    parser.add_argument("--caption_dropout_every_n_epochs", type=int, default=0)
    parser.add_argument("--caption_tag_dropout_rate", type=float, default=0.0)
    parser.add_argument("--shuffle_caption", action="store_true")
    parser.add_argument("--keep_tokens", type=int, default=0)
    parser.add_argument("--config_file", default=None)
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")


def verify_command_line_training_args(args):
    pass


def read_config_from_file(args, parser):
    if not args.config_file:
        return args
    values = {}
    with open(args.config_file, "rb") as f:
        loaded = tomllib.load(f)
    for key, value in loaded.items():
        values.update(value if isinstance(value, dict) else {key: value})
    merged = vars(args).copy()
    merged.update(values)
    return argparse.Namespace(**merged)


def get_optimizer(args, trainable_params):
    name = args.optimizer_type or "AdamW"
    optimizer = torch.optim.AdamW(trainable_params, lr=args.learning_rate)
    return f"torch.optim.{name}", "", optimizer


def replace_unet_modules(unet, mem_eff_attn, xformers, sdpa):
    if mem_eff_attn:
        unet.set_use_memory_efficient_attention(False, True)
    elif xformers:
        import xformers.ops  # noqa: F401
        unet.set_use_memory_efficient_attention(True, False)
    elif sdpa:
        unet.set_use_sdpa(True)


def _noise(args, latents):
    noise = torch.randn_like(latents)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    return noise
'''

NOISE_MAIN = """
def get_huber_threshold_if_needed(args, timesteps, noise_scheduler):
    return None


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    noise = _noise(args, latents)
    low = args.min_timestep or 0
    high = args.max_timestep or noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(low, high, (latents.shape[0],))
    if args.ip_noise_gamma:
        noisy_latents = noise_scheduler.add_noise(latents, noise + args.ip_noise_gamma * torch.randn_like(latents), timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy_latents, timesteps
"""

NOISE_V087 = """
def get_timesteps_and_huber_c(args, min_timestep, max_timestep, noise_scheduler, b_size, device):
    return torch.randint(min_timestep, max_timestep, (b_size,), device=device), 1


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    noise = _noise(args, latents)
    low = args.min_timestep or 0
    high = args.max_timestep or noise_scheduler.config.num_train_timesteps
    timesteps, huber_c = get_timesteps_and_huber_c(args, low, high, noise_scheduler, latents.shape[0], latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy_latents, timesteps, huber_c
"""

CUSTOM_TRAIN_FUNCTIONS = """
import torch


def prepare_scheduler_for_custom_training(noise_scheduler, device):
    if hasattr(noise_scheduler, "all_snr"):
        return
    a = noise_scheduler.alphas_cumprod
    noise_scheduler.all_snr = (a / (1 - a)).to(device)


def apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    snr = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    weight = torch.minimum(snr, torch.ones_like(snr) * gamma) / (snr + 1 if v_prediction else snr)
    return loss * weight


def apply_debiased_estimation(loss, timesteps, noise_scheduler, v_prediction=False):
    snr = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    return loss / torch.sqrt(snr)


def add_custom_train_arguments(parser):
    parser.add_argument("--min_snr_gamma", type=float, default=None)
    parser.add_argument("--debiased_estimation_loss", action="store_true")
    parser.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true")
    parser.add_argument("--v_pred_like_loss", type=float, default=None)
"""

SCRIPT_HEAD = """
import argparse
import json
import os

import torch
from diffusers import DDPMScheduler

import library.custom_train_functions as custom_train_functions
import library.train_util as train_util
from library.custom_train_functions import apply_debiased_estimation, apply_snr_weight


def text_condition(captions, dim=16):
    # a caption's embedding: deterministic from its words; the empty caption is all zeros
    rows = []
    for caption in captions:
        g = torch.Generator().manual_seed(sum(ord(c) for c in caption))
        rows.append(torch.zeros(3, dim) if caption == "" else torch.randn(3, dim, generator=g))
    return torch.stack(rows)


def setup_parser():
    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser)
    custom_train_functions.add_custom_train_arguments(parser)
    return parser


def record(args, captions, noises, optimizer, unet):
    os.makedirs(args.output_dir, exist_ok=True)
    low = [n.mean(dim=(2, 3)).flatten().var().item() for n in noises]
    data = {
        "captions": captions,
        "noise_channel_mean_variance": sum(low) / len(low),
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
        "sdpa": unet.attn.use_sdpa,
    }
    with open(os.path.join(args.output_dir, "standin-record.json"), "w") as f:
        json.dump(data, f)


def setup(args):
    torch.manual_seed(args.seed)
    unet = train_util.UNet2DConditionModel()
    train_util.replace_unet_modules(unet, args.mem_eff_attn, args.xformers, args.sdpa)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False)
    custom_train_functions.prepare_scheduler_for_custom_training(scheduler, "cpu")
    return unet, scheduler
"""

TRAIN_NETWORK_MAIN = (
    SCRIPT_HEAD
    + """

class NetworkTrainer:
    def get_noise_pred_and_target(self, args, noise_scheduler, latents, text, unet):
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)
        pred = unet(noisy_latents, timesteps, text)
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        return pred, target, timesteps, noise

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        if args.min_snr_gamma:
            loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
        if args.debiased_estimation_loss:
            loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
        return loss

    def train(self, args):
        unet, scheduler = setup(args)
        dataset = train_util.BaseDataset(args)
        # like sd-scripts main: groups carry their own lr (its --unet_lr default differs)
        trainable_params = [{"params": list(unet.parameters()), "lr": args.learning_rate / 500}]
        optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)
        captions, noises = [], []
        for step in range(args.max_train_steps):
            dataset.set_current_epoch(step // 2 + 1)
            batch = dataset.batch([(step * args.train_batch_size + i) % 8 for i in range(args.train_batch_size)])
            captions += batch
            latents = torch.randn(args.train_batch_size, 4, 8, 8)
            pred, target, timesteps, noise = self.get_noise_pred_and_target(args, scheduler, latents, text_condition(batch), unet)
            noises.append(noise)
            loss = torch.nn.functional.mse_loss(pred, target, reduction="none").mean([1, 2, 3])
            loss = self.post_process_loss(loss, args, timesteps, scheduler)
            loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        record(args, captions, noises, optimizer, unet)


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = NetworkTrainer()
    trainer.train(args)
"""
)

INLINE_TRAIN = (
    SCRIPT_HEAD
    + """

def train(args):
    unet, scheduler = setup(args)
    dataset = train_util.BaseDataset(args)
    trainable_params = list(unet.parameters())
    optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)
    captions, noises = [], []
    for step in range(args.max_train_steps):
        dataset.set_current_epoch(step // 2 + 1)
        batch = dataset.batch([(step * args.train_batch_size + i) % 8 for i in range(args.train_batch_size)])
        captions += batch
        latents = torch.randn(args.train_batch_size, 4, 8, 8)
        noise, noisy_latents, timesteps, huber_c = train_util.get_noise_noisy_latents_and_timesteps(args, scheduler, latents)
        noises.append(noise)
        pred = unet(noisy_latents, timesteps, text_condition(batch))
        target = scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        loss = torch.nn.functional.mse_loss(pred, target, reduction="none").mean([1, 2, 3])
        if args.min_snr_gamma:
            loss = apply_snr_weight(loss, timesteps, scheduler, args.min_snr_gamma, args.v_parameterization)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    record(args, captions, noises, optimizer, unet)


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    train(args)
"""
)


def make_standin(root: Path, version: str) -> Path:
    """Write a stand-in sd-scripts tree of ``version`` ("main" or "v0.8.7") under ``root``."""
    (root / "library").mkdir(parents=True, exist_ok=True)
    (root / "library" / "__init__.py").write_text("")
    noise = NOISE_MAIN if version == "main" else NOISE_V087
    (root / "library" / "train_util.py").write_text(textwrap.dedent(TRAIN_UTIL_COMMON) + noise)
    (root / "library" / "custom_train_functions.py").write_text(CUSTOM_TRAIN_FUNCTIONS)
    if version == "main":
        (root / "train_network.py").write_text(TRAIN_NETWORK_MAIN)
    else:
        (root / "train_network.py").write_text(INLINE_TRAIN)
    (root / "train_db.py").write_text(
        INLINE_TRAIN
        if version != "main"
        else INLINE_TRAIN.replace("noise, noisy_latents, timesteps, huber_c = ", "noise, noisy_latents, timesteps = ")
    )
    return root
