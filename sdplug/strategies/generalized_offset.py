"""Generalized (time-dependent) offset noise: the offset scaled by a coefficient of each timestep.

Kutsuna, "Generalized Diffusion Model with Adjusted Offset Noise" (arXiv 2412.03134, 2024)
diffuses inputs towards Gaussians with a mean offset ``xi`` (one constant per sample and
channel, as offset noise). The forward process adds ``gamma_t xi`` at every step, and the
marginal's noise becomes ``eps + psi_t xi``: offset noise whose strength depends on ``t``. The
balanced choice of ``gamma_t`` (Algorithm 1) is

    gamma_1 = 1,   gamma_t = C_t * S_{t-1},   S_t = sum_{i<=t} gamma_i / sqrt(abar_{i-1}),
    C_t = (1 - alpha_t) sqrt(abar_{t-1}) / (alpha_t (1 - abar_{t-1})),   abar_0 = 1,

then ``psi_t = S_t / sqrt(1 - abar_t)``, normalised so that ``psi_T = 1``. The recursion has a
closed form, ``psi_t = (abar_T / abar_t) sqrt((1 - abar_t) / (1 - abar_T))`` (``S_t`` is
proportional to ``(1 - abar_t) / abar_t``): near 0 at small ``t``, 1 at ``T``. With a zero-terminal
SNR schedule (``abar_T = 0``) it is undefined, so that schedule is refused.

OneTrainer's ``generalized_offset_noise`` (with ``offset_noise_weight`` as ``strength``) computes
the same ``psi_t`` by the recursion; sd-scripts, SimpleTuner, ai-toolkit and EveryDream2 have only
the constant offset (``offset`` here). The loss target is the whole noise ``eps + strength psi_t xi``
(for v-prediction, the velocity of that noise), as OneTrainer trains it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from sdplug.params import strategy_params
from sdplug.strategies._tensor import fresh_gaussian, work_dtype
from sdplug.strategies.base import NoiseStrategy


def offset_coefficients(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``psi_t`` for every timestep of the schedule (float64), by Algorithm 1's recursion."""
    abar = alphas_cumprod.detach().to(torch.float64).cpu()
    if float(abar[-1]) <= 0.0:
        raise ValueError("psi_t is undefined on a zero-terminal SNR schedule (abar_T = 0)")
    previous = torch.cat([abar.new_ones(1), abar[:-1]])
    alphas = abar / previous
    # S_t = S_{t-1} (1 + C_t / sqrt(abar_{t-1})): the recursion's sum, one factor per step
    growth = 1.0 + (1.0 - alphas[1:]) / (alphas[1:] * (1.0 - previous[1:]))
    sums = torch.cat([abar.new_ones(1), torch.cumprod(growth, 0)])  # S_1 = gamma_1 / sqrt(abar_0) = 1
    psi = sums / (1.0 - abar).sqrt()
    return psi / psi[-1]


@strategy_params
class GeneralizedOffsetNoise(NoiseStrategy):
    """Generalized offset noise, ``noise + strength * psi_t * randn(B, C, 1, 1)`` (Kutsuna, 2024).

    ``psi_t`` is the balanced coefficient of each sample's timestep (``offset_coefficients``):
    hosts call ``plan.noise(latents, timesteps=t)`` with the step's timesteps. ``strength`` is
    the offset at ``t = T`` (OneTrainer's ``offset_noise_weight``; it uses it like the constant
    offset's strength, 0.03-0.1).
    """

    uses_timesteps: ClassVar[bool] = True
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1

    def alphas_problem(self, alphas_cumprod: torch.Tensor) -> tuple[str, str] | None:
        if float(alphas_cumprod[-1]) <= 0.0:
            return (
                "type",
                "generalized offset noise is undefined on a zero-terminal SNR schedule (its psi_t divides by "
                "abar_T = 0). Allowed: the constant 'offset', or no schedule.zero_terminal_snr.",
            )
        return None

    def transform(self, noise, latents, generator, *, timesteps=None, alphas_cumprod=None):
        if timesteps is None or alphas_cumprod is None:
            raise TypeError("generalized offset noise needs each sample's timestep and the schedule")
        noise = noise.to(work_dtype(latents)) if noise is not None else fresh_gaussian(latents, generator)
        shape = (*latents.shape[:2], *([1] * (latents.dim() - 2)))
        offset = torch.randn(shape, generator=generator, device=latents.device, dtype=noise.dtype)
        psi = self._coefficients(alphas_cumprod, timesteps.device)[timesteps.long()]  # on the timesteps' device
        scale = (self.strength * psi).to(latents.device, noise.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return (noise + scale * offset).to(latents.dtype)

    def prepare(self, alphas_cumprod: torch.Tensor) -> None:
        """Compute ``psi_t`` of the schedule once, when the plan is built (its pipeline calls this)."""
        self._coefficients(alphas_cumprod, torch.device("cpu"))

    def _coefficients(self, alphas_cumprod: torch.Tensor, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_psi_cache", {})  # one table per schedule (kept alive) and device
        key = (id(alphas_cumprod), str(device))
        if key not in cache:
            cpu = cache.get((id(alphas_cumprod), "cpu"))
            table = cpu[1] if cpu is not None else offset_coefficients(alphas_cumprod).to(torch.float32)
            cache[key] = (alphas_cumprod, table.to(device))
        return cache[key][1]
