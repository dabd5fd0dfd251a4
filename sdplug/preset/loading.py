"""Preset files: loading, ``extends``, validation with key paths.

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from sdplug.errors import PresetError, SdplugError, did_you_mean, raise_together
from sdplug.params import check_known_keys, field_names, validate_params
from sdplug.preset.checks import check_consistency
from sdplug.preset.files import check_nesting, extended_path, parse_toml, read_toml, resolve_preset_path, shipped_preset_names
from sdplug.preset.model import (
    MAX_EXTENDS_DEPTH,
    OPTIMIZER_EXTRA_KEYS,
    PRESET_KEYS,
    SECTIONS,
    SETTINGS_SECTIONS,
    Preset,
    StrategySpec,
)
from sdplug.preset.settings import settings_table
from sdplug.strategies import optimizer_adapts_step_size, registry
from sdplug.strategies.base import OptimizerStrategy
from sdplug.strategies.families import IN_PRESET_ORDER


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
    # Prodigy's lr 1.0 as AdamW's would blow the weights up: the fallback keeps its own default lr
    drop = optimizer_adapts_step_size(primary.type) and not optimizer_adapts_step_size(str(value["fallback"]))
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
