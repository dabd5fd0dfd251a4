"""Timestep sampling strategies."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from sdplug.errors import PresetError
from sdplug.params import strategy_params
from sdplug.strategies.base import TimestepStrategy

_Timestep = Annotated[int, Field(ge=0, le=100_000)]


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


@strategy_params
class UniformTimesteps(TimestepStrategy):
    """Uniform integer timesteps in ``[min_timestep, max_timestep)`` (Ho et al., DDPM, 2020).

    ``max_timestep`` defaults to the scheduler's number of training timesteps; narrowing the
    range is kohya's ``--min_timestep/--max_timestep``.
    """

    min_timestep: _Timestep = 0
    max_timestep: _Timestep | None = None

    def __post_init__(self):
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(f"max_timestep ({self.max_timestep}) must be > min_timestep ({self.min_timestep}).")

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        if high > num_train_timesteps or self.min_timestep >= high:
            raise PresetError(
                f"timesteps 'uniform' range [{self.min_timestep}, {high}) does not fit a scheduler with "
                f"{num_train_timesteps} training timesteps; allowed: 0 <= min_timestep < max_timestep <= {num_train_timesteps}."
            )
        return torch.randint(self.min_timestep, high, (batch_size,), generator=generator, device=_generator_device(generator))


@strategy_params
class LogitNormalTimesteps(TimestepStrategy):
    """Logit-normal timesteps, ``t = T * sigmoid(N(mean, std))`` (Esser et al., "Scaling Rectified Flow Transformers", 2024).

    Concentrates training on middle timesteps; ``mean`` > 0 shifts it toward noisier ones.
    """

    mean: Annotated[float, Field(ge=-5.0, le=5.0)] = 0.0
    std: Annotated[float, Field(gt=0.0, le=5.0)] = 1.0

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        normal = torch.randn(batch_size, generator=generator, device=_generator_device(generator))
        u = torch.sigmoid(self.mean + self.std * normal)
        return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


@strategy_params
class BiasedTimesteps(TimestepStrategy):
    """Uniform timesteps with one region drawn ``multiplier`` times as often (diffusers' ``--timestep_bias_*``).

    ``bias="earlier"`` favours the first ``portion`` of timesteps (fine detail), ``"later"`` the
    last ``portion`` (composition, overall brightness), ``"range"`` the steps in ``[begin, end)``.
    A ``multiplier`` below 1 draws the region less often instead.
    """

    bias: Literal["earlier", "later", "range"] = "later"
    multiplier: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    portion: Annotated[float, Field(gt=0.0, le=1.0)] = 0.25
    begin: _Timestep = 0
    end: _Timestep | None = None

    def __post_init__(self):
        if self.end is not None and self.end <= self.begin:
            raise ValueError(f"end ({self.end}) must be > begin ({self.begin}).")

    def probabilities(self, num_train_timesteps: int) -> torch.Tensor:
        weights = torch.ones(num_train_timesteps, dtype=torch.float64)
        count = max(1, round(self.portion * num_train_timesteps))
        if self.bias == "earlier":
            weights[:count] *= self.multiplier
        elif self.bias == "later":
            weights[-count:] *= self.multiplier
        else:
            end = num_train_timesteps if self.end is None else self.end
            if end > num_train_timesteps:
                raise PresetError(
                    f"timesteps 'biased' range [{self.begin}, {end}) exceeds the scheduler's "
                    f"{num_train_timesteps} training timesteps; allowed: end <= {num_train_timesteps}."
                )
            weights[self.begin : end] *= self.multiplier
        return weights / weights.sum()

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        probs = self.probabilities(num_train_timesteps).to(_generator_device(generator))
        return torch.multinomial(probs, batch_size, replacement=True, generator=generator)
