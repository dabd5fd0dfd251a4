"""Binding a preset to one model's diffusion process: the one place a ``Plan`` is made.

Everything the preset file alone cannot know is checked here, before anything trains: the
process (DDPM or rectified flow, ``sdplug.process``) and every strategy's support of it, the
prediction type, zero-terminal SNR against it, the preset's timestep ranges and noise against
the schedule, a loss-weighting parameter that does nothing for this prediction type, and (in
``Plan``) an optimizer or attention that cannot run on this machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch

from sdplug.errors import PresetError, SdplugError
from sdplug.plan.plan import Plan
from sdplug.preset.checks import check_against_schedule
from sdplug.preset.model import Preset, register_binder
from sdplug.process import DDPM, DynamicShift, Flow, Process, flow_from_scheduler, is_flow_scheduler
from sdplug.schedule import FLOW_PREDICTION_TYPES, check_prediction_type, rescale_zero_terminal_snr
from sdplug.strategies import registry
from sdplug.strategies.base import Strategy, TimestepStrategy
from sdplug.strategies.families import IN_PRESET_ORDER


def bind(
    preset: Preset,
    noise_scheduler: Any = None,
    *,
    seed: int = 0,
    rank: int = 0,
    alphas_cumprod: Any = None,
    prediction_type: str | None = None,
    default_timesteps: TimestepStrategy | None = None,
    process: Process | None = None,
    text_encoders: Sequence[str] | None = None,
) -> Plan:
    """The plan: ``preset`` bound to a model's diffusion process.

    ``noise_scheduler`` is a diffusers-style scheduler: a DDPM one (its ``alphas_cumprod`` and
    ``config.prediction_type``) or a ``FlowMatchEulerDiscreteScheduler`` (its
    ``num_train_timesteps`` and ``shift``; ``prediction_type`` then defaults to ``velocity``);
    or give ``alphas_cumprod`` and ``prediction_type`` (explicit values win over the
    scheduler's), or a ``process`` (``sdplug.process.DDPM`` / ``Flow``). ``seed`` and ``rank``
    derive the plan's random streams (``sdplug.plan.streams``). ``default_timesteps`` is the
    host's own timestep strategy, used when the preset names none (uniform over the schedule
    otherwise). ``text_encoders``: the names of the model's text encoders, which a caption
    dropout may name (``caption[i].encoders``); a preset naming one the host does not say it
    has is refused.
    """
    _check_text_encoders(preset, text_encoders)
    if process is None and noise_scheduler is not None and is_flow_scheduler(noise_scheduler):
        if prediction_type is not None and prediction_type not in FLOW_PREDICTION_TYPES:
            raise SdplugError(
                f"{preset.path or preset.name}: {type(noise_scheduler).__name__} is a rectified-flow scheduler and "
                f"prediction_type {prediction_type!r} a DDPM one. Allowed: {', '.join(FLOW_PREDICTION_TYPES)}."
            )
        process = flow_from_scheduler(noise_scheduler, prediction_type)
    if process is not None:
        return _bind_process(preset, process, seed=seed, rank=rank, default_timesteps=default_timesteps)
    if noise_scheduler is not None:
        alphas_cumprod = noise_scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        config = getattr(noise_scheduler, "config", None)
        prediction_type = prediction_type or getattr(config, "prediction_type", None) or "epsilon"
    if alphas_cumprod is None or prediction_type is None:
        raise SdplugError(
            f"{preset.path or preset.name}: Preset.build needs a noise scheduler, or alphas_cumprod= and prediction_type=."
        )
    alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to(torch.float32).cpu()
    if preset.schedule.zero_terminal_snr:
        if prediction_type == "epsilon" and not preset.schedule.epsilon_ok:
            raise PresetError(
                "zero-terminal SNR trains the last timestep at SNR 0, where an epsilon-prediction model's target "
                "says nothing about the image (Lin et al. 2023 train v-prediction). Allowed: a v_prediction or "
                "sample model, or schedule.epsilon_ok = true to train epsilon anyway.",
                path=preset.path,
                key="schedule.zero_terminal_snr",
            )
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)  # idempotent: a rescaled schedule stays
    if check_prediction_type(prediction_type) in FLOW_PREDICTION_TYPES:
        raise SdplugError(
            f"{preset.path or preset.name}: prediction_type {prediction_type!r} is a rectified-flow type; a schedule "
            "of alphas_cumprod is DDPM's. Give the flow scheduler (or process=sdplug.process.Flow(...)) instead."
        )
    return _bind_process(preset, DDPM(alphas_cumprod, prediction_type), seed=seed, rank=rank, default_timesteps=default_timesteps)


def _bind_process(preset: Preset, process: Process, *, seed: int, rank: int, default_timesteps: TimestepStrategy | None) -> Plan:
    process = _with_preset_shift(preset, process)
    _check_processes(preset, process, default_timesteps)
    _check_prediction_type(preset, process.loss_space)
    alphas_cumprod = process.alphas_cumprod  # a flow process's: the table of the same SNR
    check_against_schedule(preset, len(alphas_cumprod), alphas_cumprod)  # file and key, before training
    return Plan(preset, process=process, seed=seed, rank=rank, default_timesteps=default_timesteps)


def _check_text_encoders(preset: Preset, text_encoders: Sequence[str] | None) -> None:
    for spec in preset.caption:
        named = tuple(spec.params.get("encoders", ()))
        unknown = [name for name in named if text_encoders is None or name not in text_encoders]
        if unknown:
            have = (
                f"this model's text encoders are {', '.join(text_encoders)}"
                if text_encoders
                else "the host does not name its text encoders (it has one, or drops them together)"
            )
            raise PresetError(
                f"a dropout of text encoder {unknown[0]!r}, and {have}. Allowed: encoders from that list, or no "
                "encoders (the caption dropped whole).",
                path=spec.path or preset.path,
                key=f"{spec.key}.encoders" if spec.key else "encoders",
            )


def _with_preset_shift(preset: Preset, process: Process) -> Process:
    """The process with ``[schedule]``'s flow shift applied: refused on DDPM, and on a flow
    scheduler that shifts its sigmas itself (the shift would act twice)."""
    schedule = preset.schedule
    if schedule.flow_shift == 1.0 and not schedule.dynamic_shift:
        return process
    key = "schedule.dynamic_shift" if schedule.dynamic_shift else "schedule.flow_shift"
    if not isinstance(process, Flow):
        raise PresetError(
            f"{key} shifts a rectified-flow model's sigmas, and this model is a DDPM one. Allowed: leave it out "
            "with a DDPM model (a timesteps sampler's shift moves DDPM timesteps).",
            path=preset.path,
            key=key,
        )
    if process.shift != 1.0 or process.dynamic is not None:
        given = "a dynamic shift" if process.dynamic is not None else f"shift {process.shift:g}"
        raise PresetError(
            f"the model's scheduler already shifts its sigmas ({given}); {key} on top would shift them twice. "
            f"Allowed: leave {key} out with this scheduler, or give one with shift = 1.",
            path=preset.path,
            key=key,
        )
    if schedule.dynamic_shift:
        dynamic = DynamicShift(
            schedule.base_shift, schedule.max_shift, schedule.base_seq_len, schedule.max_seq_len, _token_patch(preset, process)
        )
        return dataclasses.replace(process, dynamic=dynamic)
    return dataclasses.replace(process, shift=schedule.flow_shift)


def _token_patch(preset: Preset, process: Flow) -> int:
    """The latent patch a dynamic shift counts tokens by: the model's, which the host knows; a
    written ``patch_size`` that disagrees would shift every image as if it had (p/q)^2 times the
    tokens, so it is refused. Where the host does not say, the written one, else FLUX's 2."""
    written, model = preset.schedule.patch_size, process.patch_size
    if written is not None and model is not None and written != model:
        raise PresetError(
            f"schedule.patch_size = {written}, and this model embeds {model}x{model} latent patches as its tokens: "
            f"the dynamic shift would count {written}x{written} patches and shift every image for the wrong token "
            f"count. Allowed: leave schedule.patch_size out (the model's {model}), or {model}.",
            path=preset.path,
            key="schedule.patch_size",
        )
    return written or model or 2


def _check_processes(preset: Preset, process: Process, default_timesteps: TimestepStrategy | None) -> None:
    """Refuse, naming the file and key, a strategy that is not written for ``process``."""
    if isinstance(process, Flow) and preset.schedule.zero_terminal_snr:
        raise PresetError(
            "zero-terminal SNR rescales a DDPM schedule so its last step is pure noise; on a rectified-flow model "
            "sigma = 1 already is. Allowed: leave schedule.zero_terminal_snr out with a flow model.",
            path=preset.path,
            key="schedule.zero_terminal_snr",
        )
    timesteps = preset.timesteps
    if isinstance(process, Flow) and (process.shift != 1.0 or process.dynamic is not None) and timesteps is not None:
        shift = float(timesteps.params.get("shift", 1.0))
        if shift != 1.0:
            raise PresetError(
                f"the process already shifts its sigmas ({process.record()['shift']}), and a position drawn with "
                f"shift {shift:g} on top would be shifted twice. Allowed: leave {timesteps.key}.shift out with this "
                "scheduler, or give a scheduler with shift = 1 and shift here.",
                path=timesteps.path or preset.path,
                key=f"{timesteps.key}.shift",
            )
    if timesteps is None and default_timesteps is not None and process.kind not in default_timesteps.processes:
        raise SdplugError(
            f"the host's own timestep draw ({type(default_timesteps).__name__}) is written for "
            f"{' and '.join(sorted(default_timesteps.processes))} models; name a [timesteps] sampler in the preset."
        )
    for family in IN_PRESET_ORDER:
        for spec in preset.strategy_specs(family.section):
            supported = spec.create().processes
            if process.kind not in supported:
                raise PresetError(
                    f"{family.name} {spec.type!r} is written for {' and '.join(sorted(supported))} models, and this "
                    f"model is a {process.kind} model ({type(process).__name__}, {process.prediction_type}). Allowed "
                    f"on {process.kind}: {', '.join(_supporting(family.name, process.kind))}.",
                    path=spec.path or preset.path,
                    key=f"{spec.key}.type" if spec.key else "type",
                )


def _supporting(family: str, kind: str) -> list[str]:
    chosen = registry(family)
    return [name for name in chosen.names() if kind in cast("type[Strategy]", chosen.get(name).cls).processes] or ["none yet"]


def _check_prediction_type(preset: Preset, prediction_type: str) -> None:
    """Refuse a loss-weighting parameter the preset wrote that does nothing for this model
    (an SNR floor with a v_prediction or sample model), naming its file and key."""
    spec = preset.loss_weighting
    if spec is None:
        return
    problem = spec.create().prediction_problem(check_prediction_type(prediction_type), set(spec.params))
    if problem is not None:
        parameter, sentence = problem
        raise PresetError(sentence, path=spec.path, key=f"{spec.key}.{parameter}" if spec.key else parameter)


register_binder(bind)  # Preset.build is bind's short form
