"""The ``ss_*`` metadata of every network file sd-scripts saves, made to say what trained.

sd-scripts writes its training arguments into each saved network's metadata (train_network.py's
``metadata``: ``ss_loss_type``, ``ss_min_snr_gamma``, ``ss_shuffle_caption``, ...), and UIs and
model sites show and search them. A preset section replaces kohya's trick and refuses kohya's
flags for it, so kohya would describe its own defaults (``ss_loss_type = l2`` under a preset's
smooth-L1) or the adapter's weighting marker (``ss_min_snr_gamma = sdplug-preset-weighting``).
At save time (``network_saves``), every key a preset section replaced is rewritten to what ran:

- kohya's own value for the strategy, where kohya has the same trick (the config bridge's
  ``to_kohya``: ``ss_loss_type = smooth_l1`` with its ``ss_huber_c``, ``ss_min_snr_gamma = 5.0``,
  ``ss_shuffle_caption = True``, ...);
- ``sdplug:<type>`` for a loss kohya has no name for (``ss_loss_type`` always names a loss);
- otherwise kohya's "did not run" value, which kohya wrote itself (the flag was refused, so it
  stayed at its default); ``ss_min_snr_gamma`` becomes ``None`` in place of the marker.

The per-subset ``shuffle_caption`` / ``keep_tokens`` inside ``ss_datasets`` (``--dataset_config``
runs) are rewritten alike. ``ss_sdplug_preset`` (JSON) names the preset, the keys it set and
each section it ran; the resolved preset itself is in ``sdplug_preset`` (the model-spec hook).
Only keys kohya wrote are touched: ``--no_metadata`` (the minimum keys) gets nothing added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdplug.hosts.host_flags import section_set
from sdplug.hosts.kohya.config_bridge import to_kohya
from sdplug.hosts.kohya.network_saves import Save, wrap_saves
from sdplug.preset import Preset
from sdplug.preset.model import LIST_SECTIONS, SINGLE_SECTIONS

_NOISE = ("noise", "timesteps")  # sdplug's noise hook replaces kohya's whole noise function for either

# kohya flag -> (its key in the saved metadata, the preset sections that replace kohya's trick)
METADATA_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "noise_offset": ("ss_noise_offset", _NOISE),
    "noise_offset_random_strength": ("ss_noise_offset_random_strength", _NOISE),
    "adaptive_noise_scale": ("ss_adaptive_noise_scale", _NOISE),
    "multires_noise_iterations": ("ss_multires_noise_iterations", _NOISE),
    "multires_noise_discount": ("ss_multires_noise_discount", _NOISE),
    "ip_noise_gamma": ("ss_ip_noise_gamma", _NOISE),
    "ip_noise_gamma_random_strength": ("ss_ip_noise_gamma_random_strength", _NOISE),
    "min_snr_gamma": ("ss_min_snr_gamma", ("loss_weighting",)),
    "debiased_estimation_loss": ("ss_debiased_estimation", ("loss_weighting",)),
    "loss_type": ("ss_loss_type", ("loss",)),
    "huber_c": ("ss_huber_c", ("loss",)),
    "huber_schedule": ("ss_huber_schedule", ("loss",)),
    "huber_scale": ("ss_huber_scale", ("loss",)),
    "caption_dropout_rate": ("ss_caption_dropout_rate", ("caption",)),
    "caption_dropout_every_n_epochs": ("ss_caption_dropout_every_n_epochs", ("caption",)),
    "caption_tag_dropout_rate": ("ss_caption_tag_dropout_rate", ("caption",)),
    "shuffle_caption": ("ss_shuffle_caption", ("caption",)),
    "keep_tokens": ("ss_keep_tokens", ("caption",)),
}
SUBSET_KEYS = ("shuffle_caption", "keep_tokens")  # per subset in ss_datasets, under the flag's name
DESCRIPTION_KEY = "ss_sdplug_preset"
_KOHYAS = object()  # the key keeps the value kohya wrote


def _what_ran(flag: str, native: Mapping[str, Any], preset: Preset) -> Any:
    if flag in native:
        return native[flag]
    if flag == "loss_type":
        assert preset.loss is not None  # only with [loss]
        return f"sdplug:{preset.loss.type}"
    if flag == "min_snr_gamma":
        return None  # kohya's min-SNR did not run; its value there is the adapter's marker
    return _KOHYAS


def replaced(preset: Preset) -> dict[str, Any]:
    """kohya flag -> the value that says what ran, for every flag a set preset section replaced."""
    native = to_kohya(preset).data
    return {
        flag: _what_ran(flag, native, preset)
        for flag, (_, sections) in METADATA_KEYS.items()
        if any(section_set(preset, s) for s in sections)
    }


def _sections(preset: Preset) -> dict[str, Any]:
    ran: dict[str, Any] = {}
    for family in (*LIST_SECTIONS, *SINGLE_SECTIONS):
        value = getattr(preset, family)
        specs = value if isinstance(value, tuple) else (() if value is None else (value,))
        if specs:
            ran[family] = [spec.to_table() for spec in specs]
    return ran


def corrected_metadata(metadata: Mapping[str, str], preset: Preset, values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A copy of kohya's metadata whose ``ss_*`` keys say what the preset ran (only keys kohya
    wrote); ``values``: ``replaced(preset)``, when already computed."""
    fixed = dict(metadata)
    values = replaced(preset) if values is None else values
    set_keys = []
    for flag, value in values.items():
        key = METADATA_KEYS[flag][0]
        if key not in fixed:
            continue
        set_keys.append(key)
        if value is not _KOHYAS:
            fixed[key] = str(value)  # kohya writes every value as str()
    if "ss_datasets" in fixed:
        fixed["ss_datasets"] = _corrected_datasets(fixed["ss_datasets"], values)
    fixed[DESCRIPTION_KEY] = json.dumps({"name": preset.name, "set_keys": sorted(set_keys), "sections": _sections(preset)})
    return fixed


def _corrected_datasets(text: str, values: Mapping[str, Any]) -> str:
    """``ss_datasets`` (JSON) with each subset's caption keys saying what ran."""
    try:
        datasets = json.loads(text)
    except ValueError:
        return text  # not kohya's JSON: nothing known to correct
    for dataset in datasets if isinstance(datasets, list) else ():
        for subset in dataset.get("subsets", ()) if isinstance(dataset, dict) else ():
            for key in SUBSET_KEYS:
                if key in subset and values.get(key, _KOHYAS) is not _KOHYAS:
                    subset[key] = values[key]
    return json.dumps(datasets)


def install(adapter: Any, args: Any) -> None:
    """At configure time, before the script builds its network (network scripts only)."""
    module_name = getattr(args, "network_module", None)
    if not module_name or getattr(args, "no_metadata", False):
        return  # whole models carry no ss_* keys; --no_metadata saves only kohya's minimum keys
    preset = adapter.preset
    values = replaced(preset)  # now, before training: nothing is left to fail at the first save
    wrap_saves(adapter, module_name, lambda network, save: _corrected_save(preset, values, save))


def _corrected_save(preset: Preset, values: Mapping[str, Any], original: Save) -> Save:
    def save_weights(file, dtype, metadata):
        original(file, dtype, None if metadata is None else corrected_metadata(metadata, preset, values))

    return save_weights
