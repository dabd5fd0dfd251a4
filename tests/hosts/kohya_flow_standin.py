"""Stand-ins for sd-scripts main's five rectified-flow LoRA scripts, on top of a main stand-in tree
(``kohya_standin.make_standin``), for ``sdplug check kohya``.

Written from the scripts' interfaces (no code of them): each script's ``setup_parser()`` builds
the real script's arguments -- names, whether each takes a value, defaults and choices -- from
``tests/data/kohya_flow_parsers.json`` (read from the real parsers by
``tests/hosts/kohya_parser_flags.py --write-flow``), and each script and its library module hold
the source the check fingerprints (the ``post_process_loss`` that returns the loss unchanged,
the draw function). They parse, and train with each script's step on the stand-in's loop: its
draw, its reading of the output, its weighting, its target and, with
``--cache_text_encoder_outputs``, its cached list of text-encoder outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

PARSERS = Path(__file__).parents[1] / "data" / "kohya_flow_parsers.json"

LIBRARY = {
    # the draw and the output's reading of sd-scripts main's flux_train_utils, by their documented
    # behaviour: sigma from --timestep_sampling, x_t = (1 - sigma) x0 + sigma (noise + gamma xi),
    # timesteps sigma * 1000; raw / additive / sigma_scaled, SD3's weighting for sigma_scaled only
    "flux_train_utils.py": """
import math

import torch

from library.sd3_train_utils import compute_loss_weighting_for_sd3


def time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):
    bsz, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
    if args.timestep_sampling == "uniform":
        sigmas = torch.rand((bsz,))
    elif args.timestep_sampling in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(args.sigmoid_scale * torch.randn((bsz,)))
        if args.timestep_sampling == "shift":
            shift = args.discrete_flow_shift
            sigmas = sigmas * shift / (1 + (shift - 1) * sigmas)
        elif args.timestep_sampling == "flux_shift":
            mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((h // 2) * (w // 2) - 256)
            sigmas = time_shift(mu, 1.0, sigmas)
    else:
        u = torch.rand((bsz,))
        indices = (u * noise_scheduler.config.num_train_timesteps).long()
        sigmas = noise_scheduler.sigmas[indices]
    timesteps = sigmas * 1000
    sigmas = sigmas.view(-1, 1, 1, 1)
    if args.ip_noise_gamma:
        xi = torch.randn_like(latents)
        noisy = (1.0 - sigmas) * latents + sigmas * (noise + args.ip_noise_gamma * xi)
    else:
        noisy = (1.0 - sigmas) * latents + sigmas * noise
    return noisy.to(dtype), timesteps.to(dtype), sigmas


def apply_model_prediction_type(args, model_pred, noisy_model_input, sigmas):
    weighting = None
    if args.model_prediction_type == "additive":
        model_pred = model_pred + noisy_model_input
    elif args.model_prediction_type == "sigma_scaled":
        model_pred = model_pred * (-sigmas) + noisy_model_input
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    return model_pred, weighting
""",
    # SD3's: u from --weighting_scheme's density, shifted by --training_shift, over the timestep
    # range; sigma = t / 1000, x_t = sigma noise + (1 - sigma) x0; SD3's weighting of sigma
    "sd3_train_utils.py": """
import math

import torch


def compute_loss_weighting_for_sd3(weighting_scheme, sigmas):
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def get_noisy_model_input_and_timesteps(args, latents, noise, device, dtype):
    bsz = latents.shape[0]
    if args.weighting_scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(args.logit_mean, args.logit_std, size=(bsz,)))
    else:
        u = torch.rand((bsz,))
    t_min = args.min_timestep if args.min_timestep is not None else 0
    t_max = args.max_timestep if args.max_timestep is not None else 1000
    shift = args.training_shift
    u = (u * shift) / (1 + (shift - 1) * u)
    timesteps = (u * (t_max - t_min) + t_min).long().to(dtype)
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    return sigmas * noise + (1.0 - sigmas) * latents, timesteps, sigmas
""",
    # Lumina 2's: FLUX's draw (sigma the noise fraction, x_t = (1 - sigma) x0 + sigma noise, sigma * 1000
    # returned; nextdit_shift: uniform then FLUX's shift by resolution) and output reading
    "lumina_train_util.py": """
from library.flux_train_utils import apply_model_prediction_type, get_noisy_model_input_and_timesteps as _flux_draw


def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):
    if args.timestep_sampling == "nextdit_shift":
        args.timestep_sampling = "flux_shift"
        try:
            return _flux_draw(args, noise_scheduler, latents, noise, device, dtype)
        finally:
            args.timestep_sampling = "nextdit_shift"
    return _flux_draw(args, noise_scheduler, latents, noise, device, dtype)
""",
    # Anima's weighting of sigma (SD3's schemes)
    "anima_train_utils.py": """
from library.sd3_train_utils import compute_loss_weighting_for_sd3


def compute_loss_weighting_for_anima(weighting_scheme, sigmas):
    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
""",
}


SCRIPT = """
import argparse
import json

ARGUMENTS = json.loads({arguments!r})


def _type(default):
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def setup_parser():
    parser = argparse.ArgumentParser()
    for name, spec in ARGUMENTS.items():
        if not spec["value"]:
            parser.add_argument("--" + name, action="store_true")
            continue
        options = {{"default": spec["default"]}}
        if "choices" in spec:
            options["choices"] = spec["choices"]
        if "nargs" in spec:
            options["nargs"] = spec["nargs"]
        elif _type(spec["default"]) is not None:
            options["type"] = _type(spec["default"])
        parser.add_argument("--" + name, **options)
    return parser


class FlowNetworkTrainer:
    def get_noise_pred_and_target(self, args, latents):
        noise = torch.randn_like(latents)
        return noise

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return loss
"""

# the FLUX and SD3 scripts train: train_network's stand-in loop with each one's step (sd-scripts
# main's FluxNetworkTrainer / Sd3NetworkTrainer: noise drawn inline and handed to the draw, which
# returns x_t, sigma * 1000 and sigma; kohya's weighting multiplies the elementwise loss;
# post_process_loss returns the loss unchanged). STEP is each script's own part.
TRAINER = """

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import library.train_util as train_util
import train_network
from library import anima_train_utils, flux_train_utils, lumina_train_util, sd3_train_utils

_flow_parser = setup_parser
# the latents' shape (C, H, W): the trainer's embedded model's in the cross-host test
LATENT_SHAPE = tuple(int(n) for n in __import__("os").environ.get("SDPLUG_STANDIN_LATENTS", "4,8,8").split(","))


def setup_parser():
    parser = _flow_parser()
    known = {o for action in parser._actions for o in action.option_strings}
    for action in train_network.setup_parser()._actions:  # the stand-in loop's own switches (crash_at_step, ...)
        if action.option_strings and not set(action.option_strings) & known:
            parser._add_action(action)
    return parser


import json
import os

import numpy as np


def _wide(hidden, width):
    # a stand-in encoder's rows tiled to a real encoder's width (SD3 splits CLIP-L | CLIP-G at 768)
    return hidden.repeat(*([1] * (hidden.dim() - 1)), -(-width // hidden.shape[-1]))[..., :width]


def flow_layout(first, second, tokens):
    # the script's cached list (its caching strategy's load_outputs_npz order) from two stand-in encoders
    batch, length = first.shape[0], first.shape[1]
    ones = torch.ones(batch, length)
    if FLOW_SCRIPT == "flux_train_network.py":  # [l_pooled, t5_out, txt_ids, t5_attn_mask]
        return [first.mean(1), second, torch.zeros(batch, length, 3), ones]
    if FLOW_SCRIPT == "lumina_train_network.py":  # [hidden_state, input_ids, attention_mask]
        return [first, first.sum(-1), ones]
    if FLOW_SCRIPT == "hunyuan_image_train_network.py":  # [vlm_embed, vlm_mask, byt5_embed, byt5_mask, ocr_mask]
        # Qwen2.5-VL's rows as long as the caching batch's longest caption (kohya tokenizes with padding=True),
        # so the empty caption's are shorter than a caption's; byT5's have a fixed length
        words = int(tokens.ne(0).sum(1).max())
        return [first[:, :words], tokens.ne(0)[:, :words].float(), second, ones, ones[:, 0]]
    if FLOW_SCRIPT == "anima_train_network.py":  # [prompt_embeds, attn_mask, t5_input_ids, t5_attn_mask, rate]
        return [first, ones, first.sum(-1), ones, torch.zeros(batch)]
    lg = torch.cat([_wide(first, 768), _wide(second, 1280)], dim=-1)  # [lg_out, t5_out, lg_pooled, l, g, t5 masks]
    return [lg, 3 * first, lg.mean(1), ones, ones, ones]


def same_padded(row, empty):
    # a batch row against the empty caption's: equal where both have positions, zeros past the shorter
    # (main's collation pads variable-length rows, and sdplug the empty caption's, with zeros)
    if row.dim() == 0 or row.shape == empty.shape:
        return torch.allclose(row, empty)
    n = min(row.shape[0], empty.shape[0])
    rest = row[n:] if row.shape[0] > n else empty[n:]
    return torch.allclose(row[:n], empty[:n]) and not bool(rest.any())


class FlowCaching(train_util.TextEncoderOutputsCachingStrategy):
    def cache_batch_outputs(self, tokenize_strategy, models, text_encoding_strategy, infos):
        tokens = tokenize_strategy.tokenize([info.caption for info in infos])[0]
        with torch.no_grad():
            outputs = [o.numpy() for o in flow_layout(models[0](tokens), 2 * models[1](tokens), tokens)]
        for i, info in enumerate(infos):
            if self.cache_to_disk:
                np.savez(info.text_encoder_outputs_npz, *[o[i] for o in outputs])
            else:
                info.text_encoder_outputs = [np.asarray(o[i]) for o in outputs]

    def load_outputs_npz(self, path):
        data = np.load(path)
        return [data[f"arr_{k}"] for k in range(len(data.files))]


# per encoder, the tensors (index, columns) that are its own in the cached list: the record says
# which rows the model saw as the empty caption's
ENCODER_PARTS = {
    "flux_train_network.py": {"clip_l": [(0, None)], "t5xxl": [(1, None)]},
    "sd3_train_network.py": {"clip_l": [(0, (0, 768)), (2, (0, 768))], "clip_g": [(0, (768, None)), (2, (768, None))], "t5xxl": [(1, None)]},
    "lumina_train_network.py": {"gemma2": [(0, None)]},
    "hunyuan_image_train_network.py": {"qwen2_5_vl": [(0, None)], "byt5": [(2, None)]},
    "anima_train_network.py": {"qwen3": [(0, None)]},
}
MODEL_TEXT = 1 if FLOW_SCRIPT in ("flux_train_network.py", "sd3_train_network.py") else 0  # the rows the model reads


class FlowNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self, args):
        self.flow_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=getattr(args, "discrete_flow_shift", 1.0))
        self.args, self.empty = args, None
        os.makedirs(args.output_dir, exist_ok=True)  # what the model would load with (its attention kernel)
        with open(os.path.join(args.output_dir, "flow-args.json"), "w") as record:
            json.dump({"attn_mode": getattr(args, "attn_mode", None)}, record)

    def cache_text_encoder_outputs_if_needed(self, args, text_encoders, dataset):
        if args.cache_text_encoder_outputs:
            caching = FlowCaching(args.cache_text_encoder_outputs_to_disk)
            train_util.TextEncoderOutputsCachingStrategy.set_strategy(caching)
            dataset.new_cache_text_encoder_outputs(text_encoders, None)
            tokens = train_util.TokenizeStrategy.get_strategy().tokenize([""])[0]
            with torch.no_grad():
                self.empty = flow_layout(text_encoders[0](tokens), 2 * text_encoders[1](tokens), tokens)

    def record_encoders(self, conds):
        rows = {}
        for encoder, parts in ENCODER_PARTS[FLOW_SCRIPT].items():
            empty = []
            for row in range(conds[0].shape[0]):
                same = True
                for index, cols in parts:
                    a, b = (cols if cols else (0, None))
                    same = same and same_padded(conds[index][row][..., a:b], self.empty[index][0][..., a:b])
                empty.append(bool(same))
            rows[encoder] = empty
        with open(os.path.join(self.args.output_dir, "flow-encoders.jsonl"), "a") as log:
            log.write(json.dumps(rows) + "\\n")

    def get_noise_pred_and_target(self, args, noise_scheduler, latents, text, unet):
        noise = torch.randn_like(latents)
STEP
        return pred, target, timesteps, noise, weighting

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return loss

    def process_batch(self, batch, text_encoders, unet, noise_scheduler, args, text_encoding_strategy, tokenize_strategy):
        latents = torch.randn(len(batch["captions"]), *LATENT_SHAPE)
        conds = batch.get("text_encoder_outputs_list")
        if conds is not None:  # cached: the model reads its T5 rows
            os.makedirs(args.output_dir, exist_ok=True)
            self.record_encoders(conds)
            conds = [conds[MODEL_TEXT]]
        else:
            conds = text_encoding_strategy.encode_tokens(tokenize_strategy, text_encoders, batch["input_ids_list"])
        pred, target, timesteps, noise, weighting = self.get_noise_pred_and_target(args, None, latents, conds[0], unet)
        huber_c = None if args.loss_type == "l2" else train_util.get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
        loss = train_util.conditional_loss(pred.float(), target.float(), args.loss_type, "none", huber_c)
        if weighting is not None:
            loss = loss * weighting
        loss = self.post_process_loss(loss.mean([1, 2, 3]), args, timesteps, noise_scheduler)
        return loss.mean(), noise, conds[0], timesteps


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    args = train_util.read_config_from_file(args, parser)
    FlowNetworkTrainer(args).train(args)
"""
STEPS = {
    # Lumina 2: FLUX's draw and output reading; the model takes 1 - t / 1000 and predicts x0 - noise
    "lumina_train_network.py": """        noisy, timesteps, sigmas = lumina_train_util.get_noisy_model_input_and_timesteps(
            args, self.flow_scheduler, latents, noise, "cpu", torch.float32
        )
        pred = unet(noisy, (1000 - timesteps).long().clamp(0, 999), text)
        pred, weighting = lumina_train_util.apply_model_prediction_type(args, pred, noisy, sigmas)
        target = latents - noise""",
    # HunyuanImage 2.1: FLUX's draw and output reading, timesteps recomputed from sigma as integers
    "hunyuan_image_train_network.py": """        noisy, _, sigmas = flux_train_utils.get_noisy_model_input_and_timesteps(
            args, self.flow_scheduler, latents, noise, "cpu", torch.float32
        )
        timesteps = (sigmas[:, 0, 0, 0] * 1000).to(torch.int64)
        pred = unet(noisy, timesteps.clamp(0, 999), text)
        pred, weighting = flux_train_utils.apply_model_prediction_type(args, pred, noisy, sigmas)
        target = noise - latents""",
    # Anima: FLUX's draw, its own weighting of sigma, the velocity target
    "anima_train_network.py": """        noisy, timesteps, sigmas = flux_train_utils.get_noisy_model_input_and_timesteps(
            args, self.flow_scheduler, latents, noise, "cpu", torch.float32
        )
        pred = unet(noisy, timesteps.long().clamp(0, 999), text)
        target = noise - latents
        weighting = anima_train_utils.compute_loss_weighting_for_anima(weighting_scheme=args.weighting_scheme, sigmas=sigmas)""",
    # FLUX: the output read by apply_model_prediction_type; the target noise - latents
    "flux_train_network.py": """        noisy, timesteps, sigmas = flux_train_utils.get_noisy_model_input_and_timesteps(
            args, self.flow_scheduler, latents, noise, "cpu", torch.float32
        )
        pred = unet(noisy, timesteps.long().clamp(0, 999), text)  # the stand-in UNet embeds whole steps
        pred, weighting = flux_train_utils.apply_model_prediction_type(args, pred, noisy, sigmas)
        target = noise - latents""",
    # SD3: the output preconditioned inline, x_t - sigma * output, against the latents, weighted by
    # compute_loss_weighting_for_sd3
    "sd3_train_network.py": """        noisy, timesteps, sigmas = sd3_train_utils.get_noisy_model_input_and_timesteps(args, latents, noise, "cpu", torch.float32)
        pred = unet(noisy, timesteps.long().clamp(0, 999), text)
        pred = pred * (-sigmas) + noisy
        weighting = sd3_train_utils.compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
        target = latents""",
}


def make_flow_scripts(root: Path) -> Path:
    """Write the five flow scripts and their library modules into the stand-in tree ``root``."""
    scripts = json.loads(PARSERS.read_text())["scripts"]
    for name, text in LIBRARY.items():
        (root / "library" / name).write_text(text)
    for script, arguments in scripts.items():
        text = SCRIPT.format(arguments=json.dumps(arguments))
        trainer = TRAINER.replace("STEP", STEPS[script]) if script in STEPS else ""
        trainer = trainer.replace("import json\n", f"import json\n\nFLOW_SCRIPT = {script!r}\n", 1)
        (root / script).write_text(text + trainer)
    return root
