"""The preset's optimizer, chosen for this machine and built over the host's parameters.

``Plan.optimizer`` documents the contract for hosts; ``OptimizerChoice`` keeps what the plan
knows of the optimizer: which strategy runs (the preset's, or its fallback when the named one
cannot run here), whether it adapts its own step size, and what it built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.plan import optimizer_groups
from sdplug.plan.optimizer_groups import LearnedGroup
from sdplug.plan.runs_here import cannot_run
from sdplug.preset import Preset, StrategySpec
from sdplug.strategies import registry
from sdplug.strategies.base import LossWeighting, OptimizerStrategy


class OptimizerChoice:
    """The optimizer strategy a plan builds with (None: the host's own), and what it built."""

    def __init__(self, preset: Preset):
        self.strategy, self.fell_back = _choose(preset)
        # the preset's optimizer table, or its fallback's when the named one cannot run here
        self.spec: StrategySpec | None = preset.optimizer_fallback if self.fell_back else preset.optimizer
        self.built: torch.optim.Optimizer | None = None

    @property
    def adapts_step_size(self) -> bool:
        return self.strategy is not None and bool(self.strategy.adapts_step_size)

    @property
    def schedule_free(self) -> bool:
        return self.strategy is not None and bool(self.strategy.schedule_free)

    def preset_lr(self) -> float | None:
        return optimizer_groups.preset_lr(self.spec, self.strategy)

    def build(
        self,
        params: list[Any],
        default: Callable[[list[Any]], torch.optim.Optimizer] | None,
        host_lr: float | None,
        learned_group: LearnedGroup,
        learned: LossWeighting | None,
    ) -> torch.optim.Optimizer:
        """The optimizer over ``params`` and a learned weighting's parameters (``Plan.optimizer``)."""
        device = optimizer_groups.first_trained_device(params)
        if device is not None and learned is not None and learned.parameters():
            learned.to(device=device)  # its parameters AND buffers, in place
        strategy = self.strategy
        lr = self.preset_lr()
        if lr is not None:
            params = optimizer_groups.with_lr(params, lr)
        elif self.spec is not None and host_lr is not None:
            strategy = registry("optimizer").create(self.spec.type, **{**self.spec.params, "lr": host_lr})
        # after the move: moving a parameter to "meta" makes a new Parameter
        params = optimizer_groups.join_learned(params, learned.parameters() if learned is not None else [], learned_group)
        if strategy is not None:
            self.built = strategy.build(params)
        elif default is None:
            raise SdplugError("the preset names no optimizer and the host gave no default= to use instead.")
        else:
            self.built = default(params)
        return self.built

    def record(self, learned: LossWeighting | None) -> dict[str, Any]:
        """The audit's ``optimizer`` section (only once built)."""
        assert self.built is not None
        parameters = learned.parameters() if learned is not None else []
        tensors = [*parameters, *(learned.buffers() if learned is not None else [])]
        return {
            "strategy": self.spec.type if self.spec is not None else "(host default)",
            "fell_back": self.fell_back,
            **optimizer_groups.describe(self.built, parameters, tensors),
        }

    def learning_rates(self) -> list[float]:
        """The built optimizer's group learning rates (none before it is built)."""
        if self.built is None:
            return []
        return [optimizer_groups.learning_rate(g["lr"]) for g in self.built.param_groups if "lr" in g]


def _choose(preset: Preset) -> tuple[OptimizerStrategy | None, bool]:
    """The optimizer strategy to build, and whether it is the preset's fallback (an 8-bit
    optimizer is tried with a real step on the training device; a named ``optimizer.fallback``
    is taken, with a warning, only when the choice cannot run)."""
    if preset.optimizer is None:
        return None, False
    primary = preset.optimizer.create()
    try:
        primary.check_available()
        return primary, False
    except MissingDependencyError as exc:
        if preset.optimizer_fallback is None:
            raise cannot_run(preset, exc, "optimizer.type") from exc
        fallback = preset.optimizer_fallback.create()
        try:
            fallback.check_available()
        except MissingDependencyError as fallback_exc:
            raise cannot_run(preset, fallback_exc, "optimizer.fallback") from fallback_exc
        left = sorted(set(preset.optimizer.params) - set(preset.optimizer_fallback.params))
        warnings.warn(
            f"optimizer {preset.optimizer.type!r} cannot run here ({exc}); using the preset's "
            f"fallback {preset.optimizer_fallback.type!r} as it names in optimizer.fallback"
            + (f" (without {', '.join(left)}, which only {preset.optimizer.type!r} takes)." if left else "."),
            stacklevel=4,
        )
        return fallback, True
