"""A host's parameters arranged for the preset's optimizer, and the audit's record of it.

Hosts hand ``plan.optimizer`` plain parameters (the reference trainer, kohya's train_db and
fine_tune) or parameter groups with their own lr (kohya's train_network: --unet_lr,
--text_encoder_lr), some at lr 0, which is how kohya leaves a part untrained. Two rules hold
for every host:

- the preset's ``[optimizer] lr``, when it names one, is every trained group's lr: a group's
  own lr would silently win over the optimizer's. An optimizer that estimates its own step
  size (Prodigy, D-Adaptation: ``adapts_step_size``) gives every trained group its lr, 1.0 by
  default, even when the preset names none: the lrs a host puts on its groups are meant for
  AdamW, and as multipliers of the estimate they would make every step ~10,000x too small;
- a learned weighting's parameters train with the model, on the device its first trained
  parameter is on: as a group of their own (``"own"``), or inside the first trained group
  (``"first"``) for hosts that index their groups (sd-scripts main logs an lr per group).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy
import torch

from sdplug.strategies.optimizer import state_bytes

if TYPE_CHECKING:
    from sdplug.preset import StrategySpec
    from sdplug.strategies.base import OptimizerStrategy

LearnedGroup = Literal["own", "first"]


def frozen(group: Any) -> bool:
    """A parameter group at lr 0: the host's way to leave that part untrained."""
    return isinstance(group, dict) and group.get("lr") == 0


def _tensors(group: Any) -> list[Any]:
    return list(group["params"]) if isinstance(group, dict) else [group]


def first_trained_device(params: list[Any]) -> torch.device | None:
    """Where the first trained parameter is (a frozen group's only when every group is frozen)."""
    for group in [g for g in params if not frozen(g)] + [g for g in params if frozen(g)]:
        for tensor in _tensors(group):
            if isinstance(tensor, torch.Tensor):
                return tensor.device
    return None


def preset_lr(spec: StrategySpec | None, strategy: OptimizerStrategy | None) -> float | None:
    """The lr the preset gives every trained group, or None when the host's lr stands: the
    ``[optimizer]`` table's ``lr`` when it names one; else, for a strategy that adapts its own
    step size, its ``lr`` (its default). ``spec`` and ``strategy``: the table and strategy in use
    (a fallback's, when the plan fell back)."""
    if spec is not None and "lr" in spec.params:
        return float(spec.params["lr"])
    if strategy is not None and strategy.adapts_step_size:
        return float(getattr(strategy, "lr"))  # noqa: B009 - declared by every such strategy, not by the base class
    return None


def with_lr(params: list[Any], lr: float) -> list[Any]:
    """Every group at ``lr`` except the frozen ones."""
    return [{**g, "lr": lr} if isinstance(g, dict) and not frozen(g) else g for g in params]


def join_learned(params: list[Any], learned: list[torch.nn.Parameter], where: LearnedGroup) -> list[Any]:
    """``params`` with the learned weighting's parameters added, as a group of their own
    (groups or plain tensors become groups) or into the first trained group."""
    if not learned:
        return params
    if where == "own":
        groups = params if params and isinstance(params[0], dict) else ([{"params": params}] if params else [])
        return [*groups, {"params": learned}]
    index = next((i for i, g in enumerate(params) if not frozen(g)), None)
    if index is None or not isinstance(params[index], dict):
        return [*params, *learned]  # plain parameters: one group
    group = params[index]
    return [*params[:index], {**group, "params": [*group["params"], *learned]}, *params[index + 1 :]]


def learning_rate(value: Any) -> float:
    """A group's lr as a JSON number. torchao's optimizers keep it as a float32 0-d tensor: read
    back as the shortest decimal of that float32 (0.01, not 0.009999999776482582)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dtype == torch.float64 else float(str(numpy.float32(value.item())))
    return float(value)


def describe(optimizer: torch.optim.Optimizer, learned: list[torch.nn.Parameter], learned_tensors: list[torch.Tensor]) -> dict:
    """The audit's optimizer record; ``state_bytes`` read when the report is made (the state
    exists only after a step)."""
    learned_ids = {id(p) for p in learned}
    # every parameter the optimizer holds state for (a group at lr 0 still gets its moments)
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    record: dict[str, Any] = {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "state_bytes_per_trainable_parameter": round(state_bytes(optimizer) / max(trained, 1), 4),
        "trainable_parameters": trained - sum(p.numel() for p in learned),
        "learning_rates": sorted({learning_rate(g["lr"]) for g in optimizer.param_groups}),
    }
    if learned:
        # proof that the weighting trains: it is in the optimizer, in a group with a non-zero lr,
        # and all its tensors (buffers too) are where that group's parameters are
        record["learned_weighting_parameters"] = len(learned)
        record["learned_weighting_lr"] = [
            learning_rate(g["lr"]) for g in optimizer.param_groups if any(id(p) in learned_ids for p in g["params"])
        ]
        record["learned_weighting_devices"] = sorted({str(t.device) for t in learned_tensors})
    return record
