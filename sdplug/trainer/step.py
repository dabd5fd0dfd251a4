"""The diffusion step of the reference trainer, as a small function over the plan.

It is the reference use of the plan's public API (README, "Your own training loop"): noise,
timesteps, the noisy input and the target from the plan, the model's prediction, then the
plan's loss type and weighting.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from sdplug.plan import NoiseDraw, Plan
from sdplug.strategies.loss import resize_mask


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """One batch's loss: ``weighted`` (B,) trains; ``unweighted`` (B,) is for the loss plots."""

    weighted: torch.Tensor
    unweighted: torch.Tensor
    timesteps: torch.Tensor
    noise: NoiseDraw


def diffusion_loss(
    plan: Plan,
    unet: torch.nn.Module,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    mask: torch.Tensor | None = None,
) -> StepLoss:
    timesteps = plan.timesteps(len(latents), device=latents.device, latent_size=(latents.shape[-2], latents.shape[-1]))
    noise = plan.noise(latents, timesteps=timesteps)
    with autocast():
        model_input, time = plan.noisy_input(latents, noise, timesteps), plan.model_time(timesteps)
        prediction = unet(model_input, time, encoder_hidden_states=text_states).sample
    if mask is not None:  # a pixel mask, at the latents' size (area interpolation, as kohya resizes its masks)
        mask = resize_mask(mask, latents)
    prediction = plan.prediction(prediction, model_input, timesteps)  # the output as the loss reads it
    unweighted = plan.unweighted_loss(prediction, plan.target(latents, noise, timesteps), mask, timesteps=timesteps)
    return StepLoss(plan.weight(unweighted, timesteps), unweighted, timesteps, noise)
