"""A preset as sdplug holds it: its strategy tables (``StrategySpec``) and settings, resolved.

A preset file has these sections, all optional::

    [preset]            name, description, extends (a shipped preset's name or a .toml file's path)
    [[noise]]           noise strategies, applied in the order written
    [timesteps]         one timestep sampler
    [loss]              one loss type (mse when omitted), with its mask options
    [loss_weighting]    one loss weighting
    [[caption]]         caption transforms, applied in the order written
    [optimizer]         one optimizer; `fallback` may name another to use when it cannot run
    [attention]         one attention implementation
    [memory]            gradient_checkpointing, mixed_precision, cache_latents, cache_text_encoder_outputs
    [schedule]          zero_terminal_snr (and epsilon_ok); flow_shift or dynamic_shift (rectified flow)
    [ema]               decay (turns it on), update_every, start_step, device

Each strategy table has ``type`` (a registered name) and that strategy's parameters; the
strategy families and their sections come from the one family table
(``sdplug.strategies.families``). Reading files is ``sdplug.preset.loading``; binding a preset
to a model's process is ``sdplug.plan.binding`` (``Preset.build`` is its short form).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from sdplug.preset.settings import EMASettings, MemorySettings, ScheduleSettings, settings_table
from sdplug.strategies import registry
from sdplug.strategies.families import IN_PRESET_ORDER

LIST_SECTIONS = tuple(family.section for family in IN_PRESET_ORDER if family.many)
SINGLE_SECTIONS = tuple(family.section for family in IN_PRESET_ORDER if not family.many)
SETTINGS_SECTIONS = {"memory": MemorySettings, "schedule": ScheduleSettings, "ema": EMASettings}
SECTIONS = ("preset", *LIST_SECTIONS, *SINGLE_SECTIONS, *SETTINGS_SECTIONS)
PRESET_KEYS = ("name", "description", "extends")
OPTIMIZER_EXTRA_KEYS = ("fallback",)
# What binds a preset to a process: ``sdplug.plan.binding.bind``, registered by the plan package
# (the layer above, which imports this one; this module never imports it back).
_binder: Callable[..., Any] | None = None


def register_binder(binder: Callable[..., Any]) -> None:
    """Make ``Preset.build`` call ``binder`` (``sdplug.plan`` does, when imported)."""
    global _binder
    _binder = binder


# Far deeper than any real preset family, far below Python's recursion limit.
MAX_EXTENDS_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """One strategy table of a preset: family, registered name, validated parameters."""

    family: str
    type: str
    params: Mapping[str, Any]
    source: str  # "file: key path", for messages that point back at the preset
    path: str | None = None  # the file this table was written in (a parent's, when inherited)
    key: str = ""  # its key path there, e.g. "timesteps" or "noise[1]"

    def create(self) -> Any:
        return registry(self.family).create(self.type, **dict(self.params))

    def to_table(self, *, with_defaults: bool = False) -> dict[str, Any]:
        """``type`` and parameters; ``with_defaults`` also writes every parameter left at its default."""
        params = dict(self.params)
        if with_defaults:
            params = {
                field.name: getattr(self.create(), field.name)
                for field in dataclasses.fields(registry(self.family).get(self.type).cls)
            }
        # None means "not set" (e.g. uniform's max_timestep follows the schedule); TOML has no null
        return {
            "type": self.type,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if v is not None},
        }


@dataclasses.dataclass(frozen=True)
class Preset:
    """A fully resolved preset (after ``extends``)."""

    name: str
    description: str = ""
    path: str | None = None
    extends_chain: tuple[str, ...] = ()  # the files merged in, parent first
    noise: tuple[StrategySpec, ...] = ()
    caption: tuple[StrategySpec, ...] = ()
    timesteps: StrategySpec | None = None
    loss: StrategySpec | None = None
    loss_weighting: StrategySpec | None = None
    optimizer: StrategySpec | None = None
    optimizer_fallback: StrategySpec | None = None
    attention: StrategySpec | None = None
    memory: MemorySettings = dataclasses.field(default_factory=MemorySettings)
    schedule: ScheduleSettings = dataclasses.field(default_factory=ScheduleSettings)
    ema: EMASettings = dataclasses.field(default_factory=EMASettings)
    # "memory.cache_latents" and so on: the settings the file (or a parent) wrote, for to_dict
    settings_written: frozenset[str] = frozenset()

    def strategy_specs(self, section: str) -> tuple[StrategySpec, ...]:
        """The strategy tables of one family's section, in order (none, one, or a list's)."""
        value = getattr(self, section)
        if isinstance(value, tuple):
            return value
        return () if value is None else (value,)

    def to_dict(self, *, with_defaults: bool = False) -> dict[str, Any]:
        """The resolved preset as TOML-ready data (no ``extends``: everything is inlined).

        Without ``with_defaults``, only what was written: each strategy's written parameters, and
        of the settings those written (here or in a parent) or changed since from their defaults.
        """
        data: dict[str, Any] = {"preset": {"name": self.name, "description": self.description}}
        for family in IN_PRESET_ORDER:
            tables = [spec.to_table(with_defaults=with_defaults) for spec in self.strategy_specs(family.section)]
            if tables:
                data[family.section] = tables if family.many else tables[0]
        if self.optimizer_fallback is not None:
            data["optimizer"]["fallback"] = self.optimizer_fallback.type
        for name in SETTINGS_SECTIONS:
            settings = getattr(self, name)
            if name == "ema" and settings.decay is None:  # TOML has no null: an [ema] without decay is no [ema]
                continue
            table = settings_table(settings)
            if not with_defaults:
                defaults = settings_table(type(settings)())
                table = {k: v for k, v in table.items() if f"{name}.{k}" in self.settings_written or v != defaults[k]}
            table = {k: v for k, v in table.items() if v is not None}  # None: not set (schedule.patch_size: the model's)
            if table:
                data[name] = table
        return data

    def build(self, noise_scheduler: Any = None, **binding: Any) -> Any:
        """The plan (a ``sdplug.Plan``): this preset bound to a model's diffusion process --
        ``sdplug.plan.bind(preset, noise_scheduler, **binding)``, which documents the keyword
        arguments (``seed``, ``rank``, ``alphas_cumprod``, ``prediction_type``, ``process``, ...)
        and every check made there."""
        if _binder is None:  # pragma: no cover - importing sdplug imports sdplug.plan, which registers it
            raise RuntimeError("Preset.build: sdplug.plan was not imported; import sdplug first.")
        return _binder(self, noise_scheduler, **binding)

    def to_toml(self, *, with_defaults: bool = True) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict(with_defaults=with_defaults))
