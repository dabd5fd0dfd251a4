"""What a plan does once, before training: build the optimizer and install the attention.

``Plan.optimizer`` and ``Plan.attention`` document the contract; these are their bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from sdplug import optimizer_groups
from sdplug.ema import EMA
from sdplug.errors import PresetError, SdplugError
from sdplug.strategies import registry

if TYPE_CHECKING:
    from sdplug.optimizer_groups import LearnedGroup
    from sdplug.plan import Plan


def build_optimizer(
    plan: Plan,
    params: list[Any],
    default: Callable[[list[Any]], torch.optim.Optimizer] | None,
    host_lr: float | None,
    learned_group: LearnedGroup,
) -> torch.optim.Optimizer:
    device = optimizer_groups.first_trained_device(params)
    if device is not None and plan.trainable_parameters():
        plan.to(device=device)  # a learned weighting's parameters AND buffers, in place
    spec, strategy = plan.optimizer_spec, plan.optimizer_strategy
    lr = optimizer_groups.preset_lr(spec, strategy)
    if lr is not None:
        params = optimizer_groups.with_lr(params, lr)
    elif spec is not None and host_lr is not None:
        strategy = registry("optimizer").create(spec.type, **{**spec.params, "lr": host_lr})
    # after the move: moving a parameter to "meta" makes a new Parameter
    params = optimizer_groups.join_learned(params, plan.trainable_parameters(), learned_group)
    if strategy is not None:
        return strategy.build(params)
    if default is None:
        raise SdplugError("the preset names no optimizer and the host gave no default= to use instead.")
    return default(params)


def track_ema(plan: Plan, parameters: list[Any]) -> EMA | None:
    if plan.preset.ema.decay is None:
        return None
    if plan.built_optimizer is None:
        raise SdplugError("plan.ema: call plan.optimizer first; the average follows the steps of the optimizer it builds.")
    ema = EMA(parameters, plan.preset.ema, optimizer=plan.built_optimizer)  # schedule-free: averages its x
    plan.built_optimizer.register_step_post_hook(lambda optimizer, args, kwargs: ema.after_optimizer_step())
    return ema


def processor_classes(model: torch.nn.Module) -> str:
    return ",".join(sorted({type(p).__name__ for p in getattr(model, "attn_processors", {}).values()}))


def install_attention(plan: Plan, model: torch.nn.Module, install: Callable[[str], dict[str, Any]] | None) -> dict[str, Any]:
    """The attention record: the host's own switch (``install``), or diffusers' processors
    before and after the preset's strategy."""
    spec = plan.preset.attention
    if install is not None:
        if spec is None:
            raise SdplugError("plan.attention(install=...): the preset names no attention to install.")
        return {"strategy": spec.type, **install(spec.type)}
    before = processor_classes(model)
    changed = 0
    if plan.attention_strategy is not None:
        try:
            changed = plan.attention_strategy.apply(model)
        except PresetError as exc:
            if exc.path is not None:
                raise
            # a parameter that only the model can judge (sliced slice_size against its heads):
            # the strategy knows the key, the plan knows the file
            raise PresetError(exc.problem, path=(spec.path if spec else None) or plan.preset.path, key=exc.key) from None
    return {
        "strategy": spec.type if spec else "(host default)",
        "processor_before": before,
        "processor": processor_classes(model),
        "modules": len(getattr(model, "attn_processors", {})),
        "changed": changed,
    }
