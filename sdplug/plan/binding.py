"""Binding a preset to one model's diffusion process: the one place a ``Plan`` is made.

Everything the preset file alone cannot know is checked here, before anything trains: the
prediction type, zero-terminal SNR against it, the preset's timestep ranges and noise against
the schedule, a loss-weighting parameter that does nothing for this prediction type, and (in
``Plan``) an optimizer or attention that cannot run on this machine.
"""

from __future__ import annotations

from typing import Any

import torch

from sdplug.errors import PresetError, SdplugError
from sdplug.plan.plan import Plan
from sdplug.preset.checks import check_against_schedule
from sdplug.preset.model import Preset, register_binder
from sdplug.schedule import check_prediction_type, rescale_zero_terminal_snr
from sdplug.strategies.base import TimestepStrategy


def bind(
    preset: Preset,
    noise_scheduler: Any = None,
    *,
    seed: int = 0,
    rank: int = 0,
    alphas_cumprod: Any = None,
    prediction_type: str | None = None,
    default_timesteps: TimestepStrategy | None = None,
) -> Plan:
    """The plan: ``preset`` bound to a model's noise schedule and prediction type.

    ``noise_scheduler`` is a diffusers-style scheduler (its ``alphas_cumprod`` and
    ``config.prediction_type``); or give ``alphas_cumprod`` and ``prediction_type``
    (explicit values win over the scheduler's). ``seed`` and ``rank`` derive the plan's
    random streams (``sdplug.plan.streams``). ``default_timesteps`` is the host's own timestep
    strategy, used when the preset names none (uniform over the schedule otherwise).
    """
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
    _check_prediction_type(preset, prediction_type)
    check_against_schedule(preset, len(alphas_cumprod), alphas_cumprod)  # file and key, before training
    return Plan(
        preset,
        alphas_cumprod=alphas_cumprod,
        prediction_type=check_prediction_type(prediction_type),
        seed=seed,
        rank=rank,
        default_timesteps=default_timesteps,
    )


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
