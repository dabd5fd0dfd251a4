"""The trick flags of diffusers' training scripts, next to a preset: refused, reconciled or kept.

A flag set away from its parser default, with a preset section that replaces what it does,
stops the run before any model loads (naming the flag, the section and what is allowed), so a
script's own version of a trick never runs beside the preset's. ``[memory]`` keys the scripts
have a switch for are reconciled (the preset's value wins, recorded as a rule); those they have
no switch for, and ``[ema]``, are refused. A flag a script does not have is skipped only because
the script cannot set it.
"""

from __future__ import annotations

import argparse
from typing import Any

from sdplug.errors import SdplugError
from sdplug.hosts.diffusers_scripts.flow_edits import FLOW_SCRIPTS
from sdplug.hosts.host_flags import HostFlag
from sdplug.preset import Preset

_NOISE = ("noise", "timesteps")  # the session draws noise and timesteps together
_OPTIMIZER = ("optimizer",)

# the script flags that set a trick a preset section replaces (the scripts reconcile [memory] themselves: _memory)
FLAGS: tuple[HostFlag, ...] = (
    HostFlag("noise_offset", _NOISE, "the script's offset noise (sdplug: noise 'offset')"),
    HostFlag("input_perturbation", _NOISE, "the script's input perturbation (sdplug: noise 'input_perturbation')"),
    HostFlag("snr_gamma", ("loss_weighting",), "the script's min-SNR weighting (sdplug: loss_weighting 'min_snr')"),
    HostFlag("use_8bit_adam", _OPTIMIZER, "the script's 8-bit AdamW (sdplug: optimizer 'adamw8bit')"),
    HostFlag("optimizer", _OPTIMIZER, "the script's optimizer choice"),
    HostFlag("adam_beta1", _OPTIMIZER, "the script's AdamW betas"),
    HostFlag("adam_beta2", _OPTIMIZER, "the script's AdamW betas"),
    HostFlag("adam_weight_decay", _OPTIMIZER, "the script's weight decay"),
    HostFlag("adam_weight_decay_text_encoder", _OPTIMIZER, "the script's text-encoder weight decay"),
    HostFlag("adam_epsilon", _OPTIMIZER, "the script's AdamW epsilon"),
    HostFlag("prodigy_beta3", _OPTIMIZER, "the script's Prodigy settings"),
    HostFlag("prodigy_decouple", _OPTIMIZER, "the script's Prodigy settings"),
    HostFlag("prodigy_use_bias_correction", _OPTIMIZER, "the script's Prodigy settings"),
    HostFlag("prodigy_safeguard_warmup", _OPTIMIZER, "the script's Prodigy settings"),
    HostFlag(
        "enable_xformers_memory_efficient_attention",
        ("attention",),
        "the script's xformers switch (sdplug: attention 'xformers')",
    ),
    HostFlag(
        "proportion_empty_prompts",
        ("caption",),
        "the script's once-per-dataset empty prompts (sdplug: caption 'dropout', per step)",
    ),
)


# the flow scripts' sampler and weighting (``flow_edits``): --weighting_scheme sets the sampling
# density (logit_normal, mode) or a loss weighting (sigma_sqrt, cosmap), by its value
WEIGHTING_SCHEME_SECTIONS = {"logit_normal": ("timesteps",), "mode": ("timesteps",), "sigma_sqrt": ("loss_weighting",)}
WEIGHTING_SCHEME_SECTIONS["cosmap"] = ("loss_weighting",)
FLOW_FLAGS: tuple[HostFlag, ...] = (
    HostFlag("weighting_scheme", ("timesteps", "loss_weighting"), "the script's sigma density or loss weighting"),
    HostFlag("logit_mean", ("timesteps",), "the script's logit-normal sigma density (sdplug: timesteps 'logit_normal')"),
    HostFlag("logit_std", ("timesteps",), "the script's logit-normal sigma density (sdplug: timesteps 'logit_normal')"),
    HostFlag("mode_scale", ("timesteps",), "the script's mode sigma density (sdplug: timesteps 'mode')"),
    HostFlag("caption_dropout", ("caption",), "the script's instance-caption dropout (sdplug: caption 'dropout')"),
)
# what the flow scripts' own flags do next to a preset without taking a section over
FLOW_INDEPENDENT = {
    "precondition_outputs": "SD3's output read as x_t - sigma * output against x0 (the process's sigma_scaled output)",
    "guidance_scale": "the guidance value a guidance-distilled transformer is given",
}


class DiffusersConflictError(SdplugError):
    """A script flag that sets a trick the preset replaces, or a preset key the script cannot apply."""


def check(preset: Preset, script: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Refuse conflicts and unreachable preset keys; returns ``{flag: how it stood}`` for the audit
    and applies the reconciled ``[memory]`` keys to ``args``."""
    where = preset.path or preset.name
    stood: dict[str, Any] = {}
    flow = script in FLOW_SCRIPTS
    for row in FLAGS + (FLOW_FLAGS if flow else ()):
        flag = row.name
        if not hasattr(args, flag):
            continue
        value, default = getattr(args, flag), parser.get_default(flag)
        taken = sorted(row.taken_by(preset))
        if flag == "weighting_scheme":
            taken = [s for s in taken if s in WEIGHTING_SCHEME_SECTIONS.get(value, ())]
        if taken and value != default:
            raise DiffusersConflictError(
                f"{script}: --{flag} {value!r} sets {row.why}, which the preset {where} replaces ([{taken[0]}]). Allowed: "
                f"leave --{flag} at its default ({default!r}), or drop [{taken[0]}] from the preset."
            )
        stood[flag] = {"value": value, "state": f"off: the preset's [{taken[0]}] applies" if taken else "the script's"}
    if flow:
        stood.update(
            {
                name: {"value": getattr(args, name), "state": f"the script's: {why}"}
                for name, why in FLOW_INDEPENDENT.items()
                if hasattr(args, name)
            }
        )
        _check_flow(preset, script, args, where)
    _check_caption(preset, script, where)
    if preset.caption and script == "train_dreambooth_lora_sdxl.py" and getattr(args, "train_text_encoder", False):
        raise DiffusersConflictError(
            f"{where}: [[caption]] with --train_text_encoder: {script} then encodes its prompts inside the step, where "
            "sdplug drops none (it drops per sample in the precomputed embeddings). Allowed: no --train_text_encoder, or no [[caption]]."
        )
    _check_settings(preset, script, where, args)
    stood.update(_memory(preset, args))
    return stood


def _check_caption(preset: Preset, script: str, where: str) -> None:
    for index, spec in enumerate(preset.caption):
        if spec.type != "dropout":
            raise DiffusersConflictError(
                f"{where}: caption[{index}].type {spec.type!r} rewrites caption text, which {script} tokenizes (or "
                "encodes) in its data pipeline; the step sees tokens only. Allowed here: caption 'dropout'."
            )


def _check_flow(preset: Preset, script: str, args: argparse.Namespace, where: str) -> None:
    """What a flow script cannot apply as the preset says: refused before any model loads."""
    if preset.caption and getattr(args, "remote_text_encoder", False):
        raise DiffusersConflictError(
            f"{where}: [[caption]] with --remote_text_encoder: {script} then has no local text encoder to encode the empty "
            "caption a dropped sample gets. Allowed: no --remote_text_encoder, or no [[caption]]."
        )
    if preset.caption and getattr(args, "train_text_encoder", False):
        raise DiffusersConflictError(
            f"{where}: [[caption]] with --train_text_encoder: {script} then encodes its prompts with the trained encoder "
            "inside the step, where sdplug's empty-caption rows would come from the untrained one. Allowed: no "
            "--train_text_encoder, or no [[caption]]."
        )
    if script == "train_dreambooth_lora_lumina2.py" and getattr(args, "with_prior_preservation", False):
        raise DiffusersConflictError(
            f"{script}: --with_prior_preservation fails inside the script itself (its instance and class prompt rows are "
            "repeated twice over, an IndexError in the transformer); sdplug does not start a run that cannot train. "
            "Allowed: no --with_prior_preservation."
        )
    if preset.attention is not None and preset.attention.type != "sdpa":
        raise DiffusersConflictError(
            f"{preset.attention.path or where}: [attention] {preset.attention.type!r}: {script} has no attention switch "
            "(diffusers' transformers dispatch to PyTorch's scaled_dot_product_attention). Allowed: 'sdpa', or no [attention]."
        )
    spec = preset.loss_weighting
    if spec is not None and spec.create().parameters():
        raise DiffusersConflictError(
            f"{spec.path or where}: loss_weighting {spec.type!r} learns its weight from the loss; {script} multiplies its "
            "loss by a weighting, which a learned weighting is not. Allowed: a fixed weighting."
        )


def _check_settings(preset: Preset, script: str, where: str, args: argparse.Namespace) -> None:
    if preset.ema.decay is not None:
        raise DiffusersConflictError(
            f"{where}: [ema] decay: {script} saves its LoRA itself; sdplug cannot save an average beside it. Allowed: no [ema]."
        )
    for key in ("cache_latents", "cache_text_encoder_outputs"):
        if getattr(preset.memory, key) and not hasattr(args, key):
            raise DiffusersConflictError(f"{where}: memory.{key}: {script} has no such switch. Allowed: false.")


def _memory(preset: Preset, args: argparse.Namespace) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    if preset.memory.cache_latents and not getattr(args, "cache_latents", True):
        args.cache_latents = True
        rules["cache_latents"] = {"value": True, "state": "reconciled: memory.cache_latents"}
    if preset.memory.gradient_checkpointing and not getattr(args, "gradient_checkpointing", False):
        args.gradient_checkpointing = True
        rules["gradient_checkpointing"] = {"value": True, "state": "reconciled: memory.gradient_checkpointing"}
    wanted = preset.memory.mixed_precision
    if wanted != "no" and getattr(args, "mixed_precision", None) != wanted:
        rules["mixed_precision"] = {
            "value": wanted,
            "state": f"reconciled: memory.mixed_precision (was {args.mixed_precision!r})",
        }
        args.mixed_precision = wanted
    return rules
