"""The seven strategy registries and their built-in strategies.

Families: noise, timesteps, loss, loss_weighting, caption, optimizer, attention. Third-party
packages add strategies through the entry-point group ``sdplug.<family>``.
"""

from __future__ import annotations

from typing import Any

from sdplug.errors import UnknownStrategyError
from sdplug.registry import Registry
from sdplug.strategies import (
    attention,
    caption,
    fields,
    generalized_offset,
    learned,
    loss,
    loss_weighting,
    noise,
    optimizer,
    optimizer_torchao,
    optimizers_extra,
    pyramid,
    timestep_distributions,
    timesteps,
)
from sdplug.strategies.base import (
    AttentionStrategy,
    CaptionTransform,
    LossType,
    LossWeighting,
    NoiseStrategy,
    OptimizerStrategy,
    TimestepStrategy,
)

FAMILY_BASES = {
    "noise": NoiseStrategy,
    "timesteps": TimestepStrategy,
    "loss": LossType,
    "loss_weighting": LossWeighting,
    "caption": CaptionTransform,
    "optimizer": OptimizerStrategy,
    "attention": AttentionStrategy,
}

BUILTINS: dict[str, dict[str, type]] = {
    "noise": {
        "gaussian": noise.GaussianNoise,
        "offset": noise.OffsetNoise,
        "generalized_offset": generalized_offset.GeneralizedOffsetNoise,
        "pyramid": pyramid.PyramidNoise,
        "perlin": fields.PerlinNoise,
        "pink": fields.PinkNoise,
        "input_perturbation": noise.InputPerturbation,
        "immiscible": noise.ImmiscibleNoise,
    },
    "timesteps": {
        "uniform": timesteps.UniformTimesteps,
        "logit_normal": timesteps.LogitNormalTimesteps,
        "biased": timesteps.BiasedTimesteps,
        "stratified": timesteps.StratifiedTimesteps,
        "beta": timestep_distributions.BetaTimesteps,
        "cosmap": timestep_distributions.CosMapTimesteps,
        "mode": timestep_distributions.ModeTimesteps,
        "heavy_tail": timestep_distributions.HeavyTailTimesteps,
    },
    "loss": {
        "mse": loss.MSELoss,
        "l1": loss.L1Loss,
        "huber": loss.HuberLoss,
        "pseudo_huber": loss.PseudoHuberLoss,
        "smooth_l1": loss.SmoothL1Loss,
    },
    "loss_weighting": {
        "constant": loss_weighting.ConstantWeighting,
        "snr": loss_weighting.SNRWeighting,
        "min_snr": loss_weighting.MinSNRWeighting,
        "max_snr": loss_weighting.MaxSNRWeighting,
        "soft_min_snr": loss_weighting.SoftMinSNRWeighting,
        "debiased": loss_weighting.DebiasedWeighting,
        "p2": loss_weighting.P2Weighting,
        "scale_v_pred_loss_like_noise_pred": loss_weighting.VPredLikeNoisePredWeighting,
        "v_pred_like_loss": loss_weighting.VPredLikeLossWeighting,
        "learned": learned.LearnedWeighting,
    },
    "caption": {
        "dropout": caption.CaptionDropout,
        "tag_dropout": caption.TagDropout,
        "shuffle": caption.TagShuffle,
    },
    "optimizer": {
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
    "attention": {
        "sdpa": attention.SDPAAttention,
        "xformers": attention.XFormersAttention,
        "sliced": attention.SlicedAttention,
        "default": attention.DefaultAttention,
    },
}

FAMILIES = tuple(FAMILY_BASES)


def build_registries(**registry_options: Any) -> dict[str, Registry]:
    """Fresh registries holding the built-ins (tests inject fake entry points through options)."""
    registries = {}
    for family, base in FAMILY_BASES.items():
        registry = Registry(family, base, **registry_options)
        for name, cls in BUILTINS[family].items():
            registry.register(name, cls)
        registries[family] = registry
    return registries


REGISTRIES = build_registries()


def registry(family: str) -> Registry:
    """The registry of ``family``; an unknown family lists the known ones."""
    try:
        return REGISTRIES[family]
    except KeyError:
        raise UnknownStrategyError("families", family, FAMILIES) from None
