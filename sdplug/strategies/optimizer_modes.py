"""Train and eval modes of schedule-free optimizers, switched the same way by every host.

A schedule-free optimizer (Defazio et al., "The Road Less Scheduled", 2024) keeps two points:
it takes its gradients at one (``y``) and its result is another (``x``, an average along the
way). ``optimizer.train()`` puts ``y`` into the model's parameters and ``optimizer.eval()`` puts
``x`` there. So the optimizer must be in eval mode while a host samples, validates or saves, and
in train mode for every step (the ``schedulefree`` package refuses a step in eval mode). Other
optimizers have no modes, and these functions do nothing for them, so hosts call them for
every optimizer:

- ``with evaluating(optimizer):`` around sampling, validation and saving (the weights and the
  training state alike: a state saved in eval mode resumes exactly);
- ``train_mode(optimizer)`` after loading a checkpoint, before the next step (a state saved in
  eval mode loads in eval mode). ``plan.optimizer`` builds a schedule-free optimizer in train
  mode already.

Wrappers count: accelerate's ``AcceleratedOptimizer`` (before accelerate 0.29 it has no modes
of its own) is looked through to the optimizer it wraps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sdplug.errors import SdplugError

_WRAPPER_DEPTH = 3  # accelerate's optimizer around deepspeed's around the real one


def _with_modes(optimizer: Any) -> Any | None:
    """The optimizer itself, or the one it wraps, that has ``train()`` and ``eval()``; None when none has."""
    if isinstance(optimizer, torch.nn.Module):
        # a model has train()/eval() too: switching it here would be a silent, different change
        raise SdplugError(f"optimizer modes: got a model ({type(optimizer).__name__}); pass the optimizer.")
    candidate = optimizer
    for _ in range(_WRAPPER_DEPTH):
        if candidate is None:
            return None
        if callable(getattr(candidate, "train", None)) and callable(getattr(candidate, "eval", None)):
            return candidate
        candidate = getattr(candidate, "optimizer", None)
    return None


def has_modes(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the optimizer it wraps) has train and eval modes."""
    return _with_modes(optimizer) is not None


def in_train_mode(optimizer: Any) -> bool | None:
    """True or False for an optimizer that records its mode (schedule-free ones do, per
    parameter group), None for one that does not."""
    target = _with_modes(optimizer)
    groups = getattr(target, "param_groups", None) if target is not None else None
    if not groups or "train_mode" not in groups[0]:
        return None
    return bool(groups[0]["train_mode"])


def eval_mode(optimizer: Any) -> None:
    """Put the evaluation weights into the model (schedule-free); nothing for other optimizers."""
    target = _with_modes(optimizer)
    if target is not None:
        target.eval()


def train_mode(optimizer: Any) -> None:
    """Put the training weights back, ready for a step (schedule-free); nothing for other optimizers."""
    target = _with_modes(optimizer)
    if target is not None:
        target.train()


@contextmanager
def evaluating(optimizer: Any) -> Iterator[Any]:
    """Eval mode inside the block, then the mode it was in before (train mode unless it was
    already in eval mode, so blocks nest); nothing for optimizers without modes or for None."""
    was_training = in_train_mode(optimizer) is not False
    eval_mode(optimizer)
    try:
        yield optimizer
    finally:
        if was_training:
            train_mode(optimizer)
