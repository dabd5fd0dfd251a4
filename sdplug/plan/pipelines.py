"""The noise and caption pipelines a plan runs: strategies composed in the order written."""

from __future__ import annotations

import dataclasses
import random

import torch

from sdplug.errors import MissingDependencyError, PresetError
from sdplug.strategies.base import CaptionTransform, NoiseStrategy


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """The noise of one step: ``target`` enters the loss, ``model_input`` builds ``x_t``.

    They differ only when an input-only strategy (input perturbation) is in the noise list.
    """

    target: torch.Tensor
    model_input: torch.Tensor


class CaptionDraw(str):
    """A caption after the transforms: the text itself (a ``str``, so hosts use it as one),
    with ``dropped`` (a dropout emptied it), ``dropped_encoders`` (the text encoders whose
    output a dropout naming them replaces by the empty caption's, the text staying for the
    others) and ``tag_counts`` (what each tag dropout did, ``(index in the caption list,
    TagCount)``, for the audit)."""

    dropped: bool
    dropped_encoders: frozenset[str]
    tag_counts: tuple

    def __new__(
        cls, text: str, dropped: bool = False, tag_counts: tuple = (), dropped_encoders: frozenset[str] = frozenset()
    ) -> CaptionDraw:
        draw = super().__new__(cls, text)
        draw.dropped, draw.tag_counts, draw.dropped_encoders = dropped, tag_counts, dropped_encoders
        return draw

    @property
    def text(self) -> str:
        return str(self)


class NoisePipeline:
    """Noise strategies composed in the order written; input-only ones act on a copy."""

    def __init__(self, strategies: list[NoiseStrategy], alphas_cumprod: torch.Tensor | None = None):
        self.strategies = list(strategies)
        self.alphas_cumprod = alphas_cumprod  # the plan's schedule, for time-dependent strategies
        self._current = 0  # the strategy drawing now: a refusal names its table of the preset
        for strategy in self.strategies:  # their tables of the schedule, before any step (no sync inside one)
            if strategy.uses_timesteps and alphas_cumprod is not None:
                strategy.prepare(alphas_cumprod)

    @property
    def timestep_strategies(self) -> list[str]:
        """The strategies that scale by each sample's timestep (``uses_timesteps``)."""
        return [type(strategy).__name__ for strategy in self.strategies if strategy.uses_timesteps]

    def __call__(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        host_rng: random.Random | None = None,
        *,
        timesteps: torch.Tensor | None = None,
    ) -> NoiseDraw:
        try:
            return self._draw(latents, generator, host_rng, timesteps)
        except PresetError as exc:
            exc.strategy_index = self._current  # type: ignore[attr-defined]  # which table of the preset
            raise

    def _draw(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None,
        host_rng: random.Random | None,
        timesteps: torch.Tensor | None,
    ) -> NoiseDraw:
        noise = None
        for index, strategy in enumerate(self.strategies):
            self._current = index
            if strategy.role == "target" and strategy.uses_timesteps:
                noise = strategy.transform(  # type: ignore[call-arg]
                    noise, latents, generator, timesteps=timesteps, alphas_cumprod=self.alphas_cumprod
                )
            elif strategy.role == "target" and strategy.uses_host_rng and host_rng is not None:
                noise = strategy.transform(noise, latents, generator, host_rng=host_rng)  # type: ignore[call-arg]
            elif strategy.role == "target":
                noise = strategy.transform(noise, latents, generator)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        model_input = noise
        for index, strategy in enumerate(self.strategies):  # presets list input-only strategies last
            self._current = index
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
        encoders: set[str] = set()
        counts = []
        for index, transform in enumerate(self.transforms):
            if not transform.needs_text:  # a drop decision (CaptionTransform.needs_text)
                named = _encoders(transform)
                if transform.decide(epoch=epoch, rng=rng):
                    if named:
                        encoders.update(named)
                    else:
                        dropped = True
                        caption = ""
            else:
                before, caption = caption, transform(caption, epoch=epoch, rng=rng)
                count = transform.count(before, caption)
                if count is not None:
                    counts.append((index, count))
        return CaptionDraw(caption, dropped, tuple(counts), frozenset(encoders))

    def named_encoders(self) -> set[str]:
        """The text encoders the dropouts name (their own tables; none drop the caption whole)."""
        return {name for transform in self.transforms if not transform.needs_text for name in _encoders(transform)}

    def encoder_drop_probability(self, encoder: str, epoch: int = 0) -> float:
        """The chance that a dropout naming ``encoder`` replaces its output in ``epoch``."""
        chances = [t.drop_probability(epoch) for t in self.transforms if not t.needs_text and encoder in _encoders(t)]
        if len(chances) == 1:
            return chances[0]  # exactly the configured rate (1 - (1 - 0.3) is 0.30000000000000004)
        keep = 1.0
        for chance in chances:
            keep *= 1.0 - chance
        return 1.0 - keep

    def drop_probability(self, epoch: int = 0) -> float:
        """The chance that some dropout in the pipeline empties a caption in ``epoch`` (whole:
        the dropouts that name no encoder)."""
        chances = [t.drop_probability(epoch) for t in self.transforms if not t.needs_text and not _encoders(t)]
        if not chances:
            return 0.0
        if len(chances) == 1:
            return chances[0]  # exactly the configured rate (1 - (1 - 0.1) is 0.09999999999999998)
        keep = 1.0
        for chance in chances:
            keep *= 1.0 - chance
        return 1.0 - keep

    def dropped(self, *, epoch: int = 0, rng: random.Random | None = None) -> tuple[bool, frozenset[str]]:
        """The dropout decisions alone, for hosts with cached text-encoder outputs: whether the
        caption is dropped whole, and the encoders that dropouts naming them drop.

        Draws from ``rng`` exactly as ``__call__`` does for the same transforms, which must
        all be dropouts here (presets refuse text transforms under caching).
        """
        rng = rng if rng is not None else random.Random()
        dropped = False
        encoders: set[str] = set()
        for transform in self.transforms:
            if transform.needs_text:
                raise MissingDependencyError(
                    f"caption transform {type(transform).__name__} needs caption text, which cached "
                    "text-encoder outputs do not have."
                )
            if transform.decide(epoch=epoch, rng=rng):
                named = _encoders(transform)
                encoders.update(named)
                dropped = dropped or not named
        return dropped, frozenset(encoders)


def _encoders(transform: CaptionTransform) -> tuple[str, ...]:
    """The text encoders a dropout names (none: the whole caption)."""
    return transform.dropped_encoders()
