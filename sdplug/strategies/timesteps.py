"""Timestep sampling strategies.

Continuous samplers draw ``u`` in ``[0, 1)`` and take ``floor(u * T)``; their ``shift`` (OneTrainer's
``timestep_shift``, the SD3/Flux resolution shift) first maps ``u -> s u / ((s - 1) u + 1)``:
``shift > 1`` moves training toward noisier timesteps, ``1`` (the default) changes nothing.
Beta, cosmap and mode sampling live in ``timestep_distributions.py``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from sdplug.errors import PresetError
from sdplug.params import strategy_params
from sdplug.strategies.base import TimestepStrategy

_Timestep = Annotated[int, Field(ge=0, le=100_000)]
Shift = Annotated[float, Field(gt=0.0, le=100.0)]


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def shift_unit(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``s u / ((s - 1) u + 1)``: OneTrainer's ``timestep_shift`` (and SD3's shift) on ``u`` in [0, 1]."""
    if shift == 1.0:
        return u
    return shift * u / ((shift - 1.0) * u + 1.0)


def unit_to_timesteps(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``floor(low + u (high - low))`` as a LongTensor in ``[low, high)``."""
    return (low + u * (high - low)).long().clamp_(low, high - 1)


@strategy_params
class UniformTimesteps(TimestepStrategy):
    """Uniform integer timesteps in ``[min_timestep, max_timestep)`` (Ho et al., DDPM, 2020).

    ``max_timestep`` defaults to the scheduler's number of training timesteps; narrowing the
    range is kohya's ``--min_timestep/--max_timestep``. ``shift`` other than 1 draws
    ``min + (max - min) * shift(u)`` instead (the range stays the range; OneTrainer shifts the
    absolute timestep after drawing it in its range, which agrees for the full schedule).
    """

    processes = frozenset({"ddpm", "flow"})  # draws a position (position())

    min_timestep: _Timestep = 0
    max_timestep: _Timestep | None = None
    shift: Shift = 1.0
    _label: ClassVar[str] = "uniform"

    def __post_init__(self):
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(f"max_timestep ({self.max_timestep}) must be > min_timestep ({self.min_timestep}).")

    def schedule_problem(self, num_train_timesteps: int) -> tuple[str, str] | None:
        """``(parameter, sentence)`` when the range does not fit the schedule, else None."""
        allowed = f"allowed: 0 <= min_timestep < max_timestep <= {num_train_timesteps}"
        if self.max_timestep is not None and self.max_timestep > num_train_timesteps:
            return "max_timestep", (
                f"timesteps {self._label!r} max_timestep = {self.max_timestep} is beyond the noise schedule, which has "
                f"{num_train_timesteps} training timesteps (0 to {num_train_timesteps - 1}); {allowed}."
            )
        if self.min_timestep >= num_train_timesteps:
            return "min_timestep", (
                f"timesteps {self._label!r} min_timestep = {self.min_timestep} is beyond the noise schedule, which has "
                f"{num_train_timesteps} training timesteps (0 to {num_train_timesteps - 1}); {allowed}."
            )
        return None

    def _range(self, num_train_timesteps: int) -> int:
        problem = self.schedule_problem(num_train_timesteps)
        if problem is not None:
            raise PresetError(problem[1], key=problem[0])
        return num_train_timesteps if self.max_timestep is None else self.max_timestep

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        high = self._range(num_train_timesteps)
        device = _generator_device(generator)
        if self.shift == 1.0:
            return torch.randint(self.min_timestep, high, (batch_size,), generator=generator, device=device)
        u = torch.rand(batch_size, generator=generator, device=device)
        return unit_to_timesteps(shift_unit(u, self.shift), self.min_timestep, high)

    def position(self, batch_size, num_train_timesteps, *, generator=None):
        high = self._range(num_train_timesteps)
        u = torch.rand(batch_size, generator=generator, device=_generator_device(generator), dtype=torch.float64)
        return (self.min_timestep + shift_unit(u, self.shift) * (high - self.min_timestep)) / num_train_timesteps


@strategy_params
class StratifiedTimesteps(UniformTimesteps):
    """Stratified uniform timesteps: the range cut into ``B`` equal strata, one draw in each per batch (SimpleTuner ``segmented_timestep_selection``).

    Sample ``i`` of the permutation gets ``u = (i + U) / B``, so every batch covers the whole
    range evenly while each timestep's marginal law stays exactly uniform (with ``shift``, the
    strata are cut in ``u`` before the shift). ``shuffle`` (default) hands the strata to the
    samples in a random order; SimpleTuner gives sample ``i`` the ``i``-th segment from the
    top, with equal integer segments and the remainder in the last one. kohya sd-scripts,
    OneTrainer, EveryDream2 and diffusers' scripts draw independent uniform timesteps.
    """

    shuffle: bool = True
    _label: ClassVar[str] = "stratified"

    def _strata(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        """One ``u`` in each of ``batch_size`` equal strata, handed out shuffled or in order."""
        device = _generator_device(generator)
        strata = torch.arange(batch_size, device=device, dtype=torch.float64)
        u = (strata + torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)) / batch_size
        return u[torch.randperm(batch_size, generator=generator, device=device)] if self.shuffle else u

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        high = self._range(num_train_timesteps)
        u = self._strata(batch_size, generator)
        return unit_to_timesteps(shift_unit(u, self.shift), self.min_timestep, high)

    def position(self, batch_size, num_train_timesteps, *, generator=None):
        high = self._range(num_train_timesteps)
        u = self._strata(batch_size, generator)
        return (self.min_timestep + shift_unit(u, self.shift) * (high - self.min_timestep)) / num_train_timesteps


@strategy_params
class LogitNormalTimesteps(TimestepStrategy):
    """Logit-normal timesteps, ``t = T * sigmoid(N(mean, std))`` (Esser et al., "Scaling Rectified Flow Transformers", 2024).

    Concentrates training on middle timesteps; ``mean`` > 0 shifts it toward noisier ones.
    OneTrainer's LOGIT_NORMAL is this with ``mean = noising_bias``, ``std = noising_weight + 1``.
    On a rectified flow, kohya's flow scripts' ``--timestep_sampling sigmoid`` is this with
    ``std = sigmoid_scale``; ``shift`` is that shifted by ``--discrete_flow_shift`` (``[schedule]
    flow_shift``, or this sampler's ``shift``); ``flux_shift`` is that with FLUX's
    resolution-dependent shift (``[schedule] dynamic_shift`` at its defaults). kohya draws a
    continuous sigma; sdplug the nearest sigma of the model's table.
    """

    processes = frozenset({"ddpm", "flow"})  # draws a position (position())

    mean: Annotated[float, Field(ge=-5.0, le=5.0)] = 0.0
    std: Annotated[float, Field(gt=0.0, le=5.0)] = 1.0
    shift: Shift = 1.0

    def sample(self, batch_size, num_train_timesteps, *, generator=None):
        normal = torch.randn(batch_size, generator=generator, device=_generator_device(generator))
        u = torch.sigmoid(self.mean + self.std * normal)
        return unit_to_timesteps(shift_unit(u, self.shift), 0, num_train_timesteps)

    def position(self, batch_size, num_train_timesteps, *, generator=None):
        normal = torch.randn(batch_size, generator=generator, device=_generator_device(generator), dtype=torch.float64)
        return shift_unit(torch.sigmoid(self.mean + self.std * normal), self.shift)


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
