"""Checks of a resolved preset beyond each table's own validation: rules across its tables,
and, when it is bound to a noise schedule, parameters against the schedule's length."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from sdplug.errors import PresetError
from sdplug.strategies import registry
from sdplug.strategies.base import CaptionTransform, NoiseStrategy

if TYPE_CHECKING:
    import torch

    from sdplug.presets import Preset


def check_against_schedule(preset: Preset, num_train_timesteps: int, alphas_cumprod: torch.Tensor | None = None) -> None:
    """Refuse, when the preset is bound to a noise schedule, parameters that do not fit its length.

    Validation cannot know the schedule (``max_timestep = 5000`` is fine for a 10,000-step one),
    so strategies whose parameters are timesteps define ``schedule_problem(num_train_timesteps)``,
    returning ``(parameter, sentence)`` or None; those that need the schedule's values define
    ``alphas_problem(alphas_cumprod)``. The error names the file and key the table came from (a
    parent's file, when inherited), before anything is trained.
    """
    specs = [*preset.noise, *preset.caption, preset.timesteps, preset.loss_weighting]
    for spec in specs:
        if spec is None:
            continue
        cls = registry(spec.family).get(spec.type).cls
        problem = spec.create().schedule_problem(num_train_timesteps) if hasattr(cls, "schedule_problem") else None
        if problem is None and alphas_cumprod is not None and hasattr(cls, "alphas_problem"):
            problem = spec.create().alphas_problem(alphas_cumprod)
        if problem is not None:
            parameter, sentence = problem
            raise PresetError(sentence, path=spec.path, key=f"{spec.key}.{parameter}" if spec.key else parameter)


def check_consistency(preset: Preset, path: str) -> None:
    """Rules across tables of one preset: input-only noise last; no text transforms with cached text outputs."""
    seen_input = None
    for i, spec in enumerate(preset.noise):
        # the noise registry holds NoiseStrategy subclasses only (Registry._check_fits)
        role = cast("type[NoiseStrategy]", registry("noise").get(spec.type).cls).role
        if role == "input":
            seen_input = seen_input if seen_input is not None else i
        elif seen_input is not None:
            raise PresetError(
                f"{spec.type!r} changes the target noise but comes after noise[{seen_input}] "
                f"({preset.noise[seen_input].type!r}), which changes only the model-input noise. "
                "Allowed: list input-only strategies last, so the loss target is fully built first.",
                path=path,
                key=f"noise[{i}].type",
            )
    if preset.memory.cache_text_encoder_outputs:
        for i, spec in enumerate(preset.caption):
            if cast("type[CaptionTransform]", registry("caption").get(spec.type).cls).needs_text:
                raise PresetError(
                    f"caption transform {spec.type!r} rewrites the caption text, which cached text-encoder outputs "
                    "no longer have. Allowed with memory.cache_text_encoder_outputs = true: 'dropout' only "
                    "(applied by substituting the empty caption's embedding); or turn caching off.",
                    path=path,
                    key=f"caption[{i}].type",
                )
