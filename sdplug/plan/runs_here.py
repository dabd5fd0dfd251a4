"""What a preset asks for that this machine must be able to run, checked before training.

Each refusal names the preset file and key (``cannot_run``): the plan's optimizer and attention
(``sdplug.plan.optimizer``, ``sdplug.plan.attention``) are checked when a plan is bound;
``check_memory_runs_here`` is for the hosts that apply ``[memory]``.
"""

from __future__ import annotations

import torch

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.preset import Preset


def cannot_run(preset: Preset, exc: MissingDependencyError, key: str) -> MissingDependencyError:
    """The same error, naming the preset file and key that asked for what cannot run here."""
    return MissingDependencyError(f"{preset.path}: {key}: {exc}")


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
