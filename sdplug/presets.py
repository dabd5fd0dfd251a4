"""TOML presets: loading, ``extends``, validation with key paths, and writing back.

A preset file has these sections, all optional::

    [preset]            name, description, extends (a shipped preset's name or a path)
    [[noise]]           noise strategies, applied in the order written
    [timesteps]         one timestep sampler
    [loss]              one loss type (mse when omitted), with its mask options
    [loss_weighting]    one loss weighting
    [[caption]]         caption transforms, applied in the order written
    [optimizer]         one optimizer; `fallback` may name another to use when it cannot run
    [attention]         one attention implementation
    [memory]            gradient_checkpointing, mixed_precision, cache_latents, cache_text_encoder_outputs
    [schedule]          zero_terminal_snr (and epsilon_ok)
    [ema]               decay (turns it on), update_every, start_step, device

Each strategy table has ``type`` (a registered name) and that strategy's parameters.
``extends``: a section the child writes replaces the parent's section whole (``noise = []``
removes the parent's noise list), except ``[memory]``, ``[schedule]`` and ``[ema]``, which merge key by key.
Every problem is one ``PresetError`` naming the file, the key path and what is allowed.
A file may start with a UTF-8 byte-order mark (Windows editors write one). An empty file (or
one holding only comments) is refused: it is almost always a wrong path or an unsaved file,
and training with it would silently use no strategy at all.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdplug.errors import PresetError, SdplugError, did_you_mean
from sdplug.params import check_known_keys, validate_params
from sdplug.preset_checks import check_consistency
from sdplug.preset_settings import EMASettings, MemorySettings, ScheduleSettings, settings_table
from sdplug.strategies import registry

if TYPE_CHECKING:
    from sdplug.plan import Plan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LIST_SECTIONS = ("noise", "caption")
SINGLE_SECTIONS = ("timesteps", "loss", "loss_weighting", "optimizer", "attention")
SETTINGS_SECTIONS = {"memory": MemorySettings, "schedule": ScheduleSettings, "ema": EMASettings}
SECTIONS = ("preset", *LIST_SECTIONS, *SINGLE_SECTIONS, *SETTINGS_SECTIONS)
PRESET_KEYS = ("name", "description", "extends")
OPTIMIZER_EXTRA_KEYS = ("fallback",)
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

    def to_dict(self, *, with_defaults: bool = False) -> dict[str, Any]:
        """The resolved preset as TOML-ready data (no ``extends``: everything is inlined)."""
        data: dict[str, Any] = {"preset": {"name": self.name, "description": self.description}}
        for section in LIST_SECTIONS:
            specs = getattr(self, section)
            if specs:
                data[section] = [spec.to_table(with_defaults=with_defaults) for spec in specs]
        for section in SINGLE_SECTIONS:
            spec = getattr(self, section)
            if spec is not None:
                data[section] = spec.to_table(with_defaults=with_defaults)
        if self.optimizer_fallback is not None:
            data["optimizer"]["fallback"] = self.optimizer_fallback.type
        data["memory"] = settings_table(self.memory)
        data["schedule"] = settings_table(self.schedule)
        if self.ema.decay is not None:  # TOML has no null: an [ema] without decay is no [ema]
            data["ema"] = settings_table(self.ema)
        return data

    def build(
        self,
        noise_scheduler: Any = None,
        *,
        seed: int = 0,
        rank: int = 0,
        alphas_cumprod: Any = None,
        prediction_type: str | None = None,
        default_timesteps: Any = None,
    ) -> Plan:
        """The plan: this preset bound to a model's noise schedule and prediction type.

        ``noise_scheduler`` is a diffusers-style scheduler (its ``alphas_cumprod`` and
        ``config.prediction_type``); or give ``alphas_cumprod`` and ``prediction_type``
        (explicit values win over the scheduler's). ``seed`` and ``rank`` derive the plan's
        random streams (``sdplug.streams``). ``default_timesteps`` is the host's own timestep
        strategy, used when the preset names none (uniform over the schedule otherwise). Everything the file alone cannot know is checked
        here: timestep ranges against the schedule, the prediction type, an optimizer or
        attention that cannot run on this machine.
        """
        from sdplug.plan import Plan

        if noise_scheduler is not None:
            alphas_cumprod = noise_scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
            config = getattr(noise_scheduler, "config", None)
            prediction_type = prediction_type or getattr(config, "prediction_type", None) or "epsilon"
        if alphas_cumprod is None or prediction_type is None:
            raise SdplugError(
                f"{self.path or self.name}: Preset.build needs a noise scheduler, or alphas_cumprod= and prediction_type=."
            )
        import torch

        from sdplug.schedule import rescale_zero_terminal_snr

        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        if self.schedule.zero_terminal_snr:
            if prediction_type == "epsilon" and not self.schedule.epsilon_ok:
                raise PresetError(
                    "zero-terminal SNR trains the last timestep at SNR 0, where an epsilon-prediction model's target "
                    "says nothing about the image (Lin et al. 2023 train v-prediction). Allowed: a v_prediction or "
                    "sample model, or schedule.epsilon_ok = true to train epsilon anyway.",
                    path=self.path,
                    key="schedule.zero_terminal_snr",
                )
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)  # idempotent: a rescaled schedule stays
        return Plan(
            self,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            seed=seed,
            rank=rank,
            default_timesteps=default_timesteps,
        )

    def to_toml(self, *, with_defaults: bool = True) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict(with_defaults=with_defaults))


def shipped_presets_dir() -> Path:
    """Where the presets shipped with sdplug live (inside the installed package, or the source tree)."""
    from sdplug.resources import shipped_dir

    return shipped_dir("presets")


def shipped_preset_names() -> list[str]:
    return sorted(p.stem for p in shipped_presets_dir().glob("*.toml"))


def resolve_preset_path(reference: str, relative_to: Path | None = None) -> Path:
    """A preset reference (a shipped preset's name, or a path) as an existing file path."""
    candidate = Path(reference)
    looks_like_path = candidate.suffix == ".toml" or len(candidate.parts) > 1
    if looks_like_path:
        if relative_to is not None and not candidate.is_absolute():
            candidate = relative_to / candidate
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(str(candidate))
    if relative_to is not None and (relative_to / f"{reference}.toml").is_file():
        return relative_to / f"{reference}.toml"
    shipped = shipped_presets_dir() / f"{reference}.toml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(reference)


def load_preset(path: str | Path) -> Preset:
    """Load, resolve ``extends`` and validate a preset file (or a shipped preset's name)."""
    path = Path(path)
    if not path.is_file():
        try:
            path = resolve_preset_path(str(path))
        except FileNotFoundError:
            raise PresetError(
                f"no such preset file. Shipped presets: {', '.join(shipped_preset_names())}."
                f"{did_you_mean(path.stem, shipped_preset_names())}",
                path=str(path),
            ) from None
    return _load(path, chain=())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: accept (and drop) a leading BOM
    except UnicodeDecodeError as exc:
        raise PresetError(
            f"cannot read the file: it is not UTF-8 text ({exc.reason} at byte {exc.start}). Allowed: a UTF-8 TOML file.",
            path=str(path),
        ) from None
    except OSError as exc:
        raise PresetError(f"cannot read the file: {exc}", path=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"not valid TOML: {exc}", path=str(path)) from None
    if not data:
        raise PresetError(
            "the file is empty (no keys, only whitespace or comments), so it would train with no strategy at all. "
            "Allowed: at least one section such as [preset], [[noise]] or [timesteps]; see `sdplug show tiny-default`.",
            path=str(path),
        )
    return data


def _load(path: Path, chain: tuple[Path, ...]) -> Preset:
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(str(p) for p in (*chain, real))
        raise PresetError(f"'extends' makes a cycle: {cycle}.", path=str(path), key="preset.extends")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise PresetError(
            f"'extends' chain is more than {MAX_EXTENDS_DEPTH} files long (it starts at {chain[0]}). "
            f"Allowed: at most {MAX_EXTENDS_DEPTH} files in one chain of 'extends'.",
            path=str(path),
            key="preset.extends",
        )
    return parse_preset(_read_toml(path), path=str(path), _chain=(*chain, real))


def parse_preset(data: Any, *, path: str = "<preset>", _chain: tuple[Path, ...] = ()) -> Preset:
    """Validate preset ``data`` (as read from TOML) and resolve its ``extends``."""
    if not isinstance(data, Mapping):
        raise PresetError(f"a preset is a TOML table, not {type(data).__name__}.", path=path)
    for section in data:
        if section not in SECTIONS:
            raise PresetError(
                f"unknown section {section!r}. Allowed sections: {', '.join(SECTIONS)}.{did_you_mean(section, SECTIONS)}",
                path=path,
                key=str(section),
            )
    info = _table(data.get("preset", {}), path, "preset")
    _check_keys(info, PRESET_KEYS, path, "preset", "the [preset] table")
    for key in PRESET_KEYS:
        if key in info and not isinstance(info[key], str):
            raise PresetError(f"{_show(info[key])} is not allowed: must be a string.", path=path, key=f"preset.{key}")

    own: dict[str, Any] = {}
    for section in LIST_SECTIONS:
        if section in data:
            own[section] = tuple(_strategies(data[section], section, path))
    for section in SINGLE_SECTIONS:
        if section in data:
            own[section] = _strategy(
                data[section], section, path, section, extra_keys=OPTIMIZER_EXTRA_KEYS if section == "optimizer" else ()
            )
    if "optimizer" in data:
        own["optimizer_fallback"] = _fallback(data["optimizer"], own["optimizer"], path)
    tables = {name: _table(data.get(name, {}), path, name) for name in SETTINGS_SECTIONS}

    parent = None
    if "extends" in info:
        here = Path(path).parent if path != "<preset>" else None
        try:
            parent_path = resolve_preset_path(info["extends"], relative_to=here)
        except FileNotFoundError:
            names = shipped_preset_names()
            raise PresetError(
                f"'extends' names {info['extends']!r}, which is neither a preset file nor a shipped preset. "
                f"Allowed: a path to a .toml file or one of: {', '.join(names)}.{did_you_mean(info['extends'], names)}",
                path=path,
                key="preset.extends",
            ) from None
        parent = _load(parent_path, _chain)

    settings = {}
    for name, cls in SETTINGS_SECTIONS.items():  # merged key by key under extends
        values = settings_table(getattr(parent, name)) if parent else {}
        values.update(tables[name])
        settings[name] = validate_params(cls, values, what=f"[{name}]", path=path, key=name)

    merged = {field.name: getattr(parent, field.name) for field in dataclasses.fields(Preset)} if parent else {}
    merged.update(own)
    merged.update(
        name=info.get("name", Path(path).stem),
        description=info.get("description", ""),
        path=path,
        extends_chain=(*(parent.extends_chain if parent else ()), *((parent.path,) if parent else ())),
        **settings,
    )
    preset = Preset(**merged)
    check_consistency(preset, path)
    return preset


def _table(value: Any, path: str, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PresetError(f"{_show(value)} is not allowed: [{key}] must be a table.", path=path, key=key)
    return dict(value)


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], path: str, key: str, what: str) -> None:
    check_known_keys(table, allowed, what=f"in {what}", path=path, key=key)


def _strategies(value: Any, family: str, path: str) -> list[StrategySpec]:
    if isinstance(value, Mapping):
        raise PresetError(
            f"{family} is a list applied in order: write [[{family}]] (double brackets) for each entry.",
            path=path,
            key=family,
        )
    if not isinstance(value, list):
        raise PresetError(
            f"{_show(value)} is not allowed: {family} must be an array of tables ([[{family}]]).", path=path, key=family
        )
    return [_strategy(entry, family, path, f"{family}[{i}]") for i, entry in enumerate(value)]


def _strategy(value: Any, family: str, path: str, key: str, extra_keys: tuple[str, ...] = ()) -> StrategySpec:
    if not isinstance(value, Mapping):
        raise PresetError(f"{_show(value)} is not allowed: {key} must be a table with a 'type' key.", path=path, key=key)
    table = dict(value)
    names = registry(family).names()
    if "type" not in table:
        raise PresetError(f"missing 'type'. Allowed types for {family}: {', '.join(names)}.", path=path, key=f"{key}.type")
    name = table.pop("type")
    if not isinstance(name, str) or name not in registry(family):
        raise PresetError(
            f"{_show(name)} is not a {family} strategy. Allowed types: {', '.join(names)}."
            f"{did_you_mean(name, names) if isinstance(name, str) else ''}",
            path=path,
            key=f"{key}.type",
        )
    for extra in extra_keys:
        table.pop(extra, None)
    try:
        cls = registry(family).get(name).cls
    except SdplugError as exc:  # e.g. a plugin that fails to load
        raise PresetError(str(exc), path=path, key=f"{key}.type") from None
    # one dict, never keyword arguments next to path and key: any user key is just an unknown key
    validate_params(cls, table, what=f"{family} {name!r}", path=path, key=key)
    return StrategySpec(family, name, dict(table), f"{path}: {key}", path=path, key=key)


def _fallback(value: Mapping[str, Any], primary: StrategySpec, path: str) -> StrategySpec | None:
    if "fallback" not in value:
        return None
    from sdplug.strategies.optimizers_extra import lr_is_a_multiplier as multiplier

    # Prodigy's lr 1.0 as AdamW's would blow the weights up: the fallback keeps its own default lr
    drop = multiplier(primary.type) and not multiplier(str(value["fallback"]))
    table = {"type": value["fallback"], **{k: v for k, v in primary.params.items() if not (drop and k == "lr")}}
    return _strategy(table, "optimizer", path, "optimizer.fallback")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        text = repr(value)
        return text if len(text) < 60 else text[:57] + "..."
    return repr(value)
