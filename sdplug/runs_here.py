"""What a preset asks for that this machine must be able to run, checked before training.

Each refusal names the preset file and key. ``choose_optimizer`` and ``choose_attention`` are
what ``Plan`` builds with (an 8-bit optimizer is tried with a real step on the training
device; a named ``optimizer.fallback`` is taken, with a warning, only when the choice cannot
run); ``check_memory_runs_here`` is for the hosts that apply ``[memory]``.
"""

from __future__ import annotations

import warnings

import torch

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.presets import Preset
from sdplug.strategies.base import AttentionStrategy, OptimizerStrategy


def _cannot_run(preset: Preset, exc: MissingDependencyError, key: str) -> MissingDependencyError:
    """The same error, naming the preset file and key that asked for what cannot run here."""
    return MissingDependencyError(f"{preset.path}: {key}: {exc}")


def choose_optimizer(preset: Preset) -> tuple[OptimizerStrategy | None, bool]:
    """The optimizer strategy to build, and whether it is the preset's fallback."""
    if preset.optimizer is None:
        return None, False
    primary = preset.optimizer.create()
    try:
        primary.check_available()
        return primary, False
    except MissingDependencyError as exc:
        if preset.optimizer_fallback is None:
            raise _cannot_run(preset, exc, "optimizer.type") from exc
        fallback = preset.optimizer_fallback.create()
        try:
            fallback.check_available()
        except MissingDependencyError as fallback_exc:
            raise _cannot_run(preset, fallback_exc, "optimizer.fallback") from fallback_exc
        left = sorted(set(preset.optimizer.params) - set(preset.optimizer_fallback.params))
        warnings.warn(
            f"optimizer {preset.optimizer.type!r} cannot run here ({exc}); using the preset's "
            f"fallback {preset.optimizer_fallback.type!r} as it names in optimizer.fallback"
            + (f" (without {', '.join(left)}, which only {preset.optimizer.type!r} takes)." if left else "."),
            stacklevel=3,
        )
        return fallback, True


def choose_attention(preset: Preset) -> AttentionStrategy | None:
    if preset.attention is None:
        return None
    strategy = preset.attention.create()
    try:
        strategy.check_available()
    except MissingDependencyError as exc:
        raise _cannot_run(preset, exc, "attention.type") from exc
    return strategy


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
