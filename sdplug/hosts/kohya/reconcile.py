"""The kohya command line against a preset, before training: refusals, and the preset's changes.

Pure: argument values, parser defaults and the names the user wrote (``command_line.py``) in,
an error or the changes out; what each flag means next to a preset comes from the flag table
(``flags.py``) alone. The runtime applies the changes to kohya's Namespace, prints the rules and
writes them into ``audit.json``.

A flag is the user's when it was written (on the command line, in ``--config_file`` or in
``--dataset_config``), even at kohya's default value (``--loss_type l2`` chooses a loss), or when
its value differs from the default. Writing an off value (``false``, ``0``, empty) for a flag
that is off by default leaves kohya's trick off, exactly as leaving it out does: no conflict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError, SdplugError
from sdplug.hosts.host_flags import HostFlag, is_set, preset_value, section_set
from sdplug.hosts.kohya.flags import FLAGS, flags_for, host_setting_group
from sdplug.preset import Preset
from sdplug.preset.files import tomllib
from sdplug.strategies import cached_text_caption_types

# caption flags kohya's datasets also take per subset (``--dataset_config``): the same conflicts
SUBSET_CAPTION_KEYS = tuple(dict.fromkeys(f.name for f in FLAGS if f.family == "caption" and f.kind == "conflict"))


class KohyaConflictError(SdplugError):
    """The kohya command line and the preset both set one trick."""


class PresetWeightingMarker(float):
    """Stands in ``args.min_snr_gamma`` so kohya calls the weighting hook; never a real gamma.

    kohya calls ``apply_snr_weight`` on the per-sample loss only when ``min_snr_gamma`` is set,
    so with a preset [loss_weighting] the adapter sets this marker there and the hook runs the
    preset's weighting in its place (``--min_snr_gamma`` itself is refused as a conflict)."""

    def __new__(cls):
        return super().__new__(cls, 1.0)

    def __repr__(self) -> str:
        return "sdplug-preset-weighting"

    __str__ = __repr__


@dataclasses.dataclass
class Reconciliation:
    """What the preset changes in kohya's arguments, and what the audit says about the flags."""

    changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    rules: list[str] = dataclasses.field(default_factory=list)
    flags: dict[str, str] = dataclasses.field(default_factory=dict)  # set trick-family flags -> kind
    unclassified: list[str] = dataclasses.field(default_factory=list)  # set flags the table lacks


def _label(section: str, preset: Preset) -> str:
    if section.startswith("memory."):
        return f"{section} = {preset_value(preset, section)!r}"
    return f"[{section}]"


# off values: written where kohya's default is one of them too, kohya's trick stays off
_OFF: tuple[object, ...] = (None, False, 0, 0.0, "", (), [])


def user_set(name: str, value: Any, default: Any, written: Collection[str]) -> bool:
    """Whether the user set the flag: written (but not to an off value where kohya's default is
    off too), or given a value other than the parser's default."""
    if name in written:
        return not (value in _OFF and default in _OFF)
    return is_set(value, default)


def _agrees(flag: HostFlag, section: str, value: Any, preset: Preset) -> bool:
    """The flag's value is what the preset's section needs of kohya: no conflict."""
    return value == preset_value(preset, section) or (section, value) in flag.agrees


def check_conflicts(
    preset: Preset, version: str, values: Mapping[str, Any], defaults: Mapping[str, Any], *, written: Collection[str] = ()
) -> None:
    """Refuse a flag that sets a trick a section of the preset replaces (one paragraph, every clash)."""
    clashes: dict[str, list[str]] = {}
    for flag in flags_for(version).values():
        if flag.kind != "conflict" or flag.name not in values:
            continue
        value = values[flag.name]
        if not user_set(flag.name, value, defaults.get(flag.name), written):
            continue
        # every section it clashes with: removing one section must not uncover another refusal
        for section in flag.sections:
            if section_set(preset, section) and not _agrees(flag, section, value, preset):
                clashes.setdefault(section, []).append(f"--{flag.name}={value} ({_why(flag, section)})")
    if clashes:
        parts = [
            f"the preset sets {_label(s, preset)} and the kohya command line sets {', '.join(c)}" for s, c in clashes.items()
        ]
        raise KohyaConflictError(
            f"{preset.path}: {'; '.join(parts)}. Remove the flag(s) or the section(s): sdplug never applies both."
        )


def check_loss_section(preset: Preset) -> None:
    """sd-scripts masks the loss itself (``apply_masked_loss``: the mask alone); a preset's
    ``[loss]`` with other mask options is refused rather than silently masked kohya's way."""
    spec = preset.loss
    if spec is None:
        return
    other = {k: v for k, v in spec.params.items() if k in KOHYA_MASK and v != KOHYA_MASK[k]}
    if other:
        key = next(iter(other))
        raise PresetError(
            f"sd-scripts applies its own loss mask (--masked_loss / --alpha_mask: the mask alone), so [loss] "
            f"{key} = {other[key]!r} would not apply there. Allowed inside sd-scripts: "
            + ", ".join(f"{k} = {v!r}" for k, v in KOHYA_MASK.items())
            + " (the defaults), or train with `sdplug train`.",
            path=spec.path or preset.path,
            key=f"loss.{key}",
        )


def check_sections_apply(plan: Any, version: str, script: str) -> None:
    """Sections sd-scripts cannot apply as the preset says are refused before any model loads."""
    check_loss_section(plan.preset)
    check_schedule_free_switch(plan, version, script)


# the scripts that switch a schedule-free optimizer to eval mode around sampling and saving
SCHEDULE_FREE_SCRIPTS = {"main": ("train_network.py", "sdxl_train_network.py")}


def check_schedule_free_switch(plan: Any, version: str, script: str) -> None:
    """A schedule-free optimizer samples and saves its evaluation weights only where the script
    calls train_util's train/eval switch (main's network scripts); elsewhere it is refused."""
    if not plan.optimizer_is_schedule_free or script in SCHEDULE_FREE_SCRIPTS.get(version, ()):
        return
    spec = plan.optimizer_spec
    allowed = ", ".join(f"{v} {s}" for v, scripts in SCHEDULE_FREE_SCRIPTS.items() for s in scripts)
    raise PresetError(
        f"optimizer {spec.type!r} is schedule-free: its evaluation weights must be switched in around sampling and "
        f"saving, and sd-scripts {version} {script} has no switch for it, so it would save the training weights. "
        f"Allowed with a schedule-free optimizer: {allowed}.",
        path=spec.path or plan.preset.path,
        key="optimizer.type",
    )


# kohya's apply_masked_loss, as [loss] mask options
KOHYA_MASK = {"unmasked_weight": 0.0, "normalize_by_mask_area": False}


def _why(flag: HostFlag, section: str) -> str:
    if flag.family == "noise" and section == "timesteps":
        return f"{flag.why}; sdplug's timestep hook replaces kohya's noise function, which applies it"
    return flag.why


def check_subset(preset: Preset, subset: Any, defaults: Mapping[str, Any]) -> None:
    """A dataset subset's own caption settings against a preset's [caption] (kohya takes them per subset)."""
    if not preset.caption:
        return
    clashing = [
        f"{key}={getattr(subset, key)}" for key in SUBSET_CAPTION_KEYS if is_set(getattr(subset, key, None), defaults.get(key))
    ]
    if clashing:
        raise KohyaConflictError(
            f"{preset.path}: the preset sets [caption] and the dataset config sets {', '.join(clashing)} for a subset. "
            "Remove them from the dataset config: sdplug never applies both."
        )


def check_dataset_config(preset: Preset, path: str | None, defaults: Mapping[str, Any]) -> None:
    """The same check on the ``--dataset_config`` file itself, so it refuses before the model loads;
    a key written there is the user's, even at kohya's default value."""
    if not preset.caption or not path or not Path(path).is_file():
        return  # no file: kohya reports that itself
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return  # kohya's own reader reports a broken file
    tables = [("[general]", data.get("general", {}))]
    for i, dataset in enumerate(data.get("datasets", [])):
        tables.append((f"[[datasets]] {i + 1}", dataset))
        tables += [(f"[[datasets.subsets]] {i + 1}.{j + 1}", s) for j, s in enumerate(dataset.get("subsets", []))]
    clashing = [
        f"{key} = {table[key]!r} in {where}"
        for where, table in tables
        if isinstance(table, dict)
        for key in SUBSET_CAPTION_KEYS
        if key in table and user_set(key, table[key], defaults.get(key), written=table)
    ]
    if clashing:
        raise KohyaConflictError(
            f"{preset.path}: the preset sets [caption] and the dataset config {path} sets {', '.join(clashing)}. "
            "Remove them from the dataset config: sdplug never applies both."
        )


def reconcile(
    preset: Preset,
    version: str,
    values: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    script: str,
    lr: float | None,
    written: Collection[str] = (),
) -> Reconciliation:
    """The changes the preset makes to kohya's arguments (after ``check_conflicts``); ``lr`` is the
    lr of the optimizer the plan uses (None: kohya's lrs stay); ``written``: the names the user wrote."""
    result = Reconciliation()
    _memory(preset, values, script, result)
    if preset.caption and values.get("cache_text_encoder_outputs"):
        # cached outputs skip process_caption: only a dropout decision can still apply to them
        allowed = cached_text_caption_types()
        needs_text = [s.type for s in preset.caption if s.type not in allowed]
        if needs_text:
            raise KohyaConflictError(
                f"{preset.path}: [caption] {', '.join(needs_text)} rewrite the caption text, which "
                "--cache_text_encoder_outputs leaves no longer there (sd-scripts encodes each caption once). "
                f"Allowed with cached outputs: {', '.join(repr(t) for t in allowed)} only. Remove those transforms or "
                "--cache_text_encoder_outputs."
            )
        result.rules.append(
            "caption dropout on cached text-encoder outputs: a dropped sample gets the empty caption's outputs, "
            "encoded once by sd-scripts' own caching code"
        )
    workers = int(values.get("max_data_loader_n_workers", 0) or 0)
    if preset.caption and workers > 0:
        # caption decisions must be made (and audited) in this process, not in loader workers
        result.rules.append(f"--max_data_loader_n_workers {workers} -> 0 (caption transforms run in the main process)")
        result.changes.update(max_data_loader_n_workers=0, persistent_data_loader_workers=False)
    if preset.optimizer is not None and lr is not None:
        _learning_rates(version, values, lr, result)
    if preset.loss_weighting is not None:
        result.changes["min_snr_gamma"] = PresetWeightingMarker()
    _classify(preset, version, values, defaults, written, result)
    return result


def _memory(preset: Preset, values: Mapping[str, Any], script: str, result: Reconciliation) -> None:
    for key in ("gradient_checkpointing", "cache_latents", "cache_text_encoder_outputs"):
        if not section_set(preset, f"memory.{key}"):
            continue
        if key not in values:
            raise SdplugError(
                f"{preset.path}: memory.{key} = true, but {script} has no --{key} "
                "(sd-scripts caches text-encoder outputs in its SDXL scripts)."
                if key == "cache_text_encoder_outputs"
                else f"{preset.path}: memory.{key} = true, but {script} has no --{key}."
            )
        if not values[key]:
            result.changes[key] = True
            result.rules.append(f"--{key} on (preset [memory])")
    wanted = preset.memory.mixed_precision
    if wanted != "no" and values.get("mixed_precision", "no") != wanted:
        result.changes["mixed_precision"] = wanted  # a different explicit value was refused as a conflict
        result.rules.append(f"--mixed_precision {values.get('mixed_precision', 'no')} -> {wanted} (preset [memory])")


def _learning_rates(version: str, values: Mapping[str, Any], lr: float, result: Reconciliation) -> None:
    """The preset's lr in kohya's own lr arguments too, so its logs and saved metadata tell the
    truth; the optimizer hook still puts it on every parameter group."""
    changed = []
    names = [f.name for f in flags_for(version).values() if f.family == "optimizer" and f.kind == "reconciled"]
    for name in names:
        value = values.get(name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue  # unset: kohya falls back to --learning_rate
        # an lr of 0 is how kohya leaves a part untrained (it drops the group): keep it 0
        aligned = [lr if v else v for v in value] if isinstance(value, (list, tuple)) else (lr if value else value)
        if value != aligned:
            changed.append(f"--{name} {value} -> {lr}")
            result.changes[name] = aligned
    if changed:
        result.rules.append(f"{', '.join(changed)} (preset [optimizer] lr)")


def _classify(
    preset: Preset, version: str, values: Mapping[str, Any], defaults: Mapping[str, Any], written: Collection[str], result
) -> None:
    """For the audit: every trick-family flag the user set, and how it stands next to the preset."""
    table = flags_for(version)
    for name, value in values.items():
        if not user_set(name, value, defaults.get(name), written):
            continue
        flag = table.get(name)
        if flag is None:
            if host_setting_group(name) is None:
                result.unclassified.append(name)
            continue
        taken = [s for s in flag.sections if section_set(preset, s)]
        kind = flag.kind if taken else "independent"  # its sections unset: kohya does what it says
        why = flag.why
        if (
            (flag.kind == "reconciled" or flag.family == "memory") and flag.sections and not taken
        ):  # its why tells how the preset's value wins
            why = f"kohya's own value (the preset sets no {', '.join(flag.sections)})"
        result.flags[name] = f"{kind} ({flag.family}): {why}"
