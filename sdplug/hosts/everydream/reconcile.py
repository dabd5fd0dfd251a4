"""EveryDream2's settings against a preset, before the dataset and optimizer are built.

Pure: the settings (train.json merged with the command line, as EveryDream2's ``args`` holds
them) and their defaults in, an error or the changes out; what each key means next to a preset
comes from the table in ``flags.py`` alone. The plugin applies the changes to EveryDream2's
``args`` (the closure and the dataset read them after the plugin is built), prints the rules
and writes them into ``audit.json`` (``host.rules``, ``host.everydream_keys``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sdplug.errors import SdplugError
from sdplug.hosts.everydream.flags import CARRIED, KEYS
from sdplug.hosts.host_flags import HostFlag, is_set, section_set
from sdplug.preset import Preset


class EverydreamConflictError(SdplugError):
    """EveryDream2's settings and the preset both set one trick, or the preset sets what the
    plugin cannot reach inside EveryDream2."""


@dataclasses.dataclass
class Reconciliation:
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)  # args.<key> -> value
    rules: list[str] = dataclasses.field(default_factory=list)
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # trick key -> how it stood
    enable_gradient_checkpointing: bool = False  # [memory] asks for it and EveryDream2 has it off


def _is_off(key: HostFlag, value: Any) -> bool:
    """EveryDream2 does not do the trick (0 pyramid discount and 0 dropout are off there too)."""
    if key.off == "keep":
        return False
    return value == key.off or value is None or value is False or value == 0


def _section(preset: Preset, key: HostFlag) -> str | None:
    return next((s for s in key.sections if section_set(preset, s)), None)


def reconcile(
    preset: Preset, values: Mapping[str, Any], defaults: Mapping[str, Any], *, loss_reachable: bool = False
) -> Reconciliation:
    """The changes to EveryDream2's settings, or ``EverydreamConflictError`` naming every clash."""
    result = Reconciliation()
    clashes: list[str] = []
    for key in KEYS:
        value, default = values.get(key.name, key.default), defaults.get(key.name, key.default)
        section = _section(preset, key)
        if section is None:
            if key.name in CARRIED and (preset.noise or preset.loss_weighting):
                result.keys[key.name] = f"carried into the plan's uniform timestep draw ({value})"
            elif not _is_off(key, value) and value not in (None, False) and key.name not in CARRIED:
                result.keys[key.name] = "EveryDream2's own (the preset does not set it)"
            continue
        label = f"[{section}]" if not section.startswith("memory.") else f"{section} = true"
        if key.name == "gradient_checkpointing":
            result.enable_gradient_checkpointing = not value
            result.keys[key.name] = "on (preset [memory])"
            if not value:
                result.rules.append("gradient checkpointing -> on for the UNet and text encoder (preset [memory])")
            continue
        if key.name == "loss_type" and not loss_reachable:
            continue  # refused below with the section, whatever loss_type says
        if key.off == "keep":
            if is_set(value, default):
                clashes.append(f"the preset sets {label} and EveryDream2 sets {key.name} = {value!r} ({key.why})")
            else:
                result.keys[key.name] = f"replaced by the preset's {label}"
            continue
        if _is_off(key, value):
            result.keys[key.name] = "off"
        elif not is_set(value, default):
            result.changes[key.name] = key.off
            result.keys[key.name] = "switched off"
            result.rules.append(
                f"EveryDream2 {key.name} = {value!r} (its default) -> {key.off!r}: the preset's {label} replaces {key.why}"
            )
        else:
            clashes.append(f"the preset sets {label} and EveryDream2 sets {key.name} = {value!r} ({key.why})")
    clashes += unreachable(preset, values, loss_reachable=loss_reachable)
    if clashes:
        raise EverydreamConflictError(
            f"{preset.path}: {'; '.join(clashes)}. Remove the key(s) from train.json (or the command line) or the "
            "section(s) from the preset: sdplug never applies both, nor part of a preset."
        )
    return result


def unreachable(preset: Preset, values: Mapping[str, Any], *, loss_reachable: bool) -> list[str]:
    """What the preset sets that an unpatched EveryDream2 cannot be made to do from a plugin."""
    found = []
    if preset.loss is not None and not loss_reachable:
        found.append(
            f"the preset sets [loss] {preset.loss.type!r}, and EveryDream2 computes its loss itself (its loss_type "
            f"{values.get('loss_type', 'mse_huber')!r}); `sdplug patch everydream DIR` routes it through the preset"
        )
    weighting = preset.loss_weighting
    if weighting is not None and weighting.type == "learned":
        found.append(
            "the preset sets [loss_weighting] 'learned', whose loss is not the plain loss times a weight, so it cannot "
            "reach EveryDream2 through the batch's loss_scale"
        )
    precision = preset.memory.mixed_precision
    amp = not values.get("disable_amp", False)
    if precision == "bf16" or (precision == "fp16" and not amp):
        found.append(
            f"the preset sets memory.mixed_precision = {precision!r}, and EveryDream2 sets its precision before any "
            f"plugin runs ({'fp16 autocast' if amp else 'fp32: disable_amp'}); set it in train.json"
        )
    for name in ("cache_latents", "cache_text_encoder_outputs"):
        if getattr(preset.memory, name):
            found.append(f"the preset sets memory.{name} = true, which EveryDream2 has no way to do")
    if preset.schedule.zero_terminal_snr and not values.get("enable_zero_terminal_snr"):
        found.append(
            "the preset sets schedule.zero_terminal_snr = true, and EveryDream2 built its noise scheduler before any "
            'plugin runs; set "enable_zero_terminal_snr": true in train.json'
        )
    if preset.ema.decay is not None:
        found.append("the preset sets [ema]; inside EveryDream2 use its own ema_decay_rate instead")
    return found
