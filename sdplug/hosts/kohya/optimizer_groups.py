"""kohya's parameter groups, arranged for the preset's optimizer (the optimizer hook's translation).

sd-scripts hands ``get_optimizer`` either plain parameters (train_db, fine_tune) or parameter
groups with their own lr (train_network: --unet_lr, --text_encoder_lr), some at lr 0, which is
kohya's way to leave a part untrained.
"""

from __future__ import annotations

from typing import Any

import torch


def frozen(group: Any) -> bool:
    """A parameter group kohya set to lr 0: its way to leave that part untrained."""
    return isinstance(group, dict) and group.get("lr") == 0


def join_learned(plan, params: list[Any]) -> list[Any]:
    """``params`` with a learned weighting's parameters added, moved to the device they train on.

    They join the first trained group rather than a group of their own (as ``plan.optimizer``
    adds them): sd-scripts main indexes its lr descriptions by group, so a new group would break
    its logging, and a group at lr 0 (v0.8.7 keeps one for --text_encoder_lr 0) would leave the
    weighting untrained."""
    if not plan.trainable_parameters():
        return params
    params = list(params)
    index = next((i for i, g in enumerate(params) if not frozen(g)), None)
    joined = params[index] if index is not None else (params[0] if params else None)
    first = next(iter(joined["params"])) if isinstance(joined, dict) else joined
    if isinstance(first, torch.Tensor):
        plan.to(device=first.device)  # parameters AND buffers of the weighting
    learned = plan.trainable_parameters()  # after the move (one to "meta" makes new Parameters)
    if index is None or not isinstance(params[index], dict):
        params.extend(learned)  # plain parameters: one group
    else:
        group = params[index]  # a dict: checked above
        params[index] = {**group, "params": [*group["params"], *learned]}
    return params


def with_lr(params: list[Any], lr: float) -> list[Any]:
    """Every group at the preset's lr except the frozen ones: a group's own lr would silently
    win over the optimizer's."""
    return [{**g, "lr": lr} if isinstance(g, dict) and not frozen(g) else g for g in params]
