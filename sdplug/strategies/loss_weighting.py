"""Per-timestep loss weightings, each correct for epsilon, v and x0 (sample) prediction.

Every weighting is defined by its weight on the loss measured in x0 space, ``w_x0(SNR)``;
since ``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2``,
the weight of a model's own loss is ``w_x0 / SNR`` (epsilon), ``w_x0 / (SNR + 1)`` (v) or
``w_x0`` (sample). The formulas below are written per prediction type in a form that stays
finite at SNR = 0 (zero-terminal schedules), where ``w_x0 / SNR`` has no value: the limit is
used where it exists and ``snr_floor`` bounds the ones that diverge. Those are epsilon weights
only: the v and x0 weights of ``max_snr``, ``debiased`` and ``v_pred_like_loss`` are finite at
SNR 0 without a floor, so a preset that writes ``snr_floor`` for a v_prediction or sample model
is refused (``Preset.build``) rather than left to change nothing.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from sdplug.params import strategy_params
from sdplug.strategies.base import LossWeighting

_Gamma = Annotated[float, Field(gt=0.0, le=1e4)]
_Floor = Annotated[float, Field(gt=0.0, le=1.0)]


def _in_prediction_space(w_x0: torch.Tensor, snr: torch.Tensor, prediction_type: str, snr_floor: float) -> torch.Tensor:
    """Convert an x0-space weight into the model's space, dividing by at least ``snr_floor``
    (epsilon only: the other spaces' factors are finite at SNR 0).

    A loss ``w_x0 |x0^ - x0|^2`` is, in each model's own error:

    - DDPM epsilon: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``, so ``|x0^ - x0|^2 = |eps^ - eps|^2 / SNR``:
      weight ``w_x0 / SNR``;
    - DDPM v: ``x0 = sqrt(a) x_t - sqrt(1 - a) v``, so ``|x0^ - x0|^2 = (1 - a) |v^ - v|^2 = |v^ - v|^2 / (SNR + 1)``:
      weight ``w_x0 / (SNR + 1)``;
    - flow velocity (either sign): ``x_t = x0 + s v``, so ``|x0^ - x0|^2 = s^2 |v^ - v|^2`` with
      ``s = 1 / (1 + sqrt(SNR))`` (``SNR = ((1 - s) / s)^2``): weight ``w_x0 s^2``
      (``w_x0`` at s = 1, pure noise; 0 as s -> 0);
    - x0 (``sample``): ``w_x0``.
    """
    if prediction_type == "sample":
        return w_x0
    if prediction_type == "v_prediction":
        return w_x0 / (snr + 1.0)
    if prediction_type in ("velocity", "velocity_reversed"):
        return w_x0 / (1.0 + snr.sqrt()) ** 2
    return w_x0 / snr.clamp_min(snr_floor)


# the weightings written from SNR alone: on a flow process too, through its SNR
_ANY_PROCESS: frozenset[str] = frozenset({"ddpm", "flow"})


@strategy_params
class ConstantWeighting(LossWeighting):
    """No reweighting: the host's loss as computed (weight 1 in the model's own space)."""

    processes = _ANY_PROCESS

    def weight_for(self, snr, prediction_type):
        return torch.ones_like(snr)


@strategy_params
class SNRWeighting(LossWeighting):
    """SNR weighting, ``w_x0 = SNR``: plain epsilon-prediction MSE expressed for any model (Ho et al., 2020)."""

    processes = _ANY_PROCESS

    def weight_for(self, snr, prediction_type):
        if prediction_type == "epsilon":
            return torch.ones_like(snr)  # SNR / SNR, also in the SNR -> 0 limit
        return _in_prediction_space(snr, snr, prediction_type, 1.0)


@strategy_params
class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma, ``w_x0 = min(SNR, gamma)`` (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023).

    Model weights: x0 ``min(SNR, gamma)``, epsilon ``min(SNR, gamma) / SNR`` (= ``min(1, gamma / SNR)``,
    1 at SNR = 0), v ``min(SNR, gamma) / (SNR + 1)``. Paper default gamma 5.
    """

    processes = _ANY_PROCESS

    gamma: _Gamma = 5.0

    def weight_for(self, snr, prediction_type):
        if prediction_type == "epsilon":
            return torch.where(snr > self.gamma, self.gamma / snr.clamp_min(self.gamma), torch.ones_like(snr))
        return _in_prediction_space(snr.clamp(max=self.gamma), snr, prediction_type, 1.0)


@strategy_params
class MaxSNRWeighting(LossWeighting):
    """Max-SNR-gamma, ``w_x0 = max(SNR, gamma)`` (the truncated-SNR family; Salimans & Ho, 2022, use gamma 1).

    For epsilon models the weight ``max(SNR, gamma) / SNR`` grows without bound as SNR -> 0, so
    the SNR divided by is at least ``snr_floor``. The v weight ``max(SNR, gamma) / (SNR + 1)``
    (``gamma`` at SNR 0) and the x0 weight need no floor: ``snr_floor`` is refused with them.
    """

    processes = _ANY_PROCESS

    gamma: _Gamma = 1.0
    epsilon_only_parameters = ("snr_floor",)
    snr_floor: _Floor = 1e-3

    def weight_for(self, snr, prediction_type):
        return _in_prediction_space(snr.clamp(min=self.gamma), snr, prediction_type, self.snr_floor)


@strategy_params
class SoftMinSNRWeighting(LossWeighting):
    """Soft-min-SNR, ``w_x0 = SNR * gamma / (SNR + gamma)``: a smooth min-SNR (Crowson et al., "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass Diffusion Transformers", 2024).

    Model weights: x0 ``SNR gamma / (SNR + gamma)``, epsilon ``gamma / (SNR + gamma)``,
    v ``SNR gamma / ((SNR + gamma)(SNR + 1))``.
    """

    processes = _ANY_PROCESS

    gamma: _Gamma = 5.0

    def weight_for(self, snr, prediction_type):
        if prediction_type == "epsilon":
            return self.gamma / (snr + self.gamma)
        return _in_prediction_space(snr * self.gamma / (snr + self.gamma), snr, prediction_type, 1.0)


@strategy_params
class DebiasedWeighting(LossWeighting):
    """Debiased estimation, epsilon weight ``1 / sqrt(SNR)``, i.e. ``w_x0 = sqrt(SNR)`` (Yu et al., "Debias the Training of Diffusion Models", 2024).

    The same x0-space weight for every model: v ``sqrt(SNR) / (SNR + 1)``, x0 ``sqrt(SNR)``
    (kohya's v form, ``1 / (SNR + 1)``, is a different weighting). The epsilon weight diverges
    as SNR -> 0, so the SNR divided by is at least ``snr_floor``; the v and x0 weights are 0 at
    SNR 0 and need no floor (``snr_floor`` is refused with them).

    Against kohya's ``apply_debiased_estimation`` (epsilon): kohya caps SNR at 1000 first,
    ``1 / sqrt(min(SNR, 1000))``; sdplug applies the formula uncapped. On Stable Diffusion's
    schedule only t = 0 has SNR above 1000 (about 1175): there sdplug's weight is
    ``1 / sqrt(1175) = 0.0292``, kohya's ``1 / sqrt(1000) = 0.0316`` (8% more); at every other
    timestep the two agree.
    """

    processes = _ANY_PROCESS

    epsilon_only_parameters = ("snr_floor",)
    snr_floor: _Floor = 1e-3

    def weight_for(self, snr, prediction_type):
        if prediction_type == "epsilon":
            return snr.clamp_min(self.snr_floor).rsqrt()
        return _in_prediction_space(snr.sqrt(), snr, prediction_type, self.snr_floor)


@strategy_params
class P2Weighting(LossWeighting):
    """P2 weighting, epsilon weight ``1 / (k + SNR)**gamma`` (Choi et al., "Perception Prioritized Training of Diffusion Models", CVPR 2022).

    ``w_x0 = SNR / (k + SNR)**gamma``: v ``SNR / ((k + SNR)**gamma (SNR + 1))``, x0
    ``SNR / (k + SNR)**gamma``. Paper defaults k = 1, gamma = 1.
    """

    processes = _ANY_PROCESS

    k: Annotated[float, Field(gt=0.0, le=1e3)] = 1.0
    gamma: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0

    def weight_for(self, snr, prediction_type):
        base = (self.k + snr).pow(-self.gamma)
        if prediction_type == "epsilon":
            return base
        return _in_prediction_space(snr * base, snr, prediction_type, 1.0)


# kohya sd-scripts caps SNR at 1000 in these weightings (``get_snr_scale``: SNR(0) is huge or
# inf). The cap acts only at the first few timesteps (SD's SNR(0) is about 1175).
KOHYA_SNR_CAP = 1000.0


def _cap(snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = min(SNR, 1000)`` and ``SNR / S`` (1 below the cap, also at SNR = 0)."""
    capped = snr.clamp(max=KOHYA_SNR_CAP)
    return capped, torch.where(snr > KOHYA_SNR_CAP, snr / KOHYA_SNR_CAP, torch.ones_like(snr))


@strategy_params
class VPredLikeNoisePredWeighting(LossWeighting):
    """kohya's "scale v-prediction loss like noise prediction": the v loss times ``S / (S + 1)``, ``S = min(SNR, 1000)`` (sd-scripts ``--scale_v_pred_loss_like_noise_pred``).

    kohya's ``scale_v_prediction_loss_like_noise_prediction`` weights a v loss as an epsilon
    model's MSE is: ``w_x0 = (SNR + 1) S / (S + 1)``, which is ``SNR`` (the ``snr`` weighting)
    below the cap. Model weights: v ``S / (S + 1)`` (kohya's exactly), epsilon
    ``(SNR + 1) S / ((S + 1) SNR)`` (1 below the cap), x0 ``w_x0``. kohya multiplies by
    ``S / (S + 1)`` whatever the model predicts; the flag is meant for v models, where the two
    agree. OneTrainer, SimpleTuner, EveryDream2 and diffusers have no such option.
    """

    def weight_for(self, snr, prediction_type):
        capped, over = _cap(snr)
        if prediction_type == "v_prediction":
            return capped / (capped + 1.0)
        if prediction_type == "epsilon":
            return (snr + 1.0) / ((capped + 1.0) * over)
        return (snr + 1.0) * capped / (capped + 1.0)


@strategy_params
class VPredLikeLossWeighting(LossWeighting):
    """kohya's "v-prediction-like loss": ``strength`` times the v loss added to an epsilon loss (sd-scripts ``--v_pred_like_loss``).

    kohya's ``add_v_prediction_like_loss`` turns an epsilon loss ``L`` into
    ``L (1 + strength (S + 1) / S)``, ``S = min(SNR, 1000)``; ``L (SNR + 1) / SNR`` is the v loss
    of the same prediction. So ``w_x0 = SNR + strength (S + 1) SNR / S`` (``SNR + strength
    (SNR + 1)`` below the cap). Model weights: epsilon ``1 + strength (S + 1) / S`` (kohya's
    exactly; ``S`` at least ``snr_floor`` there, where kohya's divides by zero at a zero-terminal
    step), v ``w_x0 / (SNR + 1)`` (``SNR / (SNR + 1) + strength`` below the cap: kohya's result
    for a v model with ``--scale_v_pred_loss_like_noise_pred`` too), x0 ``w_x0``; both finite at
    SNR 0, so ``snr_floor`` is refused with them. kohya applies the epsilon formula to whatever
    the model predicts. OneTrainer, SimpleTuner, EveryDream2 and
    diffusers have no such option.
    """

    strength: Annotated[float, Field(gt=0.0, le=10.0)] = 0.1
    epsilon_only_parameters = ("snr_floor",)
    snr_floor: _Floor = 1e-3

    def weight_for(self, snr, prediction_type):
        capped, over = _cap(snr)
        if prediction_type == "epsilon":
            return 1.0 + self.strength * (capped + 1.0) / capped.clamp_min(self.snr_floor)
        w_x0 = snr + self.strength * (capped + 1.0) * over
        return w_x0 / (snr + 1.0) if prediction_type == "v_prediction" else w_x0


def _flow_sigma(snr: torch.Tensor) -> torch.Tensor:
    """A rectified flow's sigma from its SNR, ``((1 - s) / s)**2``: ``1 / (1 + sqrt(SNR))``."""
    return 1.0 / (1.0 + snr.sqrt())


_FLOW_ONLY: frozenset[str] = frozenset({"flow"})


@strategy_params
class SigmaSqrtWeighting(LossWeighting):
    """SD3's ``sigma_sqrt`` weighting, ``w_x0 = sigma**-2`` (diffusers' and kohya's ``compute_loss_weighting_for_sd3``).

    Both apply ``sigma**-2`` to the loss of the x0 the model's velocity implies (diffusers' SD3
    scripts with ``--precondition_outputs``, their default; kohya with ``--model_prediction_type
    sigma_scaled``, without which kohya ignores the weighting). On that x0 error it is exactly
    the plain velocity MSE: on velocity, ``sigma**-2 * sigma**2 = 1``. diffusers' FLUX scripts
    (no preconditioning) apply ``sigma**-2`` to the velocity loss itself, which is ``w_x0 =
    sigma**-4``: a different weighting, not this one. Rectified flow only.
    """

    processes = _FLOW_ONLY

    def weight_for(self, snr, prediction_type):
        if prediction_type in ("velocity", "velocity_reversed"):
            return torch.ones_like(snr)  # sigma**-2 * sigma**2, without the rounding
        return _flow_sigma(snr) ** -2.0


@strategy_params
class CosMapWeighting(LossWeighting):
    """SD3's ``cosmap`` weighting, ``w_x0 = 2 / (pi (1 - 2 sigma + 2 sigma**2))`` (Esser et al., "Scaling Rectified Flow Transformers", 2024, eq. 21's density as a weight; diffusers' and kohya's ``compute_loss_weighting_for_sd3``).

    The density of cosmap timestep sampling (``timesteps 'cosmap'``), applied as a weight
    instead of a sampling law; as with ``sigma_sqrt``, diffusers and kohya apply it to the x0
    error (kohya only with ``--model_prediction_type sigma_scaled``). On velocity:
    ``2 sigma**2 / (pi (1 - 2 sigma + 2 sigma**2))``, rising from 0 at no noise to ``2 / pi`` at
    sigma = 1. Rectified flow only.
    """

    processes = _FLOW_ONLY

    def weight_for(self, snr, prediction_type):
        sigma = _flow_sigma(snr)
        w_x0 = 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
        return _in_prediction_space(w_x0, snr, prediction_type, 1.0)
