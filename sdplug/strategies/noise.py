"""Noise strategies that need no more than a few lines each.

Pyramid noise lives in ``pyramid.py``; pink and Perlin noise in ``fields.py``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from sdplug.params import strategy_params
from sdplug.strategies._tensor import fresh_gaussian, work_dtype
from sdplug.strategies.assignment import min_cost_assignment
from sdplug.strategies.base import NoiseStrategy


def _start(noise: torch.Tensor | None, latents: torch.Tensor, generator) -> torch.Tensor:
    return fresh_gaussian(latents, generator) if noise is None else noise.to(work_dtype(latents))


@strategy_params
class GaussianNoise(NoiseStrategy):
    """Standard Gaussian noise, ``randn_like(latents)`` (Ho et al., DDPM, 2020): the default.

    In a noise list it passes the noise so far through unchanged.
    """

    processes = frozenset({"ddpm", "flow"})  # N(0, I): the noise both processes are defined with

    def transform(self, noise, latents, generator):
        return _start(noise, latents, generator).to(latents.dtype)


def _per_sample_strength(strength: float, random: bool, latents: torch.Tensor, generator, dtype) -> torch.Tensor | float:
    """``strength``, or ``strength * U(0, 1)`` drawn once per sample, shaped ``(B, 1, ...)``."""
    if not random:
        return strength
    shape = (latents.shape[0], *([1] * (latents.dim() - 1)))
    return strength * torch.rand(shape, generator=generator, device=latents.device, dtype=dtype)


@strategy_params
class OffsetNoise(NoiseStrategy):
    """Offset noise: adds one Gaussian constant per sample and channel (N. Guttenberg, 2023).

    ``noise + s * randn(B, C, 1, 1)``; the original post used ``strength`` 0.1 and no
    renormalisation (communities use 0.03-0.1). EveryDream2's ``zero_frequency_noise_ratio``
    and OneTrainer's ``offset_noise_weight`` are this trick.

    ``random_strength`` (kohya sd-scripts ``--noise_offset_random_strength``): ``s = strength *
    U(0, 1)``, one ``U`` per sample (kohya draws one for the whole batch). ``adaptive_scale``
    (kohya ``--adaptive_noise_scale``): ``s`` grows by ``adaptive_scale * |mean over H, W of the
    latents|`` per sample and channel, clamped at 0 (kohya adds it to the already randomised
    offset, as here). OneTrainer's ``generalized_offset_noise`` scales the offset by a
    coefficient ``psi_t`` of each sample's timestep: ``generalized_offset``.
    """

    processes = frozenset({"ddpm", "flow"})  # the noise's law, whatever process mixes it in (flow: x_t = (1 - s) x0 + s noise)

    strength: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    random_strength: bool = False
    adaptive_scale: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.0

    def transform(self, noise, latents, generator):
        noise = _start(noise, latents, generator)
        shape = (*latents.shape[:2], *([1] * (latents.dim() - 2)))
        offset = torch.randn(shape, generator=generator, device=latents.device, dtype=noise.dtype)
        scale = _per_sample_strength(self.strength, self.random_strength, latents, generator, noise.dtype)
        if self.adaptive_scale != 0.0:
            spatial = tuple(range(2, latents.dim()))
            magnitude = latents.to(noise.dtype).mean(dim=spatial, keepdim=True).abs()
            scale = (scale + self.adaptive_scale * magnitude).clamp_min(0.0)
        return (noise + scale * offset).to(latents.dtype)


@strategy_params
class InputPerturbation(NoiseStrategy):
    """Input perturbation: noisier model input, clean loss target (Ning et al., "Input Perturbation Reduces Exposure Bias", 2023).

    The model sees ``x_t`` built from ``noise + gamma * randn_like(noise)`` while the loss
    target stays ``noise``. Role ``"input"``: hosts apply it to the model-input noise only.
    Ning et al. use ``gamma`` 0.1 (kohya sd-scripts ``--ip_noise_gamma``, OneTrainer
    ``perturbation_noise_weight``, which adds it to the target noise too).
    ``random_strength`` (kohya ``--ip_noise_gamma_random_strength``): ``gamma * U(0, 1)``, one
    ``U`` per sample (kohya draws one for the whole batch).
    """

    processes = frozenset(
        {"ddpm", "flow"}
    )  # on flow this is kohya's flow form: x_t = (1 - s) x0 + s (noise + gamma xi), target noise - x0

    role = "input"
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    random_strength: bool = False

    def transform(self, noise, latents, generator):
        noise = _start(noise, latents, generator)
        gamma = _per_sample_strength(self.gamma, self.random_strength, latents, generator, noise.dtype)
        return (noise + gamma * fresh_gaussian(latents, generator, noise.dtype)).to(latents.dtype)


@strategy_params
class ImmiscibleNoise(NoiseStrategy):
    """Immiscible diffusion: reassigns the batch's noise samples to latents to minimise total distance (Li et al., 2024).

    Each latent gets the noise sample that a minimum-cost assignment over the batch gives it
    (squared L2 distance), so nearby noise goes to nearby images; the noise itself is unchanged
    as a set, so its marginal distribution stays Gaussian.
    """

    processes = frozenset({"ddpm", "flow"})  # which noise goes with which latent: the same on every process

    def transform(self, noise, latents, generator):
        noise = _start(noise, latents, generator)
        if latents.shape[0] < 2:
            return noise.to(latents.dtype)
        distance = torch.cdist(latents.flatten(1).to(noise.dtype), noise.flatten(1)).pow(2)
        order = min_cost_assignment(distance.detach().cpu().double().numpy())
        return noise[torch.as_tensor(order, device=noise.device)].to(latents.dtype)
