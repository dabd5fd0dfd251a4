"""The plan: a preset bound to one model's diffusion process (``binding``), called by every
host at the same moments of a step (``plan``), with its audit and the one writer of it."""

from sdplug.plan.binding import bind
from sdplug.plan.pipelines import CaptionDraw, CaptionPipeline, NoiseDraw, NoisePipeline
from sdplug.plan.plan import Plan

__all__ = ["CaptionDraw", "CaptionPipeline", "NoiseDraw", "NoisePipeline", "Plan", "bind"]
