"""The strategy families: one row each, read by the registries, presets, checks and the audit.

Adding a family is one row here (with its built-in strategies), its base class in
``sdplug.strategies.base``, and its field on ``Preset`` (a typed attribute hosts read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import sdplug.strategies.attention as attention
import sdplug.strategies.caption as caption
import sdplug.strategies.fields as fields
import sdplug.strategies.generalized_offset as generalized_offset
import sdplug.strategies.learned as learned
import sdplug.strategies.loss as loss
import sdplug.strategies.loss_weighting as loss_weighting
import sdplug.strategies.noise as noise
import sdplug.strategies.optimizer as optimizer
import sdplug.strategies.optimizer_torchao as optimizer_torchao
import sdplug.strategies.optimizers_extra as optimizers_extra
import sdplug.strategies.pyramid as pyramid
import sdplug.strategies.timestep_distributions as timestep_distributions
import sdplug.strategies.timesteps as timesteps
from sdplug.strategies.base import (
    AttentionStrategy,
    CaptionTransform,
    LossType,
    LossWeighting,
    NoiseStrategy,
    OptimizerStrategy,
    Strategy,
    TimestepStrategy,
)


@dataclasses.dataclass(frozen=True)
class Family:
    """One strategy family: its name (also its entry-point group ``sdplug.<name>``), the class
    every strategy of it subclasses, whether a preset lists many of them in order (``[[noise]]``)
    or names one (``[timesteps]``), the preset section (and ``Preset`` field) that holds them, and
    its built-in strategies by registered name."""

    name: str
    base: type[Strategy]
    many: bool
    section: str
    builtins: Mapping[str, type[Strategy]]


FAMILY_TABLE: tuple[Family, ...] = (
    Family(
        "noise",
        NoiseStrategy,
        many=True,
        section="noise",
        builtins={
            "gaussian": noise.GaussianNoise,
            "offset": noise.OffsetNoise,
            "generalized_offset": generalized_offset.GeneralizedOffsetNoise,
            "pyramid": pyramid.PyramidNoise,
            "perlin": fields.PerlinNoise,
            "pink": fields.PinkNoise,
            "input_perturbation": noise.InputPerturbation,
            "immiscible": noise.ImmiscibleNoise,
        },
    ),
    Family(
        "timesteps",
        TimestepStrategy,
        many=False,
        section="timesteps",
        builtins={
            "uniform": timesteps.UniformTimesteps,
            "logit_normal": timesteps.LogitNormalTimesteps,
            "biased": timesteps.BiasedTimesteps,
            "stratified": timesteps.StratifiedTimesteps,
            "beta": timestep_distributions.BetaTimesteps,
            "cosmap": timestep_distributions.CosMapTimesteps,
            "mode": timestep_distributions.ModeTimesteps,
            "heavy_tail": timestep_distributions.HeavyTailTimesteps,
        },
    ),
    Family(
        "loss",
        LossType,
        many=False,
        section="loss",
        builtins={
            "mse": loss.MSELoss,
            "l1": loss.L1Loss,
            "huber": loss.HuberLoss,
            "pseudo_huber": loss.PseudoHuberLoss,
            "smooth_l1": loss.SmoothL1Loss,
        },
    ),
    Family(
        "loss_weighting",
        LossWeighting,
        many=False,
        section="loss_weighting",
        builtins={
            "constant": loss_weighting.ConstantWeighting,
            "snr": loss_weighting.SNRWeighting,
            "min_snr": loss_weighting.MinSNRWeighting,
            "max_snr": loss_weighting.MaxSNRWeighting,
            "soft_min_snr": loss_weighting.SoftMinSNRWeighting,
            "debiased": loss_weighting.DebiasedWeighting,
            "p2": loss_weighting.P2Weighting,
            "scale_v_pred_loss_like_noise_pred": loss_weighting.VPredLikeNoisePredWeighting,
            "v_pred_like_loss": loss_weighting.VPredLikeLossWeighting,
            "sigma_sqrt": loss_weighting.SigmaSqrtWeighting,
            "cosmap": loss_weighting.CosMapWeighting,
            "learned": learned.LearnedWeighting,
        },
    ),
    Family(
        "caption",
        CaptionTransform,
        many=True,
        section="caption",
        builtins={
            "dropout": caption.CaptionDropout,
            "tag_dropout": caption.TagDropout,
            "shuffle": caption.TagShuffle,
        },
    ),
    Family(
        "optimizer",
        OptimizerStrategy,
        many=False,
        section="optimizer",
        builtins={
            "adamw": optimizer.AdamW,
            "adamw8bit": optimizer.AdamW8bit,
            "paged_adamw8bit": optimizer.PagedAdamW8bit,
            "lion8bit": optimizer.Lion8bit,
            "adafactor": optimizer.Adafactor,
            "prodigy": optimizers_extra.Prodigy,
            "dadapt_adam": optimizers_extra.DAdaptAdam,
            "adamw_schedulefree": optimizers_extra.AdamWScheduleFree,
            "came": optimizers_extra.CAME,
            "ademamix8bit": optimizers_extra.AdEMAMix8bit,
            "torchao_adamw8bit": optimizer_torchao.TorchaoAdamW8bit,
        },
    ),
    Family(
        "attention",
        AttentionStrategy,
        many=False,
        section="attention",
        builtins={
            "sdpa": attention.SDPAAttention,
            "xformers": attention.XFormersAttention,
            "sliced": attention.SlicedAttention,
            "default": attention.DefaultAttention,
        },
    ),
)

FAMILIES: tuple[str, ...] = tuple(family.name for family in FAMILY_TABLE)

# The order a preset file, its validation messages and ``audit.json`` list them in: the lists first.
IN_PRESET_ORDER: tuple[Family, ...] = (
    *(family for family in FAMILY_TABLE if family.many),
    *(family for family in FAMILY_TABLE if not family.many),
)
