"""Loss types: the elementwise loss between prediction and target, masking, one value per sample.

The plan computes ``loss type -> mask -> mean over non-batch dimensions -> weighting``
(``Plan.loss``). Every loss here is computed in float32, one value per sample.

Where the mask options live: every built-in loss type takes ``unmasked_weight`` and
``normalize_by_mask_area`` (``MaskOptions``), so a preset's ``[loss]`` table carries them next
to ``type``; a mask passed to ``plan.loss(..., mask=M)`` (``M`` broadcastable to the
prediction, 1 = train, 0 = ignore) is then used as follows:

* ``weight = clamp(M, unmasked_weight, 1)``; the elementwise loss is multiplied by it;
* ``normalize_by_mask_area = true`` divides each sample's loss by the mean of its weights, so
  the per-sample loss is the weighted mean over the mask instead of the mean over the image
  (a sample whose weights are all 0 contributes 0, not NaN).

Peers: kohya sd-scripts (``--masked_loss``, ``--alpha_mask``; ``apply_masked_loss``)
multiplies the loss by the mask alone: ``unmasked_weight = 0``, ``normalize_by_mask_area =
false``, the defaults here (kohya also resizes the mask to the latents with area interpolation,
as ``resize_mask`` does). OneTrainer (``masked_training``, ``unmasked_weight`` default 0.1,
``normalize_masked_area_loss`` default false) clamps the mask the same way. Without a mask the
options change nothing.

The per-sample threshold ``c_t`` of ``pseudo_huber`` and ``smooth_l1`` follows kohya's
``get_huber_threshold_if_needed``, one value per sample from its own timestep (kohya
sd-scripts v0.8.7 drew one timestep for the whole batch and used its threshold for all).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from sdplug.errors import SdplugError
from sdplug.params import strategy_params
from sdplug.strategies.base import LossType

_Positive = Annotated[float, Field(gt=0.0, le=100.0)]
HuberSchedule = Literal["constant", "exponential", "snr"]


def _non_batch(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values shaped to broadcast against ``like`` (B, ...)."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def resize_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A pixel mask ``(B, H, W)`` or ``(B, 1, H, W)`` at ``like``'s spatial size ``(B, 1, h, w)``.

    Area interpolation, as kohya sd-scripts resizes its masks to the latents; hosts whose masks
    are already at latent size need not call it.
    """
    mask = mask.float()
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise SdplugError(f"resize_mask: a mask is (B, H, W) or (B, 1, H, W), not {tuple(mask.shape)}.")
    return F.interpolate(mask, size=tuple(like.shape[2:]), mode="area").to(like.device)


def huber_threshold(
    c: float,
    schedule: HuberSchedule,
    scale: float,
    timesteps: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """``c_t`` per sample, float32 ``(B,)`` (kohya sd-scripts ``get_huber_threshold_if_needed``).

    * constant: ``c * scale``;
    * exponential: ``exp(-alpha t) * scale`` with ``alpha = -ln(c) / T`` (``T`` the schedule's
      length): ``scale`` at ``t = 0``, falling to ``c * scale`` at ``t = T``;
    * snr: ``((1 - c) / (1 + sigma_t)**2 + c) * scale`` with ``sigma_t = sqrt((1 - a_t) / a_t)``:
      near 1 at clean timesteps, ``c`` at noisy ones. Written as ``a_t / (sqrt(a_t) +
      sqrt(1 - a_t))**2`` so a zero-terminal step (``a_T = 0``) gives exactly ``c``. kohya
      ignores ``--huber_scale`` under this schedule; here ``scale`` multiplies every schedule.
    """
    if schedule == "constant":
        device = timesteps.device if timesteps is not None else alphas_cumprod.device
        return torch.full((batch_size,), c * scale, dtype=torch.float32, device=device)
    if timesteps is None:
        raise SdplugError(f"the huber threshold schedule {schedule!r} needs each sample's timestep; pass timesteps=.")
    t = timesteps.long()
    if schedule == "exponential":
        alpha = -math.log(c) / len(alphas_cumprod)
        return (torch.exp(-alpha * t.double()) * scale).to(torch.float32)
    a = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
    inverse_square = a / (a.sqrt() + (1.0 - a).clamp_min(0.0).sqrt()).square()  # 1 / (1 + sigma_t)**2
    return (((1.0 - c) * inverse_square + c) * scale).to(torch.float32)


@strategy_params
class MaskOptions(LossType):
    """How a loss mask is applied (see the module docstring); shared by every built-in loss type."""

    unmasked_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    normalize_by_mask_area: bool = False

    def apply_mask(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            shape = torch.broadcast_shapes(tuple(mask.shape), tuple(loss.shape))
        except RuntimeError:
            shape = None
        if shape != loss.shape:
            raise SdplugError(
                f"plan.loss: the mask has shape {tuple(mask.shape)}, which does not broadcast to the prediction's "
                f"{tuple(loss.shape)}. Allowed: a mask broadcastable to the prediction, e.g. (B, 1, H, W) at latent size "
                "(sdplug.strategies.loss.resize_mask resizes a pixel mask)."
            )
        weight = mask.to(device=loss.device, dtype=loss.dtype).clamp(self.unmasked_weight, 1.0)
        loss = loss * weight
        if self.normalize_by_mask_area:
            area = weight.expand(loss.shape).mean(dim=_non_batch(loss), keepdim=True)
            loss = loss / area.clamp_min(torch.finfo(loss.dtype).tiny)
        return loss


def _check_batch(timesteps: torch.Tensor | None, model_pred: torch.Tensor) -> None:
    if timesteps is not None and tuple(timesteps.shape) != (model_pred.shape[0],):
        raise SdplugError(
            f"plan.loss: {tuple(timesteps.shape)} timesteps for a batch of {model_pred.shape[0]}; "
            "allowed: one timestep per sample, shape (B,)."
        )


@strategy_params
class MSELoss(MaskOptions):
    """Mean squared error, ``(pred - target)**2``: the default (Ho et al., DDPM, 2020).

    kohya sd-scripts ``--loss_type l2``, OneTrainer ``mse_strength = 1``, SimpleTuner ``l2``,
    EveryDream2 ``mse``, diffusers' example scripts: all the same loss.
    """

    def elementwise(self, model_pred, target, timesteps, alphas_cumprod):
        return (model_pred - target).square()


@strategy_params
class L1Loss(MaskOptions):
    """Mean absolute error, ``|pred - target|``.

    kohya sd-scripts ``--loss_type l1``; OneTrainer ``mae_strength`` (added to the MSE, which
    stays at strength 1 unless set to 0: this type alone is OneTrainer mse 0, mae 1).
    """

    def elementwise(self, model_pred, target, timesteps, alphas_cumprod):
        return (model_pred - target).abs()


@strategy_params
class HuberLoss(MaskOptions):
    """True Huber loss: ``d**2 / 2`` for ``|d| <= delta``, ``delta (|d| - delta / 2)`` beyond (Huber, 1964).

    ``torch.nn.functional.huber_loss``. OneTrainer's ``huber_strength``/``huber_delta`` (delta
    1.0) and EveryDream2's ``--loss_type huber`` (delta 1.0) are this loss. kohya sd-scripts'
    ``--loss_type huber`` is NOT: it is the pseudo-Huber loss (``pseudo_huber`` here), and its
    ``smooth_l1`` is ``smooth_l1`` here, not PyTorch's ``smooth_l1_loss``. EveryDream2's default
    ``mse_huber`` (MSE and Huber blended by ``t / T``) has no single type here.
    """

    delta: _Positive = 1.0

    def elementwise(self, model_pred, target, timesteps, alphas_cumprod):
        return F.huber_loss(model_pred, target, reduction="none", delta=self.delta)


@strategy_params
class _ScheduledThreshold(MaskOptions):
    """A threshold ``c_t`` per sample from ``c``, ``schedule`` and ``scale`` (``huber_threshold``)."""

    c: _Positive = 0.1
    schedule: HuberSchedule = "snr"
    scale: _Positive = 1.0

    def needs_timesteps(self) -> bool:
        return self.schedule != "constant"

    def threshold(self, timesteps: torch.Tensor | None, alphas_cumprod: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``c_t`` shaped to broadcast against ``like`` (the prediction)."""
        _check_batch(timesteps, like)
        return _per_sample(huber_threshold(self.c, self.schedule, self.scale, timesteps, alphas_cumprod, like.shape[0]), like)


@strategy_params
class PseudoHuberLoss(_ScheduledThreshold):
    """Scheduled pseudo-Huber loss, ``2 c_t (sqrt(d**2 + c_t**2) - c_t)`` (Khrapov et al., "Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", 2024).

    Quadratic (``d**2``) for ``|d| << c_t``, linear (``2 c_t |d|``) beyond, so outlier pixels
    pull less. This is kohya sd-scripts' ``--loss_type huber`` (``conditional_loss``) with
    ``c = --huber_c`` (default 0.1), ``schedule = --huber_schedule`` (default snr) and
    ``scale = --huber_scale``; SimpleTuner's ``huber`` is the same. kohya v0.8.7 gave the whole
    batch one ``c_t`` from one timestep; here every sample has its own. OneTrainer has no
    pseudo-Huber (its Huber is the true one, ``huber``).
    """

    def elementwise(self, model_pred, target, timesteps, alphas_cumprod):
        c = self.threshold(timesteps, alphas_cumprod, model_pred)
        return 2.0 * c * (((model_pred - target).square() + c.square()).sqrt() - c)


@strategy_params
class SmoothL1Loss(_ScheduledThreshold):
    """Scheduled "smooth L1", ``2 (sqrt(d**2 + c_t**2) - c_t)``: the pseudo-Huber loss divided by ``c_t``.

    kohya sd-scripts' ``--loss_type smooth_l1`` (``conditional_loss``), with the same ``c``,
    ``schedule`` and ``scale`` as ``pseudo_huber``; SimpleTuner's ``smooth_l1`` is the same.
    About ``d**2 / c_t`` for ``|d| << c_t`` and ``2 |d|`` beyond. Not PyTorch's
    ``smooth_l1_loss`` (a true Huber divided by its beta).
    """

    def elementwise(self, model_pred, target, timesteps, alphas_cumprod):
        c = self.threshold(timesteps, alphas_cumprod, model_pred)
        return 2.0 * (((model_pred - target).square() + c.square()).sqrt() - c)
