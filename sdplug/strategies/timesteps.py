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

    def schedule_problem(self, num_train_timesteps: int) -> tuple[str, str] | None:
        """``(parameter, sentence)`` when the range does not fit the schedule, else None."""
        allowed = f"allowed: 0 <= min_timestep < max_timestep <= {num_train_timesteps}"
        if self.max_timestep is not None and self.max_timestep > num_train_timesteps:
            return "max_timestep", (
                f"timesteps 'uniform' max_timestep = {self.max_timestep} is beyond the noise schedule, which has "
                f"{num_train_timesteps} training timesteps (0 to {num_train_timesteps - 1}); {allowed}."
            )
        if self.min_timestep >= num_train_timesteps:
            return "min_timestep", (
                f"timesteps 'uniform' min_timestep = {self.min_timestep} is beyond the noise schedule, which has "
                f"{num_train_timesteps} training timesteps (0 to {num_train_timesteps - 1}); {allowed}."
            )
        return None

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        problem = self.schedule_problem(num_train_timesteps)
        if problem is not None:
            raise PresetError(problem[1], key=problem[0])
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
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
    last ``portion`` (composition, overall brightness), ``"range"`` the steps in ``[begin, end)``
    (``begin`` defaults to 0, ``end`` to the schedule's end; give at least one).
    A ``multiplier`` below 1 draws the region less often instead. ``portion`` applies to
    ``earlier``/``later`` only (0.25 when omitted), ``begin``/``end`` to ``range`` only: a
    parameter the chosen bias would ignore is refused, never silently dropped.
    """

    bias: Literal["earlier", "later", "range"] = "later"
    multiplier: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    # None = not given; resolved in __post_init__ (so "given but ignored" can be refused)
    portion: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    begin: _Timestep | None = None
    end: _Timestep | None = None

    def __post_init__(self):
        if self.multiplier == 1.0:
            raise ValueError(
                "multiplier = 1.0 draws the biased region exactly as often as the rest: plain uniform timesteps. "
                "Allowed: a multiplier other than 1 (above 1 favours the region, below 1 avoids it), or type 'uniform'."
            )
        if self.bias == "range":
            if self.portion is not None:
                raise ValueError(
                    "portion applies to bias 'earlier' and 'later' only; bias 'range' biases [begin, end), "
                    "so give begin and/or end instead."
                )
            if self.begin in (None, 0) and self.end is None:
                raise ValueError(
                    "bias 'range' needs begin > 0 and/or end: the range [0, end of schedule) is every "
                    "timestep, so the sampling would be plain uniform."
                )
            self.begin = 0 if self.begin is None else self.begin
            if self.end is not None and self.end <= self.begin:
                raise ValueError(f"end ({self.end}) must be > begin ({self.begin}).")
        else:
            if self.begin is not None or self.end is not None:
                raise ValueError(
                    f"begin and end apply to bias 'range' only; bias {self.bias!r} biases the "
                    f"{'first' if self.bias == 'earlier' else 'last'} `portion` of the schedule. "
                    "Remove them, or set bias = 'range'."
                )
            self.portion = 0.25 if self.portion is None else self.portion

    def schedule_problem(self, num_train_timesteps: int) -> tuple[str, str] | None:
        """``(parameter, sentence)`` when ``begin``/``end`` do not fit the schedule, else None."""
        if self.bias != "range":
            return None
        assert self.begin is not None  # __post_init__ set it (0 when omitted) for bias 'range'
        allowed = f"allowed: 0 <= begin < end <= {num_train_timesteps}"
        if self.begin >= num_train_timesteps:
            return "begin", (
                f"timesteps 'biased' begin = {self.begin} is beyond the noise schedule, which has "
                f"{num_train_timesteps} training timesteps (0 to {num_train_timesteps - 1}), so no timestep "
                f"would be biased; {allowed}."
            )
        if self.end is not None and self.end > num_train_timesteps:
            return "end", (
                f"timesteps 'biased' end = {self.end} is beyond the noise schedule, which has "
                f"{num_train_timesteps} training timesteps (0 to {num_train_timesteps - 1}); {allowed}."
            )
        if self.begin == 0 and self.end == num_train_timesteps:
            return "end", (
                f"timesteps 'biased' range [0, {num_train_timesteps}) is every timestep of the noise schedule, "
                f"so the sampling would be plain uniform; {allowed}, and not the whole schedule."
            )
        return None

    def probabilities(self, num_train_timesteps: int) -> torch.Tensor:
        weights = torch.ones(num_train_timesteps, dtype=torch.float64)
        if self.bias in ("earlier", "later"):
            assert self.portion is not None  # __post_init__ set it (0.25 when omitted) for these biases
            count = max(1, round(self.portion * num_train_timesteps))
            region = slice(None, count) if self.bias == "earlier" else slice(-count, None)
            weights[region] *= self.multiplier
        else:
            problem = self.schedule_problem(num_train_timesteps)
            if problem is not None:
                raise PresetError(problem[1], key=problem[0])
            end = num_train_timesteps if self.end is None else self.end
            weights[self.begin : end] *= self.multiplier
        return weights / weights.sum()

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        probs = self.probabilities(num_train_timesteps).to(_generator_device(generator))
        return torch.multinomial(probs, batch_size, replacement=True, generator=generator)
