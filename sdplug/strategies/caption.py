"""Caption transforms: dropout for classifier-free guidance, tag dropout, tag shuffling.

Source: classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022)
needs the model trained without its caption some of the time.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Annotated

from pydantic import Field

from sdplug.params import strategy_params
from sdplug.strategies.base import CaptionTransform

_Rate = Annotated[float, Field(ge=0.0, le=1.0)]
_Keep = Annotated[int, Field(ge=0, le=1000)]
_Separator = Annotated[str, Field(min_length=1, max_length=8)]


def _rng(rng: random.Random | None) -> random.Random:
    return rng if rng is not None else random.Random()


def split_tags(caption: str, separator: str) -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def join_tags(tags: list[str], separator: str) -> str:
    return (separator if separator[-1].isspace() else separator + " ").join(tags)


@strategy_params
class CaptionDropout(CaptionTransform):
    """Caption dropout: the empty caption with probability ``rate`` (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).

    ``rate`` 0.1 is the usual default (Imagen). ``every_n_epochs`` > 0 also drops every caption
    in every N-th epoch (epochs counted from 0: epochs N-1, 2N-1, ...), as kohya's
    ``--caption_dropout_every_n_epochs``. ``decide`` gives the per-sample decision alone, so a
    host with cached text-encoder outputs can substitute the empty caption's embedding.

    ``encoders`` names the text encoders whose output this dropout replaces by the empty
    caption's (a model with several: SD3's ``clip_l``, ``clip_g``, ``t5``; kohya's
    ``--clip_l_dropout_rate`` and its kin); the caption text itself stays, for the others. Empty
    (the default): every encoder, the caption dropped whole. One table per encoder gives
    independent decisions, as SD3's per-encoder dropout; one table naming several drops them together.
    """

    needs_text = False
    rate: _Rate = 0.1
    every_n_epochs: _Keep = 0
    encoders: Annotated[list[Annotated[str, Field(min_length=1, max_length=32)]], Field(max_length=8)] = Field(
        default_factory=list
    )

    def dropped_encoders(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    def drop_probability(self, epoch: int = 0) -> float:
        """The chance ``decide`` returns True in ``epoch``."""
        return 1.0 if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0 else self.rate

    def decide(self, *, epoch: int = 0, rng: random.Random | None = None) -> bool:
        """True when this sample's caption is dropped. Draws exactly one number from ``rng``."""
        drawn = _rng(rng).random()
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            return True
        return drawn < self.rate

    def __call__(self, caption, *, epoch=0, rng=None):
        return "" if self.decide(epoch=epoch, rng=rng) else caption


@strategy_params
class TagDropout(CaptionTransform):
    """Tag dropout: drops each tag with probability ``rate``, keeping the first ``keep_tokens`` (kohya's ``--caption_tag_dropout_rate``)."""

    rate: _Rate = 0.1
    keep_tokens: _Keep = 0
    separator: _Separator = ","

    def __call__(self, caption, *, epoch=0, rng=None):
        rng = _rng(rng)
        tags = split_tags(caption, self.separator)
        kept = tags[: self.keep_tokens] + [t for t in tags[self.keep_tokens :] if rng.random() >= self.rate]
        return join_tags(kept, self.separator)

    def count(self, before: str, after: str) -> TagCount:
        """What one call did, measured from its input and output (for the audit)."""
        tags_in, tags_out = split_tags(before, self.separator), split_tags(after, self.separator)
        head = tags_in[: self.keep_tokens]
        return TagCount(
            droppable=len(tags_in) - len(head),
            dropped=len(tags_in) - len(tags_out),
            kept_head=tags_out[: len(head)] == head,
        )


@dataclasses.dataclass(frozen=True)
class TagCount:
    """One tag-dropout call: tags it could drop, tags it dropped, whether the kept head survived."""

    droppable: int
    dropped: int
    kept_head: bool


@strategy_params
class TagShuffle(CaptionTransform):
    """Tag shuffling: shuffles tags after the first ``keep_tokens`` (kohya's ``--shuffle_caption`` with ``--keep_tokens``)."""

    keep_tokens: _Keep = 0
    separator: _Separator = ","

    def __call__(self, caption, *, epoch=0, rng=None):
        tags = split_tags(caption, self.separator)
        head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
        _rng(rng).shuffle(tail)
        return join_tags(head + tail, self.separator)
