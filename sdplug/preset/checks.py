"""Checks of a resolved preset beyond each table's own validation: rules across its tables,
and, when it is bound to a noise schedule, parameters against the schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from sdplug.errors import PresetError, raise_together
from sdplug.strategies import cached_text_caption_types, registry
from sdplug.strategies.base import CaptionTransform, NoiseStrategy, Strategy
from sdplug.strategies.families import IN_PRESET_ORDER

if TYPE_CHECKING:
    import torch

    from sdplug.preset.model import Preset, StrategySpec


def check_against_schedule(preset: Preset, num_train_timesteps: int, alphas_cumprod: torch.Tensor | None = None) -> None:
    """Refuse, when the preset is bound to a noise schedule, parameters that do not fit it.

    Validation cannot know the schedule (``max_timestep = 5000`` is fine for a 10,000-step one),
    so strategies whose parameters are timesteps declare ``schedule_problem(num_train_timesteps)``,
    returning ``(parameter, sentence)`` or None; those that need the schedule's values declare
    ``alphas_problem(alphas_cumprod)`` (``sdplug.strategies.base.Strategy``). Every strategy table
    of every family is asked. The error names the file and key the table came from (a parent's
    file, when inherited), before anything is trained.
    """
    for spec, strategy in _strategies(preset):
        problem = strategy.schedule_problem(num_train_timesteps)
        if problem is None and alphas_cumprod is not None:
            problem = strategy.alphas_problem(alphas_cumprod)
        if problem is not None:
            raise _spec_error(spec, problem)


def zero_terminal_errors(preset: Preset) -> list[PresetError]:
    """What ``check_against_schedule`` will refuse of a preset whose own [schedule] says zero_terminal_snr.

    The model's schedule is unknown while validating, but whatever it is, the plan rescales it
    to end at abar_T = 0; so ``alphas_problem`` is asked about SD's schedule rescaled the same
    way, and what it refuses for that terminal it refuses for every model. Found here, the
    mistake shows in ``sdplug validate`` instead of at the start of training.
    """
    if not preset.schedule.zero_terminal_snr:
        return []
    from sdplug.schedule import rescale_zero_terminal_snr, scaled_linear_alphas_cumprod

    zero_terminal = rescale_zero_terminal_snr(scaled_linear_alphas_cumprod())
    found = ((spec, strategy.alphas_problem(zero_terminal)) for spec, strategy in _strategies(preset))
    return [_spec_error(spec, problem) for spec, problem in found if problem is not None]


def _strategies(preset: Preset) -> list[tuple[StrategySpec, Strategy]]:
    """Every strategy table of the preset, in the order a preset lists them, with its strategy."""
    specs = [spec for family in IN_PRESET_ORDER for spec in preset.strategy_specs(family.section)]
    # every registry holds subclasses of its family's base, all Strategy (Registry._check_fits)
    return [(spec, cast(Strategy, spec.create())) for spec in specs]


def _spec_error(spec: StrategySpec, problem: tuple[str, str]) -> PresetError:
    parameter, sentence = problem
    return PresetError(sentence, path=spec.path, key=f"{spec.key}.{parameter}" if spec.key else parameter)


def check_consistency(preset: Preset, path: str) -> None:
    """Rules across tables of one preset: input-only noise last; no text transforms with cached
    text outputs; no strategy that a zero-terminal schedule rules out. Every broken rule is reported."""
    problems = []
    seen_input = None
    for i, spec in enumerate(preset.noise):
        # the noise registry holds NoiseStrategy subclasses only (Registry._check_fits)
        role = cast("type[NoiseStrategy]", registry("noise").get(spec.type).cls).role
        if role == "input":
            seen_input = seen_input if seen_input is not None else i
        elif seen_input is not None:
            problems.append(
                PresetError(
                    f"{spec.type!r} changes the target noise but comes after noise[{seen_input}] "
                    f"({preset.noise[seen_input].type!r}), which changes only the model-input noise. "
                    "Allowed: list input-only strategies last, so the loss target is fully built first.",
                    path=path,
                    key=f"noise[{i}].type",
                )
            )
            break
    if preset.memory.cache_text_encoder_outputs:
        for i, spec in enumerate(preset.caption):
            if cast("type[CaptionTransform]", registry("caption").get(spec.type).cls).needs_text:
                problems.append(
                    PresetError(
                        f"caption transform {spec.type!r} rewrites the caption text, which cached text-encoder outputs "
                        f"no longer have. Allowed with memory.cache_text_encoder_outputs = true: "
                        f"{', '.join(repr(name) for name in cached_text_caption_types())} only "
                        "(applied by substituting the empty caption's embedding); or turn caching off.",
                        path=path,
                        key=f"caption[{i}].type",
                    )
                )
    problems.extend(zero_terminal_errors(preset))
    problems.extend(flow_shift_errors(preset, path))
    raise_together(problems)


def flow_shift_errors(preset: Preset, path: str) -> list[PresetError]:
    """A flow shift given twice in ``[schedule]``, or a dynamic one whose token range is empty."""
    schedule = preset.schedule
    if not schedule.dynamic_shift:
        return []
    if schedule.flow_shift != 1.0:
        return [
            PresetError(
                "flow_shift and dynamic_shift both shift the sigmas; one of them acts. Allowed: flow_shift "
                "(a fixed shift) or dynamic_shift = true (a shift from each image's size).",
                path=path,
                key="schedule.flow_shift",
            )
        ]
    if schedule.max_seq_len <= schedule.base_seq_len:
        return [
            PresetError(
                f"max_seq_len ({schedule.max_seq_len}) must be above base_seq_len ({schedule.base_seq_len}): "
                "mu is linear between them.",
                path=path,
                key="schedule.max_seq_len",
            )
        ]
    return []
