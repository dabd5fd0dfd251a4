"""Timestep distributions OneTrainer offers for discrete models: beta, cosmap and mode ("heavy tail").

Each draws ``u`` in ``[0, 1)`` from its law, applies ``shift`` (``timesteps.shift_unit``,
OneTrainer's ``timestep_shift``) and takes ``floor(u * T)``, so ``u`` near 0 is a clean
timestep and near 1 a noisy one, as in OneTrainer (``_get_timestep_discrete``) and for sdplug's
``logit_normal``. All draws come from the given generator (OneTrainer's general beta path
uses PyTorch's global generator instead), so a seed fixes them.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from sdplug.params import strategy_params
from sdplug.strategies.base import TimestepStrategy
from sdplug.strategies.timesteps import Shift, _generator_device, shift_unit, unit_to_timesteps

_Concentration = Annotated[float, Field(ge=0.01, le=100.0)]
# Marsaglia-Tsang accepts a proposal with probability >= 0.95 for shape >= 1: the chance that
# all of this many proposals are refused is below 1e-20, and only then is the mean used instead.
_GAMMA_PROPOSALS = 16
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


class _UnitTimesteps(TimestepStrategy):
    """Draw ``u`` (``unit``), shift it, discretise it over the schedule."""

    shift: float
    processes = frozenset({"ddpm", "flow"})  # draws a position (position())

    def unit(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        u = self.unit(batch_size, generator, _generator_device(generator))
        return unit_to_timesteps(shift_unit(u, self.shift), 0, num_train_timesteps)

    def position(self, batch_size, num_train_timesteps, *, generator=None):
        return shift_unit(self.unit(batch_size, generator, _generator_device(generator)).double(), self.shift)


def standard_gamma(shape: float, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` Gamma(shape, 1) draws (float64) from ``generator``, with no host-side loop.

    Marsaglia & Tsang (2000): ``_GAMMA_PROPOSALS`` proposals per draw, the first accepted one
    kept; shapes below 1 use ``Gamma(shape + 1) * U**(1 / shape)``.
    """
    boosted = shape < 1.0
    d = (shape + 1.0 if boosted else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = torch.randn(n, _GAMMA_PROPOSALS, generator=generator, device=device, dtype=torch.float64)
    u = torch.rand(n, _GAMMA_PROPOSALS, generator=generator, device=device, dtype=torch.float64)
    v = (1.0 + c * x).pow(3)
    accepted = (v > 0) & (u.log() < 0.5 * x.square() + d - d * v + d * v.clamp_min(1e-300).log())
    first = accepted.double().argmax(dim=1, keepdim=True)  # the first accepted proposal
    draws = torch.where(
        accepted.any(dim=1), d * v.gather(1, first).squeeze(1), torch.full((n,), d, dtype=torch.float64, device=device)
    )
    if boosted:
        draws = draws * torch.rand(n, generator=generator, device=device, dtype=torch.float64).pow(1.0 / shape)
    return draws


@strategy_params
class BetaTimesteps(_UnitTimesteps):
    """Beta-distributed timesteps, ``u ~ Beta(alpha, beta)`` (OneTrainer's BETA distribution).

    Mean ``alpha / (alpha + beta)``. OneTrainer sets ``alpha = noising_weight``, ``beta =
    noising_bias`` (each at least 1e-4) and, following the comment there on B-TTDM, recommends
    ``beta = 1`` with ``alpha < 1``: density ``alpha u**(alpha - 1)``, favouring clean
    timesteps; the defaults (0.5, 1) are that case. ``beta = 1`` and ``alpha = 1`` are drawn by
    inverting the CDF (``u**(1/alpha)``, ``1 - u**(1/beta)``), others as ``X / (X + Y)`` of two
    Gamma draws. kohya sd-scripts, SimpleTuner (for these models), EveryDream2 and diffusers'
    scripts offer no beta sampling.
    """

    alpha: _Concentration = 0.5
    beta: _Concentration = 1.0
    shift: Shift = 1.0

    def unit(self, batch_size, generator, device):
        if self.beta == 1.0 or self.alpha == 1.0:
            u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
            return u.pow(1.0 / self.alpha) if self.beta == 1.0 else 1.0 - u.pow(1.0 / self.beta)
        x = standard_gamma(self.alpha, batch_size, generator, device)
        y = standard_gamma(self.beta, batch_size, generator, device)
        return x / (x + y).clamp_min(torch.finfo(torch.float64).tiny)


@strategy_params
class CosMapTimesteps(_UnitTimesteps):
    """CosMap timesteps, ``t = 1 - 1 / (tan(pi u / 2) + 1)`` (Esser et al., "Scaling Rectified Flow Transformers", 2024).

    Density ``2 / (pi (1 - 2t + 2t**2))`` (median 1/2, more weight at both ends than the
    middle compared with logit-normal). OneTrainer's COS_MAP samples the same density from a
    table of weights over the timesteps; here the map is inverted directly. diffusers'
    ``compute_density_for_timestep_sampling`` offers ``cosmap`` only as a loss weighting.
    """

    shift: Shift = 1.0

    def unit(self, batch_size, generator, device):
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        return 1.0 - 1.0 / (torch.tan(math.pi / 2.0 * u) + 1.0)


@strategy_params
class ModeTimesteps(_UnitTimesteps):
    """Mode sampling with heavy tails, ``t = 1 - u - scale (cos(pi u / 2)**2 - 1 + u)`` (Esser et al., "Scaling Rectified Flow Transformers", 2024).

    ``scale`` in ``[-1, 2 / (pi - 2)]`` (the range where the map stays monotone): 0 is uniform,
    positive values favour the middle timesteps, negative ones the ends. diffusers' SD3/Flux
    scripts call it ``weighting_scheme = "mode"`` with ``mode_scale`` default 1.29, used here;
    OneTrainer calls it HEAVY_TAIL (``heavy_tail``, whose default follows OneTrainer's).
    """

    scale: Annotated[float, Field(ge=-1.0, le=MODE_SCALE_MAX)] = 1.29
    shift: Shift = 1.0

    def unit(self, batch_size, generator, device):
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        return (1.0 - u - self.scale * (torch.cos(math.pi / 2.0 * u).square() - 1.0 + u)).clamp(0.0, 1.0)


@strategy_params
class HeavyTailTimesteps(ModeTimesteps):
    """OneTrainer's HEAVY_TAIL timesteps: the law of ``mode`` (SD3's mode sampling), under OneTrainer's name and default.

    ``scale`` is OneTrainer's ``noising_weight``, default 0 as there: uniform timesteps until a
    scale is set (``mode`` defaults to diffusers' 1.29 instead). How it differs from OneTrainer:
    ``scale`` must lie in ``[-1, 2 / (pi - 2)]``, where the map stays monotone and inside [0, 1]
    (OneTrainer takes any ``noising_weight`` and does not clamp); ``u`` is drawn in float64
    (OneTrainer: float32), so one seed gives other draws; the range is the whole schedule
    (OneTrainer scales it into ``min/max_noising_strength``). ``shift`` and the discretisation
    (``floor(u T)``) are OneTrainer's.
    """

    scale: Annotated[float, Field(ge=-1.0, le=MODE_SCALE_MAX)] = 0.0
