"""The kohya adapter's hooks inside sd-scripts' step: ``train_util.conditional_loss`` with the
preset's ``[loss]`` type, and main's train/eval switch for a schedule-free optimizer.

sd-scripts computes its loss elementwise (``reduction="none"``), then applies its own mask
(``apply_masked_loss``: the mask alone, which is ``[loss]``'s default mask options), the mean per
sample, and the weighting (``apply_snr_weight``, hooked too). The hook replaces only the
elementwise loss, on the timesteps the step's noise call drew (one threshold ``c_t`` per sample
for the scheduled Huber types: v0.8.7 itself used one timestep per batch). Its two signatures:
main ``(model_pred, target, loss_type, reduction, huber_c=None)``, v0.8.7
``(model_pred, target, reduction="mean", loss_type="l2", huber_c=0.1)``.
"""

from __future__ import annotations

from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.strategies.optimizer_modes import eval_mode, train_mode

_ARGUMENTS = {"main": ("loss_type", "reduction", "huber_c"), "v0.8.7": ("reduction", "loss_type", "huber_c")}


def conditional_loss(adapter: Any, original: Any, model_pred: torch.Tensor, target: torch.Tensor, args: tuple, kwargs: dict):
    if adapter.preset.loss is None:
        return original(model_pred, target, *args, **kwargs)
    bound = {**dict(zip(_ARGUMENTS[adapter.version.name], args, strict=False)), **kwargs}
    reduction = bound.get("reduction", "mean")
    timesteps = adapter.timesteps
    if timesteps is None or timesteps.shape[0] != model_pred.shape[0]:
        raise SdplugError(
            "sd-scripts computed a loss without a noise call for its batch first; the preset's [loss] needs the "
            "timesteps of each sample. This script's loss path is not known to the adapter."
        )
    if adapter.validating:  # main's validation: the same loss, not a training call for the audit
        with adapter.plan.validation():
            loss = adapter.plan.elementwise_loss(model_pred, target, timesteps)
    else:
        loss = adapter.plan.elementwise_loss(model_pred, target, timesteps)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise SdplugError(f"sd-scripts asked conditional_loss for reduction {reduction!r}; the adapter knows none, mean, sum.")


def train_eval_switch(adapter: Any, original: Any, optimizer: Any, args: Any) -> tuple:
    """main's ``get_optimizer_train_eval_fn``: it knows only kohya's own schedule-free optimizers
    by name, so a preset's gets no-ops from it; the plan's strategy says which is."""
    if adapter.plan is not None and adapter.plan.optimizer_is_schedule_free:
        return (lambda: train_mode(optimizer)), (lambda: eval_mode(optimizer))
    return original(optimizer, args)
