"""TOML presets: loading, ``extends``, validation with key paths, and writing back.

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
    [schedule]          zero_terminal_snr (and epsilon_ok)
    [ema]               decay (turns it on), update_every, start_step, device

Each strategy table has ``type`` (a registered name) and that strategy's parameters.
``extends``: a section the child writes replaces the parent's section whole (``noise = []``
removes the parent's noise list), except ``[memory]``, ``[schedule]`` and ``[ema]``, which merge key by key.
Every problem is one ``PresetError`` naming the file, the key path and what is allowed; all the
problems of a file are reported together (``PresetErrors``). ``extends`` opens only a shipped
preset or a regular ``.toml`` file, never quotes that file's values in errors, and is refused
in a preset that came embedded in a download (``embedded_from``).
A file may start with a UTF-8 byte-order mark (Windows editors write one). An empty file (or
one holding only comments) is refused: it is almost always a wrong path or an unsaved file,
and training with it would silently use no strategy at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sdplug.errors import PresetError, SdplugError, did_you_mean, raise_together
from sdplug.params import check_known_keys, validate_params
from sdplug.preset_checks import check_consistency
from sdplug.preset_files import (
    MAX_NESTING as MAX_NESTING,  # re-exported: the preset API names these here too
)
from sdplug.preset_files import (
    check_nesting,
    extended_path,
    parse_toml,
    read_toml,
    resolve_preset_path,
    shipped_preset_names,
)
from sdplug.preset_files import (
    shipped_presets_dir as shipped_presets_dir,
)
from sdplug.preset_files import (
    tomllib as tomllib,
)
from sdplug.preset_settings import EMASettings, MemorySettings, ScheduleSettings, settings_table
from sdplug.strategies import registry
from sdplug.strategies.families import IN_PRESET_ORDER

if TYPE_CHECKING:
    from sdplug.plan import Plan

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass

LIST_SECTIONS = tuple(family.section for family in IN_PRESET_ORDER if family.many)
SINGLE_SECTIONS = tuple(family.section for family in IN_PRESET_ORDER if not family.many)
SETTINGS_SECTIONS = {"memory": MemorySettings, "schedule": ScheduleSettings, "ema": EMASettings}
SECTIONS = ("preset", *LIST_SECTIONS, *SINGLE_SECTIONS, *SETTINGS_SECTIONS)
PRESET_KEYS = ("name", "description", "extends")
OPTIMIZER_EXTRA_KEYS = ("fallback",)
# Far deeper than any real preset family, far below Python's recursion limit.
MAX_EXTENDS_DEPTH = 32
# Levels of tables and arrays in one file: a preset needs 4; deeper is an attack or a mistake.


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
            if table:
                data[name] = table
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
        self._check_prediction_type(prediction_type)
        return Plan(
            self,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            seed=seed,
            rank=rank,
            default_timesteps=default_timesteps,
        )

    def _check_prediction_type(self, prediction_type: str) -> None:
        """Refuse a loss-weighting parameter the preset wrote that does nothing for this model
        (an SNR floor with a v_prediction or sample model), naming its file and key."""
        from sdplug.schedule import check_prediction_type

        spec = self.loss_weighting
        if spec is None:
            return
        problem = spec.create().prediction_problem(check_prediction_type(prediction_type), set(spec.params))
        if problem is not None:
            parameter, sentence = problem
            raise PresetError(sentence, path=spec.path, key=f"{spec.key}.{parameter}" if spec.key else parameter)

    def to_toml(self, *, with_defaults: bool = True) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict(with_defaults=with_defaults))


def load_preset(path: str | Path, *, embedded_from: str | None = None) -> Preset:
    """Load, resolve ``extends`` and validate a preset file (or a shipped preset's name).

    ``embedded_from`` names the download a preset file came with (a model folder's saved
    preset): such a preset must be self-contained, so its ``extends`` is refused.
    """
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
    return _load(path, chain=(), embedded_from=embedded_from)


def parse_preset_text(text: str, *, path: str, embedded_from: str | None = None) -> Preset:
    """Validate a preset given as TOML text, e.g. one saved in a LoRA's metadata.

    ``path`` names the text in messages (e.g. "lora.safetensors (its metadata)");
    ``embedded_from`` names the download it came with, which refuses ``extends`` (see ``parse_preset``).
    """
    return parse_preset(parse_toml(text, path), path=path, embedded_from=embedded_from)


class _ChainError(PresetError):
    """A problem of the chain of ``extends`` itself (a cycle, too long): it names files, never values."""


class _ExtendedFileError(PresetError):
    """A problem inside a file that the validated preset extends, told without that file's values."""


def _load(path: Path, chain: tuple[Path, ...], embedded_from: str | None = None) -> Preset:
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(str(p) for p in (*chain, real))
        raise _ChainError(f"'extends' makes a cycle: {cycle}.", path=str(path), key="preset.extends")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise _ChainError(
            f"'extends' chain is more than {MAX_EXTENDS_DEPTH} files long (it starts at {chain[0]}). "
            f"Allowed: at most {MAX_EXTENDS_DEPTH} files in one chain of 'extends'.",
            path=str(path),
            key="preset.extends",
        )
    return parse_preset(read_toml(path), path=str(path), embedded_from=embedded_from, _chain=(*chain, real))


class _Problems:
    """The problems found in one preset so far, so that one run reports all of them."""

    def __init__(self) -> None:
        self.found: list[PresetError] = []

    def add(self, error: PresetError) -> None:
        self.found.extend(error.errors)

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except PresetError as error:
            self.add(error)

    def raise_in_file_order(self, data: Mapping[str, Any], path: str) -> None:
        """All problems found, ordered as their sections appear in the file (a parent's with 'extends')."""
        order = {name: i for i, name in enumerate(data)}

        def position(error: PresetError) -> int:
            section = "preset" if error.path != path else re.split(r"[.\[]", error.key or "", maxsplit=1)[0]
            return order.get(section, len(order))

        raise_together(sorted(self.found, key=position))


def parse_preset(data: Any, *, path: str = "<preset>", embedded_from: str | None = None, _chain: tuple[Path, ...] = ()) -> Preset:
    """Validate preset ``data`` (as read from TOML) and resolve its ``extends``.

    Every problem of the file is reported (``PresetErrors`` when there are several). A preset
    that came embedded in a download (``embedded_from`` names it: a LoRA, a model folder) may
    not ``extends``: a downloaded file must not make sdplug open files of this machine.
    """
    if not isinstance(data, Mapping):
        raise PresetError(f"a preset is a TOML table, not {type(data).__name__}.", path=path)
    check_nesting(data, path)
    problems = _Problems()
    for section in data:
        if section not in SECTIONS:
            problems.add(
                PresetError(
                    f"unknown section {section!r}. Allowed sections: {', '.join(SECTIONS)}.{did_you_mean(section, SECTIONS)}",
                    path=path,
                    key=str(section),
                )
            )
    info: dict[str, Any] = {}
    with problems.collect():
        info = _table(data.get("preset", {}), path, "preset")
    with problems.collect():
        _check_keys(info, PRESET_KEYS, path, "preset", "the [preset] table")
    for key in PRESET_KEYS:
        if key in info and not isinstance(info[key], str):
            problems.add(PresetError(f"{_show(info[key])} is not allowed: must be a string.", path=path, key=f"preset.{key}"))
            del info[key]

    own: dict[str, Any] = {}
    for family in IN_PRESET_ORDER:
        section = family.section
        if section not in data:
            continue
        with problems.collect():
            if family.many:
                own[section] = tuple(_strategies(data[section], family.name, path))
            else:
                extra_keys = OPTIMIZER_EXTRA_KEYS if family.name == "optimizer" else ()
                own[section] = _strategy(data[section], family.name, path, section, extra_keys=extra_keys)
    if "optimizer" in own:
        with problems.collect():
            own["optimizer_fallback"] = _fallback(data["optimizer"], own["optimizer"], path)
    tables: dict[str, dict[str, Any]] = {}
    for name in SETTINGS_SECTIONS:
        with problems.collect():
            tables[name] = _table(data.get(name, {}), path, name)

    parent = None
    if "extends" in info:
        if embedded_from is not None:
            problems.add(
                PresetError(
                    f"a preset embedded in {embedded_from} cannot 'extends' another preset ({_show(info['extends'])}): "
                    "a downloaded file must not make sdplug open files of this machine. Allowed: a self-contained "
                    "preset (the presets sdplug saves have everything inlined).",
                    path=path,
                    key="preset.extends",
                )
            )
        else:
            with problems.collect():
                parent = _load_parent(info["extends"], path, _chain)

    settings = {}
    for name, cls in SETTINGS_SECTIONS.items():  # merged key by key under extends
        values = settings_table(getattr(parent, name)) if parent else {}
        values.update(tables.get(name, {}))
        with problems.collect():
            settings[name] = validate_params(cls, values, what=f"[{name}]", path=path, key=name)
    problems.raise_in_file_order(data, path)

    merged = {field.name: getattr(parent, field.name) for field in dataclasses.fields(Preset)} if parent else {}
    merged.update(own)
    merged.update(
        name=info.get("name", Path(path).stem),
        description=info.get("description", ""),
        path=path,
        extends_chain=(*(parent.extends_chain if parent else ()), *((parent.path,) if parent else ())),
        settings_written=(parent.settings_written if parent else frozenset())
        | {f"{name}.{key}" for name, table in tables.items() for key in table},
        **settings,
    )
    preset = Preset(**merged)
    check_consistency(preset, path)
    return preset


def _load_parent(reference: str, path: str, chain: tuple[Path, ...]) -> Preset:
    """The preset that ``path`` extends; a problem inside it is told without quoting its values."""
    parent_path = extended_path(reference, path)
    try:
        return _load(parent_path, chain)
    except PresetError as exc:
        raise_together([_without_values(error, path) for error in exc.errors])
        raise  # not reached: raise_together raised


def _without_values(error: PresetError, child: str) -> PresetError:
    """``error`` (from a file that ``child`` extends) without the values it quotes from that file.

    Only the file being validated has its values repeated: a preset may name any .toml file in
    ``extends``, and its error messages must not become a way to print another file's contents.
    What is allowed is ours to say, so the "Allowed ..." sentence stays.
    """
    if isinstance(error, (_ChainError, _ExtendedFileError)) or error.path == child:
        return error
    allowed = error.problem.rfind("Allowed")
    return _ExtendedFileError(
        f"this is not allowed (the file is extended by {child}; its values are not repeated here, to keep "
        f"other files' contents private: run `sdplug validate {error.path}` for the whole message)."
        + (f" {error.problem[allowed:]}" if allowed >= 0 else ""),
        path=error.path,
        key=error.key,
    )


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
    problems = _Problems()
    specs = []
    for i, entry in enumerate(value):
        with problems.collect():
            specs.append(_strategy(entry, family, path, f"{family}[{i}]"))
    raise_together(problems.found)
    return specs


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
            f"{_show(name)} is not {_article(family)} {family} strategy. Allowed types: {', '.join(names)}."
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
    from sdplug.params import field_names
    from sdplug.strategies import registry
    from sdplug.strategies.base import OptimizerStrategy
    from sdplug.strategies.optimizers_extra import lr_is_a_multiplier as multiplier

    # Prodigy's lr 1.0 as AdamW's would blow the weights up: the fallback keeps its own default lr
    drop = multiplier(primary.type) and not multiplier(str(value["fallback"]))
    # every setting of the update carries over and must be one the fallback takes; the primary's
    # implementation settings it lacks (adamw8bit's min_8bit_size) stay behind, named by its warning
    name = str(value["fallback"])
    optimizers = registry("optimizer")
    own = cast("type[OptimizerStrategy]", optimizers.get(primary.type).cls).implementation_parameters
    takes = set(field_names(optimizers.get(name).cls)) if name in optimizers.names() else set()
    params = {k: v for k, v in primary.params.items() if not (drop and k == "lr") and (k not in own or k in takes)}
    return _strategy({"type": name, **params}, "optimizer", path, "optimizer.fallback")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        text = repr(value)
        return text if len(text) < 60 else text[:57] + "..."
    return repr(value)
