"""A small stand-in for kohya sd-scripts: same module paths, hook signatures and call flow.

Written from sd-scripts' interfaces (no code of it): ``library/train_util.py`` and
``library/custom_train_functions.py`` with the functions the adapter hooks, and
``train_network.py`` / ``train_db.py`` whose training loops call them the way each version
does (main: ``NetworkTrainer.get_noise_pred_and_target`` / ``post_process_loss`` and a 3-tuple;
v0.8.7: everything inline in ``train()`` and a 4-tuple with ``huber_c``). Datasets return
whole batches from ``__getitem__``, tokenized or, in ``sdxl_train_network.py`` with
``--cache_text_encoder_outputs``, with cached text-encoder outputs under each version's keys,
cached by each version's route (main: caching strategies; v0.8.7:
``cache_batch_text_encoder_outputs``). A tiny model trains a few steps on CPU in a second, and
the scripts record what they saw (captions, noise, optimizer, rows equal to the empty
caption's encoding) in ``output_dir/standin-record.json`` so tests can check the hooks from
the host's side too. With ``--network_module networks.lora`` the network scripts build a network
from that module and save it as sd-scripts does (``save_weights(file, dtype, metadata)``: the
``ss_*`` training arguments, the model spec merged on top), as JSON in ``output_dir/last.safetensors``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

TRAIN_UTIL_COMMON = '''
import argparse
import json
import os
import random
import tomllib

import numpy as np

import torch


class CrossAttention(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_k = torch.nn.Linear(dim, dim)
        self.to_v = torch.nn.Linear(dim, dim)
        # the switches sd-scripts' own CrossAttention checks in its forward
        self.use_memory_efficient_attention_xformers = False
        self.use_memory_efficient_attention_mem_eff = False
        self.use_sdpa = False

    def set_use_sdpa(self, flag):
        self.use_sdpa = flag

    def set_use_memory_efficient_attention(self, xformers, mem_eff):
        self.use_memory_efficient_attention_xformers = xformers
        self.use_memory_efficient_attention_mem_eff = mem_eff

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
        self.keep_tokens_separator = getattr(args, "keep_tokens_separator", "")
        self.caption_separator = getattr(args, "caption_separator", ",")
        self.token_warmup_step = getattr(args, "token_warmup_step", 0)
        if hasattr(args, "token_warmup_min"):  # the flow stand-ins' parsers (the real ones') have it
            self.token_warmup_min = args.token_warmup_min
        self.caption_prefix = None


def stacked(rows):
    # main's collation of cached rows: rows of different lengths padded with zeros to the longest
    rows = [torch.as_tensor(row).float() for row in rows]
    longest = max(row.shape[0] if row.dim() else 0 for row in rows)
    padded = (torch.nn.functional.pad(row, (0, 0) * (row.dim() - 1) + (0, longest - row.shape[0])) if row.dim() else row for row in rows)
    return torch.stack(list(padded))


def tokenize(caption, length=8):
    # stand-in tokenizer: begin, one id per word, end, padding
    words = caption.replace(",", " ").split()
    ids = [1] + [sum(map(ord, w)) % 90 + 3 for w in words][: length - 2] + [2]
    return torch.tensor(ids + [0] * (length - len(ids)))


class TextEncoder(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(96, dim)

    def forward(self, ids):
        return self.embed(ids)


class ImageInfo:
    def __init__(self, key, caption, output_dir):
        self.image_key = key
        self.caption = caption
        self.absolute_path = os.path.join(output_dir, key + ".png")
        self.text_encoder_outputs = None
        self.text_encoder_outputs_npz = None
        self.text_encoder_outputs1 = self.text_encoder_outputs2 = self.text_encoder_pool2 = None


class DatasetCommon:
    def __init__(self, args, is_training_dataset=True):
        self.is_training_dataset = is_training_dataset  # main: False for the validation split
        self.subset = BaseSubset(args)
        self.batch_size = args.train_batch_size
        self.max_token_length = None
        self.image_data = {
            f"img{i}": ImageInfo(f"img{i}", f"sks dog, photo {i}, grass, sunny", args.output_dir) for i in range(8)
        }
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

    def infos(self, index):
        keys = list(self.image_data)
        return [self.image_data[keys[(index * self.batch_size + i) % len(keys)]] for i in range(self.batch_size)]


def add_training_arguments(parser):
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--unet_lr", type=float, default=None)
    parser.add_argument("--text_encoder_lr", type=float, nargs="*", default=None)
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
    parser.add_argument("--optimizer_args", type=str, default=None, nargs="*")
    parser.add_argument("--lr_scheduler", default="constant")
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
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
    parser.add_argument("--keep_tokens_separator", type=str, default="")
    parser.add_argument("--caption_separator", type=str, default=",")
    parser.add_argument("--token_warmup_step", type=float, default=0)
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--config_file", default=None)
    parser.add_argument("--huber_c", type=float, default=0.1)
    parser.add_argument("--huber_schedule", default="snr")
    parser.add_argument("--pretrained_model_name_or_path", default=None)  # the stand-in trains its own tiny model
    parser.add_argument("--network_module", default=None)
    parser.add_argument("--no_metadata", action="store_true")
    parser.add_argument("--crash_at_step", type=int, default=None)  # stand-in only: a host failure
    parser.add_argument("--nan_loss_at_step", type=int, default=None)  # stand-in only: an overflow in a step


def verify_command_line_training_args(args):
    pass


def get_sai_model_spec(state_dict, args, sdxl, lora, textual_inversion, is_stable_diffusion_ckpt=None):
    return {"modelspec.architecture": "stable-diffusion-v1/lora" if lora else "stable-diffusion-v1"}


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


def conditional_loss(model_pred, target, loss_type, reduction, huber_c=None):
    # main's signature; the stand-in knows l2 and l1
    loss = torch.nn.functional.mse_loss(model_pred, target, reduction=reduction) if loss_type == "l2" else (
        torch.nn.functional.l1_loss(model_pred, target, reduction=reduction)
    )
    return loss


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
DATASET_MAIN = """

class _Strategy:
    _strategy = None

    @classmethod
    def set_strategy(cls, strategy):
        cls._strategy = strategy

    @classmethod
    def get_strategy(cls):
        return cls._strategy


class TokenizeStrategy(_Strategy):
    def tokenize(self, text):
        text = [text] if isinstance(text, str) else text
        return [torch.stack([tokenize(t) for t in text])]


class TextEncodingStrategy(_Strategy):
    def encode_tokens(self, tokenize_strategy, models, tokens):
        hidden = models[0](tokens[0])
        return [hidden, hidden.mean(dim=1)]


class TextEncoderOutputsCachingStrategy(_Strategy):
    def __init__(self, cache_to_disk):
        self.cache_to_disk = cache_to_disk

    def get_outputs_npz_path(self, image_path):
        return os.path.splitext(image_path)[0] + "_te_outputs.npz"

    def cache_batch_outputs(self, tokenize_strategy, models, text_encoding_strategy, infos):
        tokens = tokenize_strategy.tokenize([info.caption for info in infos])
        with torch.no_grad():
            hidden, pool = text_encoding_strategy.encode_tokens(tokenize_strategy, models, tokens)
        hidden, pool = hidden.cpu().numpy(), pool.cpu().numpy()
        for i, info in enumerate(infos):
            if self.cache_to_disk:
                np.savez(info.text_encoder_outputs_npz, hidden=hidden[i], pool=pool[i])
            else:
                info.text_encoder_outputs = [hidden[i], pool[i]]

    def load_outputs_npz(self, path):
        data = np.load(path)
        return [data["hidden"], data["pool"]]


class BaseDataset(DatasetCommon):
    def new_cache_text_encoder_outputs(self, models, accelerator):
        caching = TextEncoderOutputsCachingStrategy.get_strategy()
        infos = list(self.image_data.values())
        if caching.cache_to_disk:
            os.makedirs(os.path.dirname(infos[0].absolute_path), exist_ok=True)
            for info in infos:
                info.text_encoder_outputs_npz = caching.get_outputs_npz_path(info.absolute_path)
        caching.cache_batch_outputs(TokenizeStrategy.get_strategy(), models, TextEncodingStrategy.get_strategy(), infos)

    def __getitem__(self, index):
        captions, outputs, input_ids = [], [], []
        for info in self.infos(index):
            caption = info.caption
            if info.text_encoder_outputs is not None:
                outputs.append(info.text_encoder_outputs)
            elif info.text_encoder_outputs_npz is not None:
                outputs.append(TextEncoderOutputsCachingStrategy.get_strategy().load_outputs_npz(info.text_encoder_outputs_npz))
            else:
                caption = self.process_caption(self.subset, info.caption)
                input_ids.append(TokenizeStrategy.get_strategy().tokenize(caption)[0][0])
            captions.append(caption)
        example = {"captions": captions, "loss_weights": torch.ones(len(captions))}
        example["text_encoder_outputs_list"] = (
            [stacked([o[k] for o in outputs]) for k in range(len(outputs[0]))] if outputs else None
        )
        example["input_ids_list"] = [torch.stack(input_ids)] if input_ids else None
        return example
"""


NOISE_V087 = """
def get_timesteps_and_huber_c(args, min_timestep, max_timestep, noise_scheduler, b_size, device):
    return torch.randint(min_timestep, max_timestep, (b_size,), device=device), 1


def conditional_loss(model_pred, target, reduction="mean", loss_type="l2", huber_c=0.1):
    # v0.8.7's signature (reduction before loss_type); the stand-in knows l2 and l1
    loss = torch.nn.functional.mse_loss(model_pred, target, reduction=reduction) if loss_type == "l2" else (
        torch.nn.functional.l1_loss(model_pred, target, reduction=reduction)
    )
    return loss


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    noise = _noise(args, latents)
    low = args.min_timestep or 0
    high = args.max_timestep or noise_scheduler.config.num_train_timesteps
    timesteps, huber_c = get_timesteps_and_huber_c(args, low, high, noise_scheduler, latents.shape[0], latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy_latents, timesteps, huber_c
"""

DATASET_V087 = """

def cache_batch_text_encoder_outputs(
    image_infos, tokenizers, text_encoders, max_token_length, cache_to_disk, input_ids1, input_ids2, dtype
):
    with torch.no_grad():
        hidden1 = text_encoders[0](input_ids1).cpu()
        hidden2 = text_encoders[1](input_ids2).cpu()
        pool2 = hidden2.mean(dim=1)
    for info, h1, h2, p2 in zip(image_infos, hidden1, hidden2, pool2):
        info.text_encoder_outputs1, info.text_encoder_outputs2, info.text_encoder_pool2 = h1, h2, p2


class BaseDataset(DatasetCommon):
    def get_input_ids(self, caption, tokenizer):
        return tokenizer(caption)

    def cache_text_encoder_outputs(self, tokenizers, text_encoders, device, weight_dtype, cache_to_disk=False, is_main_process=True):
        infos = list(self.image_data.values())
        ids1 = torch.stack([self.get_input_ids(info.caption, tokenizers[0]) for info in infos])
        ids2 = torch.stack([self.get_input_ids(info.caption, tokenizers[1]) for info in infos])
        cache_batch_text_encoder_outputs(infos, tokenizers, text_encoders, self.max_token_length, cache_to_disk, ids1, ids2, weight_dtype)

    def __getitem__(self, index):
        captions, cached, ids1, ids2 = [], [], [], []
        for info in self.infos(index):
            caption = info.caption
            if info.text_encoder_outputs1 is not None:
                cached.append((info.text_encoder_outputs1, info.text_encoder_outputs2, info.text_encoder_pool2))
            else:
                caption = self.process_caption(self.subset, info.caption)
                ids1.append(self.get_input_ids(caption, tokenize))
                ids2.append(self.get_input_ids(caption, tokenize))
            captions.append(caption)
        example = {"captions": captions, "loss_weights": torch.ones(len(captions))}
        keys = ("text_encoder_outputs1_list", "text_encoder_outputs2_list", "text_encoder_pool2_list")
        if cached:
            example["input_ids"] = example["input_ids2"] = None
            for key, column in zip(keys, zip(*cached)):
                example[key] = torch.stack(column)
        else:
            example["input_ids"], example["input_ids2"] = torch.stack(ids1), torch.stack(ids2)
            for key in keys:
                example[key] = None
        return example
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


def setup_parser():
    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser)
    custom_train_functions.add_custom_train_arguments(parser)
    return parser


def count_empty_rows(context, text_encoder):
    # rows the model saw that are the empty caption's encoding (by this host's own encoder)
    with torch.no_grad():
        empty = text_encoder(train_util.tokenize("")[None])[0]
    return sum(bool(torch.allclose(row, empty)) for row in context)


def batch_context(batch, text_encoders):
    # cached outputs (main's list, or v0.8.7's keys) or the first encoder on the batch's tokens
    if batch.get("text_encoder_outputs_list") is not None:
        return batch["text_encoder_outputs_list"][0]
    if batch.get("text_encoder_outputs1_list") is not None:
        return batch["text_encoder_outputs1_list"]
    ids = batch["input_ids_list"][0] if batch.get("input_ids_list") is not None else batch["input_ids"]
    return text_encoders[0](ids)


def record(args, captions, noises, optimizer, unet, empty_rows, timesteps):
    os.makedirs(args.output_dir, exist_ok=True)
    low = [n.mean(dim=(2, 3)).flatten().var().item() for n in noises]
    data = {
        "captions": captions,
        # per training step, what the model trained on: the noise's checksum and the timesteps
        "noise_sums": [float(n.double().sum()) for n in noises],
        "timesteps": [t.tolist() for t in timesteps],
        "empty_caption_rows": empty_rows,
        "noise_channel_mean_variance": sum(low) / len(low),
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
        "sdpa": unet.attn.use_sdpa,
        "model_spec": train_util.get_sai_model_spec(None, args, False, True, False),
        "learning_rate": args.learning_rate,
        "unet_lr": args.unet_lr,
        "text_encoder_lr": args.text_encoder_lr,
    }
    with open(os.path.join(args.output_dir, "standin-record.json"), "w") as f:
        json.dump(data, f)


def build_network(args):
    # like sd-scripts' network scripts: the network comes from --network_module's create_network
    if not args.network_module:
        return None
    import importlib

    return importlib.import_module(args.network_module).create_network(1.0, 4, 1, None, None, None)


def save_network(args, network, optimizer_name, optimizer_args):
    # like sd-scripts' train_network.py: the training arguments as ss_* metadata (all strings),
    # only the minimum with --no_metadata, the model spec merged on top, then network.save_weights
    metadata = {
        "ss_learning_rate": args.learning_rate,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_c": args.huber_c,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_shuffle_caption": bool(args.shuffle_caption),
        "ss_keep_tokens": args.keep_tokens,
        "ss_optimizer": optimizer_name + (f"({optimizer_args})" if len(optimizer_args) > 0 else ""),
        "ss_network_module": args.network_module,
    }
    if hasattr(args, "huber_scale"):  # main only
        metadata["ss_huber_scale"] = args.huber_scale
    metadata = {k: str(v) for k, v in metadata.items()}
    to_save = {"ss_network_module": metadata["ss_network_module"]} if args.no_metadata else metadata
    to_save.update(train_util.get_sai_model_spec(None, args, False, True, False))
    network.save_weights(os.path.join(args.output_dir, "last.safetensors"), None, to_save)


def fetch_ahead(dataset, steps):
    # like accelerate's DataLoaderShard: the next batch is fetched before the current one trains
    def fetch(step):
        dataset.set_current_epoch(step // 2 + 1)
        return dataset[step]

    upcoming = fetch(0)
    for step in range(steps):
        current, upcoming = upcoming, fetch(step + 1)
        yield step, current


def setup(args):
    os.makedirs(args.output_dir, exist_ok=True)
    open(os.path.join(args.output_dir, "standin-model-loaded"), "w").close()  # tests: refusals come before this
    torch.manual_seed(args.seed)
    # the latents' channels: 4, or the trainer's embedded model's in the cross-host flow test
    unet = train_util.UNet2DConditionModel(int(os.environ.get("SDPLUG_STANDIN_LATENTS", "4").split(",")[0]))
    train_util.replace_unet_modules(unet, args.mem_eff_attn, args.xformers, args.sdpa)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
        rescale_betas_zero_snr=args.zero_terminal_snr,  # as kohya rescales its scheduler for --zero_terminal_snr
    )
    custom_train_functions.prepare_scheduler_for_custom_training(scheduler, "cpu")
    text_encoders = [train_util.TextEncoder().requires_grad_(False), train_util.TextEncoder().requires_grad_(False)]
    return unet, scheduler, text_encoders
"""

MAIN_BLOCK = """

if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

"""

TRAIN_NETWORK_MAIN = (
    SCRIPT_HEAD
    + """

class NetworkTrainer:
    def cache_text_encoder_outputs_if_needed(self, args, text_encoders, dataset):
        pass  # SD 1.x: nothing cached

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

    def process_batch(self, batch, text_encoders, unet, noise_scheduler, args, text_encoding_strategy, tokenize_strategy):
        latents = torch.randn(len(batch["captions"]), 4, 8, 8)
        conds = batch.get("text_encoder_outputs_list")
        if conds is None:
            conds = text_encoding_strategy.encode_tokens(tokenize_strategy, text_encoders, batch["input_ids_list"])
        pred, target, timesteps, noise = self.get_noise_pred_and_target(args, noise_scheduler, latents, conds[0], unet)
        huber_c = train_util.get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
        loss = train_util.conditional_loss(pred.float(), target.float(), args.loss_type, "none", huber_c).mean([1, 2, 3])
        loss = self.post_process_loss(loss, args, timesteps, noise_scheduler)
        return loss.mean(), noise, conds[0], timesteps

    def train(self, args):
        unet, scheduler, text_encoders = setup(args)
        network = build_network(args)
        tokenize_strategy = train_util.TokenizeStrategy()
        train_util.TokenizeStrategy.set_strategy(tokenize_strategy)
        text_encoding_strategy = train_util.TextEncodingStrategy()
        train_util.TextEncodingStrategy.set_strategy(text_encoding_strategy)
        dataset = train_util.BaseDataset(args)
        self.cache_text_encoder_outputs_if_needed(args, text_encoders, dataset)
        # like sd-scripts main: groups carry their own lr (its --unet_lr default differs)
        trainable_params = [{"params": list(unet.parameters()), "lr": args.unet_lr or args.learning_rate / 500}]
        if args.text_encoder_lr:  # like sd-scripts v0.8.7, a group even at lr 0 (frozen)
            trainable_params.insert(0, {"params": list(text_encoders[0].parameters()), "lr": args.text_encoder_lr[0]})
        optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)
        validation = train_util.BaseDataset(args, is_training_dataset=False)
        captions, noises, drawn, empty_rows = [], [], [], 0
        for step, batch in fetch_ahead(dataset, args.max_train_steps):
            if step == args.crash_at_step:
                raise RuntimeError("stand-in crash")
            captions += batch["captions"]
            loss, noise, context, timesteps = self.process_batch(
                batch, text_encoders, unet, scheduler, args, text_encoding_strategy, tokenize_strategy
            )
            noises.append(noise)
            drawn.append(timesteps)
            empty_rows += count_empty_rows(context, text_encoders[0])
            if step == args.nan_loss_at_step:
                loss = loss * float("nan")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if args.validate_every_n_steps and (step + 1) % args.validate_every_n_steps == 0:
                self.validate(args, validation, text_encoders, unet, scheduler, text_encoding_strategy, tokenize_strategy)
        record(args, captions, noises, optimizer, unet, empty_rows, drawn)
        if network is not None:
            save_network(args, network, optimizer_name, optimizer_args)

    def validate(self, args, validation, text_encoders, unet, scheduler, text_encoding_strategy, tokenize_strategy):
        # like sd-scripts main: the validation split, each batch at fixed timesteps pinned through
        # args.min_timestep = args.max_timestep, no optimizer step
        original = (args.min_timestep, args.max_timestep)
        with torch.no_grad():
            for _, batch in fetch_ahead(validation, 1):
                for timestep in (200, 600):
                    args.min_timestep = args.max_timestep = timestep
                    self.process_batch(batch, text_encoders, unet, scheduler, args, text_encoding_strategy, tokenize_strategy)
        args.min_timestep, args.max_timestep = original
"""
    + MAIN_BLOCK
    + "    trainer = NetworkTrainer()\n    trainer.train(args)\n"
)

TRAIN_NETWORK_MAIN = TRAIN_NETWORK_MAIN.replace(
    "    custom_train_functions.add_custom_train_arguments(parser)\n",
    "    custom_train_functions.add_custom_train_arguments(parser)\n"
    '    parser.add_argument("--validate_every_n_steps", type=int, default=None)\n'
    '    parser.add_argument("--huber_scale", type=float, default=1.0)\n',
)

SDXL_MAIN_BLOCK = (
    """

def setup_parser():
    parser = train_network.setup_parser()
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")
    parser.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    return parser
"""
    + MAIN_BLOCK
    + "    trainer = SdxlNetworkTrainer()\n    trainer.train(args)\n"
)

SDXL_TRAIN_NETWORK_MAIN = (
    """
import library.train_util as train_util
import train_network


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def cache_text_encoder_outputs_if_needed(self, args, text_encoders, dataset):
        if args.cache_text_encoder_outputs:
            caching = train_util.TextEncoderOutputsCachingStrategy(args.cache_text_encoder_outputs_to_disk)
            train_util.TextEncoderOutputsCachingStrategy.set_strategy(caching)
            dataset.new_cache_text_encoder_outputs(text_encoders, None)

"""
    + SDXL_MAIN_BLOCK
)

INLINE_LOOP = """
    captions, noises, drawn, empty_rows = [], [], [], 0
    for step, batch in fetch_ahead(dataset, args.max_train_steps):
        if step == args.crash_at_step:
            raise RuntimeError("stand-in crash")
        captions += batch["captions"]
        context = batch_context(batch, text_encoders)
        latents = torch.randn(len(batch["captions"]), 4, 8, 8)
        noise, noisy_latents, timesteps, huber_c = train_util.get_noise_noisy_latents_and_timesteps(args, scheduler, latents)
        noises.append(noise)
        drawn.append(timesteps)
        empty_rows += count_empty_rows(context, text_encoders[0])
        pred = unet(noisy_latents, timesteps, context)
        target = scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        loss = train_util.conditional_loss(
            pred.float(), target.float(), reduction="none", loss_type=args.loss_type, huber_c=huber_c
        ).mean([1, 2, 3])
        if args.min_snr_gamma:
            loss = apply_snr_weight(loss, timesteps, scheduler, args.min_snr_gamma, args.v_parameterization)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    record(args, captions, noises, optimizer, unet, empty_rows, drawn)
"""

# v0.8.7's train_network.py: a NetworkTrainer class whose train() holds the whole loop inline
TRAIN_NETWORK_V087 = (
    SCRIPT_HEAD
    + """

class NetworkTrainer:
    def cache_text_encoder_outputs_if_needed(self, args, tokenizers, text_encoders, dataset):
        pass

    def train(self, args):
        unet, scheduler, text_encoders = setup(args)
        network = build_network(args)
        dataset = train_util.BaseDataset(args)
        self.cache_text_encoder_outputs_if_needed(args, [train_util.tokenize] * 2, text_encoders, dataset)
        trainable_params = list(unet.parameters())
        optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)
"""
    + textwrap.indent(INLINE_LOOP, "    ")
    + "        if network is not None:\n            save_network(args, network, optimizer_name, optimizer_args)\n"
    + MAIN_BLOCK
    + "    trainer = NetworkTrainer()\n    trainer.train(args)\n"
)

SDXL_TRAIN_NETWORK_V087 = (
    """
import library.train_util as train_util
import train_network


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def cache_text_encoder_outputs_if_needed(self, args, tokenizers, text_encoders, dataset):
        if args.cache_text_encoder_outputs:
            dataset.cache_text_encoder_outputs(tokenizers, text_encoders, "cpu", None, False, True)

"""
    + SDXL_MAIN_BLOCK
)

# train_db.py (both versions): a train() function with the loop inline
TRAIN_DB = (
    SCRIPT_HEAD
    + """

def train(args):
    unet, scheduler, text_encoders = setup(args)
    if hasattr(train_util, "TokenizeStrategy"):  # main sets its strategies before building datasets
        train_util.TokenizeStrategy.set_strategy(train_util.TokenizeStrategy())
    dataset = train_util.BaseDataset(args)
    trainable_params = list(unet.parameters())
    optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)
"""
    + INLINE_LOOP
    + MAIN_BLOCK
    + "    train(args)\n"
)


NETWORKS_LORA = """
import json

import torch


class LoRANetwork(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lora_up = torch.nn.Parameter(torch.zeros(dim))

    def save_weights(self, file, dtype, metadata):
        # JSON in place of safetensors: the metadata sd-scripts passes, as the file would carry it
        with open(file, "w") as f:
            json.dump({"metadata": metadata, "weights": self.lora_up.tolist()}, f)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    return LoRANetwork(network_dim)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, **kwargs):
    return LoRANetwork(4), None
"""


def make_standin(root: Path, version: str) -> Path:
    """Write a stand-in sd-scripts tree of ``version`` ("main" or "v0.8.7") under ``root``."""
    (root / "library").mkdir(parents=True, exist_ok=True)
    (root / "library" / "__init__.py").write_text("")
    (root / "networks").mkdir(exist_ok=True)
    (root / "networks" / "__init__.py").write_text("")
    (root / "networks" / "lora.py").write_text(NETWORKS_LORA)
    version_part = NOISE_MAIN + DATASET_MAIN if version == "main" else NOISE_V087 + DATASET_V087
    (root / "library" / "train_util.py").write_text(textwrap.dedent(TRAIN_UTIL_COMMON) + version_part)
    (root / "library" / "custom_train_functions.py").write_text(CUSTOM_TRAIN_FUNCTIONS)
    if version == "main":
        (root / "train_network.py").write_text(TRAIN_NETWORK_MAIN)
        (root / "sdxl_train_network.py").write_text(SDXL_TRAIN_NETWORK_MAIN)
        # main's train_util returns a 3-tuple from the noise function, and takes conditional_loss's
        # arguments in its own order with the threshold from get_huber_threshold_if_needed
        main_db = TRAIN_DB.replace("noise, noisy_latents, timesteps, huber_c = ", "noise, noisy_latents, timesteps = ")
        main_db = main_db.replace(
            'reduction="none", loss_type=args.loss_type, huber_c=huber_c',
            'args.loss_type, "none", train_util.get_huber_threshold_if_needed(args, timesteps, scheduler)',
        )
        (root / "train_db.py").write_text(main_db)
    else:
        (root / "train_network.py").write_text(TRAIN_NETWORK_V087)
        (root / "sdxl_train_network.py").write_text(SDXL_TRAIN_NETWORK_V087)
        (root / "train_db.py").write_text(TRAIN_DB)
    return root
