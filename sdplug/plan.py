"""The plan: a preset's strategies bound to one model's schedule, called by every host.

Hosts call the same few methods at the same moments of a training step (see
docs/architecture.md): ``caption`` when a sample is loaded, ``noise`` / ``timesteps`` /
``noisy_input`` / ``target`` before the forward pass, ``weight`` on the per-sample loss,
``optimizer`` and ``attention`` once at set-up. So a preset behaves the same in every host.
"""

from __future__ import annotations

import dataclasses
import random
import warnings

import torch

from sdplug.audit import Audit
from sdplug.errors import MissingDependencyError, PresetError, SdplugError
from sdplug.presets import Preset, check_against_schedule
from sdplug.schedule import check_prediction_type
from sdplug.strategies.base import CaptionTransform, LossWeighting, NoiseStrategy, TimestepStrategy
from sdplug.strategies.timesteps import UniformTimesteps

_UNIFORM = UniformTimesteps()


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """The noise of one step: ``target`` enters the loss, ``model_input`` builds ``x_t``.

    They differ only when an input-only strategy (input perturbation) is in the noise list.
    """

    target: torch.Tensor
    model_input: torch.Tensor


@dataclasses.dataclass(frozen=True)
class CaptionDraw:
    """A caption after the transforms, whether a dropout emptied it, and what each tag
    dropout did (``(index in the caption list, TagCount)``, for the audit)."""

    text: str
    dropped: bool
    tag_counts: tuple = ()


class NoisePipeline:
    """Noise strategies composed in the order written; input-only ones act on a copy."""

    def __init__(self, strategies: list[NoiseStrategy]):
        self.strategies = list(strategies)

    def __call__(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoiseDraw:
        noise = None
        for strategy in self.strategies:
            if strategy.role == "target":
                noise = strategy.transform(noise, latents, generator)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        model_input = noise
        for strategy in self.strategies:  # presets list input-only strategies last
            if strategy.role == "input":
                model_input = strategy.transform(model_input, latents, generator)
        return NoiseDraw(target=noise, model_input=model_input)


class CaptionPipeline:
    """Caption transforms in the order written, with each sample's dropout decision exposed."""

    def __init__(self, transforms: list[CaptionTransform]):
        self.transforms = list(transforms)

    def __call__(self, caption: str, *, epoch: int = 0, rng: random.Random | None = None) -> CaptionDraw:
        rng = rng if rng is not None else random.Random()
        dropped = False
        counts = []
        for index, transform in enumerate(self.transforms):
            decide = getattr(transform, "decide", None)
            if decide is not None:
                if decide(epoch=epoch, rng=rng):
                    dropped = True
                    caption = ""
            else:
                before, caption = caption, transform(caption, epoch=epoch, rng=rng)
                if hasattr(transform, "count"):
                    counts.append((index, transform.count(before, caption)))
        return CaptionDraw(caption, dropped, tuple(counts))

    def drop_probability(self, epoch: int = 0) -> float:
        """The chance that some dropout in the pipeline empties a caption in ``epoch``."""
        keep = 1.0
        for transform in self.transforms:
            if hasattr(transform, "drop_probability"):
                keep *= 1.0 - transform.drop_probability(epoch)
        return 1.0 - keep

    def dropped(self, *, epoch: int = 0, rng: random.Random | None = None) -> bool:
        """The dropout decision alone, for hosts with cached text-encoder outputs.

        Draws from ``rng`` exactly as ``__call__`` does for the same transforms, which must
        all be dropouts here (presets refuse text transforms under caching).
        """
        rng = rng if rng is not None else random.Random()
        dropped = False
        for transform in self.transforms:
            if transform.needs_text:
                raise MissingDependencyError(
                    f"caption transform {type(transform).__name__} needs caption text, which cached "
                    "text-encoder outputs do not have."
                )
            dropped = transform.decide(epoch=epoch, rng=rng) or dropped
        return dropped


def check_memory_runs_here(preset: Preset) -> None:
    """``[memory]`` settings this machine cannot run, refused before anything loads. Hosts that
    apply ``[memory]`` (the reference trainer, kohya) call it; a loop of one's own sets its own
    precision. (Optimizer and attention strategies are checked by ``Plan`` itself.)"""
    if preset.memory.mixed_precision == "fp16" and not torch.cuda.is_available():
        # fp16 autocast on a CPU runs, at a crawl (a convolution ~300x slower than fp32)
        raise SdplugError(
            f"{preset.path}: memory.mixed_precision = 'fp16' needs a CUDA GPU and this machine has none. "
            "Allowed here: 'bf16' or 'no' (write a preset that extends this one and sets it)."
        )


class Plan:
    """A preset's strategies, built and bound to a noise schedule and prediction type."""

    def __init__(self, preset: Preset, *, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.preset = preset
        self.prediction_type = check_prediction_type(prediction_type)
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32).cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        check_against_schedule(preset, self.num_train_timesteps)  # file and key, before any training
        self.noise_pipeline = NoisePipeline([spec.create() for spec in preset.noise])
        self.caption_pipeline = CaptionPipeline([spec.create() for spec in preset.caption])
        self.timestep_sampler: TimestepStrategy | None = preset.timesteps.create() if preset.timesteps else None
        self.loss_weighting: LossWeighting | None = preset.loss_weighting.create() if preset.loss_weighting else None
        self.optimizer_fell_back = False
        self.optimizer_strategy = self._choose_optimizer()
        self.attention_strategy = preset.attention.create() if preset.attention else None
        if self.attention_strategy is not None:
            self.attention_strategy.check_available()
        self.audit = Audit(
            {
                "noise": [s.type for s in preset.noise],
                "caption": [s.type for s in preset.caption],
                "timesteps": [preset.timesteps.type] if preset.timesteps else [],
                "loss_weighting": [preset.loss_weighting.type] if preset.loss_weighting else [],
            },
            self.num_train_timesteps,
            tag_dropout_rates={i: s.create().rate for i, s in enumerate(preset.caption) if s.type == "tag_dropout"},
        )

    def noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoiseDraw:
        """The step's noise: ``target`` for the loss, ``model_input`` for ``x_t``."""
        draw = self.noise_pipeline(latents, generator)
        self.audit.record_noise(draw.target, draw.model_input)
        return draw

    def caption(self, caption: str, *, epoch: int = 0, rng: random.Random | None = None) -> CaptionDraw:
        """One caption through the transforms (call once per sample, when it is loaded)."""
        draw = self.caption_pipeline(caption, epoch=epoch, rng=rng)
        if self.caption_pipeline.transforms:
            self.audit.record_caption(
                dropped=draw.dropped,
                drop_probability=self.caption_pipeline.drop_probability(epoch),
                tag_counts=draw.tag_counts,
            )
        return draw

    def caption_dropped(self, *, epoch: int = 0, rng: random.Random | None = None) -> bool:
        """The dropout decision alone, for hosts with cached text-encoder outputs: when True,
        the host substitutes the empty caption's embedding."""
        dropped = self.caption_pipeline.dropped(epoch=epoch, rng=rng)
        if self.caption_pipeline.transforms:
            self.audit.record_caption(
                dropped=dropped, drop_probability=self.caption_pipeline.drop_probability(epoch), substituted=dropped
            )
        return dropped

    def _choose_optimizer(self):
        if self.preset.optimizer is None:
            return None
        primary = self.preset.optimizer.create()
        try:
            primary.check_available()
            return primary
        except MissingDependencyError as exc:
            if self.preset.optimizer_fallback is None:
                raise
            fallback = self.preset.optimizer_fallback.create()
            fallback.check_available()
            warnings.warn(
                f"optimizer {self.preset.optimizer.type!r} cannot run here ({exc}); using the preset's "
                f"fallback {self.preset.optimizer_fallback.type!r} as it names in optimizer.fallback.",
                stacklevel=2,
            )
            self.optimizer_fell_back = True
            return fallback

    def timesteps(self, batch_size: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """One timestep per sample (uniform over the schedule when the preset names none)."""
        sampler = self.timestep_sampler or _UNIFORM
        t = sampler(batch_size, self.num_train_timesteps, generator=generator, device=device)
        self.audit.record_timesteps(t)
        return t

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype)
        shape = (-1, *([1] * (like.dim() - 1)))
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def noisy_input(self, latents: torch.Tensor, noise: NoiseDraw, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from the model-input noise (input perturbation acts here, never on the target)."""
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise.model_input

    def target(self, latents: torch.Tensor, noise: NoiseDraw, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should predict, from the clean target noise."""
        if self.prediction_type == "epsilon":
            return noise.target
        if self.prediction_type == "sample":
            return latents
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * noise.target - sigma * latents

    def weight(self, loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss in, weighted per-sample loss out."""
        if self.loss_weighting is None:
            return loss
        self.audit.record_weights(timesteps, self.loss_weighting.weights(timesteps, self.alphas_cumprod, self.prediction_type))
        return self.loss_weighting.apply(loss, timesteps, self.alphas_cumprod, self.prediction_type)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Plan:
        """Move every tensor a strategy holds (a learned weighting's parameters and buffers) in
        place, so optimizer references stay valid. Hosts call this once, before building the
        optimizer, with the training device."""
        if self.loss_weighting is not None:
            self.loss_weighting.to(device=device, dtype=dtype)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of learned strategies, which the host's optimizer must also train."""
        return self.loss_weighting.parameters() if self.loss_weighting is not None else []

    def optimizer(self, params, default_factory=None) -> torch.optim.Optimizer:
        if self.optimizer_strategy is None:
            if default_factory is None:
                raise ValueError("the preset names no optimizer and the host gave no default")
            return default_factory(params)
        return self.optimizer_strategy.build(params)

    def attention(self, model: torch.nn.Module) -> int:
        """Install the preset's attention in ``model``; the number of modules changed."""
        if self.attention_strategy is None:
            return 0
        try:
            return self.attention_strategy.apply(model)
        except PresetError as exc:
            if exc.path is not None:
                raise
            # a parameter that only the model can judge (sliced slice_size against its heads):
            # the strategy knows the key, the plan knows the file
            raise PresetError(exc.problem, path=self.preset.attention.path or self.preset.path, key=exc.key) from None
