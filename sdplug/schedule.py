"""Noise-schedule helpers that read ``alphas_cumprod`` and nothing else, and the prediction types.

Notation: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t`` the
cumulative product of alphas, and ``SNR(t) = a_t / (1 - a_t)``. A rectified-flow process gives
the table of the same SNR (``sdplug.process.Flow.alphas_cumprod``), so ``snr`` serves both.
"""

from __future__ import annotations

import torch

DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# rectified flow: the velocity noise - x0 (SD3, FLUX), or x0 - noise with time reversed (Lumina 2)
FLOW_PREDICTION_TYPES = ("velocity", "velocity_reversed")
PREDICTION_TYPES = (*DDPM_PREDICTION_TYPES, *FLOW_PREDICTION_TYPES)


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        from sdplug.errors import PresetError

        raise PresetError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}.")
    return prediction_type


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) per timestep, in float64 then cast to float32.

    Finite everywhere: at a zero-terminal step (a_T = 0) it is exactly 0, and at a_t = 1 (never
    used by real schedules) it is clamped to the largest finite float32 rather than inf.
    """
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    ratio = a / (1.0 - a).clamp_min(torch.finfo(torch.float64).tiny)
    return ratio.clamp(max=torch.finfo(torch.float32).max).to(torch.float32)


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion 1.x/2.x's "scaled_linear" schedule, as diffusers builds it."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(a_t) so the last step has SNR exactly 0.

    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (2024), Alg. 1.
    """
    root = alphas_cumprod.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).to(torch.float32)


def _coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` per sample, shaped to broadcast over ``like``."""
    a = alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    shape = (-1, *([1] * (like.dim() - 1)))
    return a.sqrt().view(shape), (1 - a).sqrt().view(shape)


def noisy_sample(
    alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` (DDPM's forward process)."""
    signal, sigma = _coefficients(alphas_cumprod, timesteps, latents)
    return signal * latents + sigma * noise


def prediction_target(
    alphas_cumprod: torch.Tensor, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What a model of ``prediction_type`` predicts: the noise, ``x_0``, or
    ``v = sqrt(a_t) noise - sqrt(1 - a_t) x_0`` (Salimans & Ho, 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return latents
    signal, sigma = _coefficients(alphas_cumprod, timesteps, latents)
    return signal * noise - sigma * latents


def same_schedule(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Whether two ``alphas_cumprod`` are one schedule (to float32 precision; a zero-terminal one
    that diffusers clamps to 2**-24 at the last step matches its exact 0)."""
    theirs = theirs.detach().float().cpu()
    return theirs.shape == ours.shape and bool(torch.allclose(theirs, ours.float().cpu(), atol=1e-5))
