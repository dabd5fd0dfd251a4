"""kohya sd-scripts ``--config_file`` <-> sdplug preset.

``from_kohya`` reads the keys kohya uses for the tricks sdplug carries and writes a preset;
``to_kohya`` writes kohya config keys for what kohya can do natively and lists what it cannot.
Both say what they could not carry over: nothing is dropped silently. What a kohya key means
comes from the adapter's flag table (``flags.py``): a trick key ``from_kohya`` does not
translate gets the table's reason as its note; keys that set no trick (paths, saving, ...)
stay in the kohya config without a note.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError
from sdplug.hosts.kohya import flow_bridge
from sdplug.hosts.kohya.flags import FLAGS, host_setting_group
from sdplug.hosts.kohya.flow_flags import FLOW_SCRIPTS, FLOW_TRICKS, flow_setting_group
from sdplug.hosts.kohya.version import SCRIPTS
from sdplug.params import field_names
from sdplug.preset import Preset, parse_preset
from sdplug.preset.files import tomllib

KOHYA_OPTIMIZERS = {
    "adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "pagedadamw8bit": "paged_adamw8bit",
    "lion8bit": "lion8bit",
    "adafactor": "adafactor",
    "bitsandbytes.optim.adamw8bit": "adamw8bit",
    "bitsandbytes.optim.pagedadamw8bit": "paged_adamw8bit",
    "bitsandbytes.optim.lion8bit": "lion8bit",
    "transformers.optimization.adafactor": "adafactor",
    "torch.optim.adamw": "adamw",
    "prodigy": "prodigy",
    "prodigyopt.prodigy": "prodigy",
    "dadaptadam": "dadapt_adam",
    "dadaptation.dadaptadam": "dadapt_adam",
    "adamwschedulefree": "adamw_schedulefree",
    "schedulefree.adamwschedulefree": "adamw_schedulefree",
    "came_pytorch.came": "came",
    "ademamix8bit": "ademamix8bit",
    "bitsandbytes.optim.ademamix8bit": "ademamix8bit",
}
TO_KOHYA_OPTIMIZER = {
    "adamw": "AdamW",
    "adamw8bit": "AdamW8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "lion8bit": "Lion8bit",
    "adafactor": "AdaFactor",
    "prodigy": "Prodigy",
    "dadapt_adam": "DAdaptAdam",
    "adamw_schedulefree": "AdamWScheduleFree",
    "came": "came_pytorch.CAME",
    "ademamix8bit": "bitsandbytes.optim.AdEMAMix8bit",
}


@dataclasses.dataclass
class Bridged:
    """A translation and the notes on what did not (exactly) carry over."""

    data: dict[str, Any]
    notes: list[str]


def read_kohya_config(path: Path) -> dict[str, Any]:
    """kohya's config file, flattened the way kohya reads it (tables merge into one namespace)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PresetError(f"cannot read the kohya config: {exc}", path=str(path)) from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _optimizer_args(values: list[str] | None, notes: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values or []:
        key, _, value = str(item).partition("=")
        key = key.strip()
        if key == "weight_decay":
            params["weight_decay"] = float(value)
        elif key == "betas":
            params["betas"] = [float(v) for v in value.replace("(", "").replace(")", "").split(",")]
        elif key == "eps":
            params["eps"] = float(value)
        else:
            notes.append(f"optimizer_args {item!r}: not carried over (sdplug's optimizer has no such parameter)")
    return params


class _Used(dict):
    """The kohya config, remembering which keys the translation read."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _untranslated(config: _Used) -> list[str]:
    """A note for every set key the translation did not read, from the flag tables."""
    table = {f.name: f for f in FLAGS}  # either version's row: the reason reads the same
    notes = []
    for key, value in dict(config).items():
        if key in config.read or value in (None, False, "", [], 0):
            continue
        flag = table.get(key)
        if flag is not None:
            verb = {"independent": "stays a kohya setting:", "reconciled": "not carried over; next to a preset it is"}
            notes.append(f"{key}: {verb.get(flag.kind, 'not carried over:')} {flag.why}")
        elif key in FLOW_TRICKS:
            notes.append(f"{key}: stays a kohya setting of the flow scripts: {FLOW_TRICKS[key]}")
        elif host_setting_group(key) is None and flow_setting_group(key) is None:
            notes.append(f"{key}: not carried over: not an argument of sd-scripts main or v0.8.7")
    return notes


def from_kohya(config: dict[str, Any], *, name: str = "from-kohya", script: str | None = None) -> Bridged:
    """The preset of a kohya config; ``script``: the script it is for, where it changes the
    config's meaning (sd-scripts' flow scripts, ``flow_bridge``)."""
    if script is not None and script not in (*SCRIPTS, *FLOW_SCRIPTS):
        raise PresetError(f"--script {script!r}: allowed: {', '.join((*SCRIPTS, *FLOW_SCRIPTS))}.")
    config = _Used(config)
    notes: list[str] = []
    preset: dict[str, Any] = {"preset": {"name": name, "description": "translated from a kohya sd-scripts config"}}
    noise: list[dict[str, Any]] = []
    if config.get("noise_offset"):
        offset: dict[str, Any] = {"type": "offset", "strength": float(config["noise_offset"])}
        if config.get("noise_offset_random_strength"):
            offset["random_strength"] = True
        if config.get("adaptive_noise_scale"):
            offset["adaptive_scale"] = float(config["adaptive_noise_scale"])
        noise.append(offset)
    if config.get("multires_noise_iterations"):
        # kohya's loop: intended sizes from level 0 (a second full-size Gaussian), added onto
        # the offset noise, then divided by the batch std: exactly the "kohya" variant
        noise.append(
            {
                "type": "pyramid",
                "variant": "kohya",
                "discount": float(config.get("multires_noise_discount", 0.3)),
                "iterations": int(config["multires_noise_iterations"]),
            }
        )
    if config.get("ip_noise_gamma"):
        perturbation: dict[str, Any] = {"type": "input_perturbation", "gamma": float(config["ip_noise_gamma"])}
        if config.get("ip_noise_gamma_random_strength"):
            perturbation["random_strength"] = True
        noise.append(perturbation)
    if noise:
        preset["noise"] = noise
    if config.get("min_timestep") is not None or config.get("max_timestep") is not None:
        timesteps: dict[str, Any] = {"type": "uniform"}
        if config.get("min_timestep") is not None:
            timesteps["min_timestep"] = int(config["min_timestep"])
        if config.get("max_timestep") is not None:
            timesteps["max_timestep"] = int(config["max_timestep"])
        preset["timesteps"] = timesteps
    weightings = []
    if config.get("min_snr_gamma"):
        weightings.append({"type": "min_snr", "gamma": float(config["min_snr_gamma"])})
    if config.get("debiased_estimation_loss"):
        weightings.append({"type": "debiased"})
        notes.append("debiased_estimation_loss: sdplug's v-prediction form is sqrt(SNR)/(SNR+1), kohya's is 1/(SNR+1)")
    if config.get("scale_v_pred_loss_like_noise_pred"):
        weightings.append({"type": "scale_v_pred_loss_like_noise_pred"})
    if config.get("v_pred_like_loss"):
        weightings.append({"type": "v_pred_like_loss", "strength": float(config["v_pred_like_loss"])})
    if len(weightings) > 1:
        notes.append(f"kohya multiplies {len(weightings)} weightings together; a preset has one: kept {weightings[0]['type']!r}")
    if weightings:
        preset["loss_weighting"] = weightings[0]
    _loss_from_kohya(config, preset, notes)
    captions = []
    if config.get("caption_dropout_rate") or config.get("caption_dropout_every_n_epochs"):
        entry: dict[str, Any] = {"type": "dropout", "rate": float(config.get("caption_dropout_rate") or 0.0)}
        if config.get("caption_dropout_every_n_epochs"):
            entry["every_n_epochs"] = int(config["caption_dropout_every_n_epochs"])
        captions.append(entry)
    keep = int(dict.get(config, "keep_tokens") or 0)  # carried over only with a shuffle or tag dropout
    if config.get("shuffle_caption"):
        captions.append({"type": "shuffle", "keep_tokens": keep})
        config.read.add("keep_tokens")
    if config.get("caption_tag_dropout_rate"):
        captions.append({"type": "tag_dropout", "rate": float(config["caption_tag_dropout_rate"]), "keep_tokens": keep})
        config.read.add("keep_tokens")
    if captions:
        preset["caption"] = captions
    if config.get("optimizer_type"):
        kind = str(config["optimizer_type"])
        chosen = KOHYA_OPTIMIZERS.get(kind.lower())
        if chosen is None:
            notes.append(f"optimizer_type {kind!r}: not carried over (sdplug's optimizers: {', '.join(TO_KOHYA_OPTIMIZER)})")
        else:
            optimizer: dict[str, Any] = {"type": chosen}
            if config.get("learning_rate") is not None:
                optimizer["lr"] = float(config["learning_rate"])
            optimizer.update(_optimizer_args(config.get("optimizer_args"), notes))
            preset["optimizer"] = optimizer
    if config.get("xformers"):
        preset["attention"] = {"type": "xformers"}
    elif config.get("sdpa"):
        preset["attention"] = {"type": "sdpa"}
    memory = {}
    for key in ("gradient_checkpointing", "cache_latents", "cache_text_encoder_outputs"):
        if config.get(key):
            memory[key] = True
    if config.get("mixed_precision") in ("fp16", "bf16"):
        memory["mixed_precision"] = config["mixed_precision"]
    if memory:
        preset["memory"] = memory
    if script in FLOW_SCRIPTS:
        flow_bridge.translate(config, script, preset, notes)
    return Bridged(preset, notes + _untranslated(config))


KOHYA_LOSS = {"l1": "l1", "huber": "pseudo_huber", "smooth_l1": "smooth_l1"}  # l2 is sdplug's default, mse


def _loss_from_kohya(config: Any, preset: dict[str, Any], notes: list[str]) -> None:
    """kohya's loss type and zero-terminal SNR (a ``[loss]`` and a ``[schedule]``)."""
    kind = str(config.get("loss_type") or "l2")
    if kind in KOHYA_LOSS:
        loss: dict[str, Any] = {"type": KOHYA_LOSS[kind]}
        if kind != "l1":
            loss["c"] = float(config.get("huber_c") or 0.1)
            loss["schedule"] = str(config.get("huber_schedule") or "snr")
            if loss["schedule"] != "snr" and config.get("huber_scale") is not None:  # kohya ignores it under snr
                loss["scale"] = float(config["huber_scale"])
        preset["loss"] = loss
    elif kind != "l2":
        notes.append(f"loss_type {kind!r}: not carried over (kohya's l2, l1, huber and smooth_l1 are)")
    if config.get("zero_terminal_snr"):
        preset["schedule"] = {"zero_terminal_snr": True}
        if not config.get("v_parameterization"):
            preset["schedule"]["epsilon_ok"] = True
            notes.append("zero_terminal_snr without v_parameterization: kohya trains epsilon at SNR 0; kept (epsilon_ok)")


# kohya's multires noise is the pyramid's "kohya" variant with kohya's fixed settings (scales
# drawn in [2, 4), the sum divided by the batch std), and only with those
KOHYA_MULTIRES = {"variant": "kohya", "normalize": "batch", "scale_min": 2.0, "scale_max": 4.0}
KOHYA_SEPARATOR = ","  # the tag separator of kohya's caption transforms
OPTIMIZER_ARGS = ("weight_decay", "betas", "eps")  # what optimizer_args carries (and from_kohya reads)


def to_kohya(preset: Preset, script: str | None = None) -> Bridged:
    """kohya config keys for what kohya does natively, and notes on what it cannot do.

    Every value is the strategy's own (``spec.create()``): a parameter the preset leaves out is
    written at the strategy's default, so the kohya config means what the preset means even where
    kohya's defaults differ (pyramid discount 0.8 against kohya's 0.3, Lion8bit's weight decay).
    The one exception is the optimizer's lr: without one in the preset, kohya's --learning_rate
    rules, as it does in the adapter."""
    if script is not None and script not in (*SCRIPTS, *FLOW_SCRIPTS):
        raise PresetError(f"--script {script!r}: allowed: {', '.join((*SCRIPTS, *FLOW_SCRIPTS))}.")
    config: dict[str, Any] = {}
    notes: list[str] = []
    for spec in preset.noise:
        _noise_to_kohya(spec, config, notes)
    flow = script in FLOW_SCRIPTS  # the flow scripts' sampler and loss notes come from flow_bridge
    if preset.timesteps is not None and not flow:
        if preset.timesteps.type == "uniform":
            timesteps = preset.timesteps.create()
            config["min_timestep"] = timesteps.min_timestep
            if timesteps.max_timestep is not None:  # None: up to the schedule's end, kohya's default too
                config["max_timestep"] = timesteps.max_timestep
        else:
            notes.append(f"timesteps {preset.timesteps.type!r}: kohya has no equivalent")
    if preset.loss_weighting is not None:
        kind = preset.loss_weighting.type
        if kind == "min_snr":
            config["min_snr_gamma"] = preset.loss_weighting.create().gamma
        elif kind == "debiased":
            config["debiased_estimation_loss"] = True
            notes.append("debiased: kohya's v-prediction form (1/(SNR+1)) differs from sdplug's (sqrt(SNR)/(SNR+1))")
        elif kind == "scale_v_pred_loss_like_noise_pred":
            config["scale_v_pred_loss_like_noise_pred"] = True
        elif kind == "v_pred_like_loss":
            config["v_pred_like_loss"] = preset.loss_weighting.create().strength
        elif kind == "snr":
            config["scale_v_pred_loss_like_noise_pred"] = True
            notes.append("snr: kohya's scale_v_pred_loss_like_noise_pred equals it for v-prediction models only")
        elif kind != "constant":
            notes.append(f"loss_weighting {kind!r}: kohya has no equivalent")
    if preset.loss is not None:
        loss = preset.loss.create()
        kohya = {v: k for k, v in KOHYA_LOSS.items()}.get(preset.loss.type, "l2" if preset.loss.type == "mse" else None)
        if kohya is None:
            notes.append(f"loss {preset.loss.type!r}: kohya has no equivalent")
        else:
            config["loss_type"] = kohya
            if kohya in ("huber", "smooth_l1"):
                config.update(huber_c=loss.c, huber_schedule=loss.schedule, huber_scale=loss.scale)
                if not flow:
                    notes.append("huber/smooth_l1: kohya v0.8.7 uses one threshold per batch; sdplug one per sample")
    if preset.schedule.zero_terminal_snr:
        config["zero_terminal_snr"] = True
    _caption_to_kohya(preset, config, notes)
    if preset.optimizer is not None:
        _optimizer_to_kohya(preset, config, notes)
    if preset.attention is not None:
        if preset.attention.type in ("xformers", "sdpa"):
            config[preset.attention.type] = True
        elif preset.attention.type != "default":
            notes.append(f"attention {preset.attention.type!r}: kohya has no equivalent")
    memory = preset.memory
    for key in ("gradient_checkpointing", "cache_latents", "cache_text_encoder_outputs"):
        if getattr(memory, key):
            config[key] = True
    if memory.mixed_precision != "no":
        config["mixed_precision"] = memory.mixed_precision
    if script in FLOW_SCRIPTS:
        flow_bridge.to_flow_script(preset, script, config, notes)
    return Bridged(config, notes)


def _noise_to_kohya(spec, config: dict[str, Any], notes: list[str]) -> None:
    if spec.type == "gaussian":
        return  # kohya's own noise
    noise = spec.create()
    if spec.type == "offset":
        config["noise_offset"] = noise.strength
        if noise.random_strength:
            config["noise_offset_random_strength"] = True
            notes.append("offset random_strength: kohya draws one strength per batch, sdplug one per sample")
        if noise.adaptive_scale:
            config["adaptive_noise_scale"] = noise.adaptive_scale
    elif spec.type == "pyramid" and all(getattr(noise, k) == v for k, v in KOHYA_MULTIRES.items()):
        config["multires_noise_iterations"] = noise.iterations
        config["multires_noise_discount"] = noise.discount
    elif spec.type == "input_perturbation":
        config["ip_noise_gamma"] = noise.gamma
        if noise.random_strength:
            config["ip_noise_gamma_random_strength"] = True
    else:
        notes.append(
            f"noise {spec.type!r} {dict(spec.params) or ''}: kohya has no equivalent (run it through sdplug's kohya adapter)"
        )


def _caption_to_kohya(preset: Preset, config: dict[str, Any], notes: list[str]) -> None:
    keep_tokens: dict[str, int] = {}
    for spec in preset.caption:
        caption = spec.create()
        if spec.type == "dropout" and caption.encoders:
            notes.append(
                f"caption 'dropout' of encoders {list(caption.encoders)}: kohya's SD scripts drop whole captions only "
                "(sd3_train_network.py has per-encoder rates: to-kohya --script sd3_train_network.py)"
            )
        elif spec.type == "dropout":
            config["caption_dropout_rate"] = caption.rate
            if caption.every_n_epochs:  # 0: every epoch, kohya's default too
                config["caption_dropout_every_n_epochs"] = caption.every_n_epochs
        elif spec.type == "shuffle":
            config["shuffle_caption"] = True
            keep_tokens[spec.type] = caption.keep_tokens
        elif spec.type == "tag_dropout":
            config["caption_tag_dropout_rate"] = caption.rate
            keep_tokens[spec.type] = caption.keep_tokens
        else:
            notes.append(f"caption {spec.type!r}: kohya has no equivalent")
        separator = getattr(caption, "separator", KOHYA_SEPARATOR)
        if separator != KOHYA_SEPARATOR:
            notes.append(f"caption {spec.type!r} separator {separator!r}: kohya splits on {KOHYA_SEPARATOR!r}")
    if keep_tokens:
        config["keep_tokens"] = max(keep_tokens.values())
        if len(set(keep_tokens.values())) > 1:
            notes.append(
                f"keep_tokens: kohya has one for its shuffle and tag dropout; the preset's differ ({keep_tokens}), "
                f"kept {config['keep_tokens']}"
            )


def _optimizer_to_kohya(preset: Preset, config: dict[str, Any], notes: list[str]) -> None:
    spec = preset.optimizer
    assert spec is not None  # called for presets with [optimizer]
    optimizer = spec.create()
    config["optimizer_type"] = TO_KOHYA_OPTIMIZER.get(spec.type, spec.type)
    if "lr" in spec.params:
        config["learning_rate"] = optimizer.lr
    fields = field_names(type(optimizer))
    args = []
    for key in (k for k in OPTIMIZER_ARGS if k in fields):
        value = getattr(optimizer, key)
        args.append(f"{key}=" + (",".join(str(v) for v in value) if key == "betas" else str(value)))
    if args:
        config["optimizer_args"] = args
    for key, value in spec.params.items():
        if key != "lr" and key not in OPTIMIZER_ARGS:
            notes.append(f"optimizer {key} = {value}: not expressible in kohya's config")
    if preset.optimizer_fallback is not None:
        notes.append("optimizer.fallback: kohya has no fallback")


def preset_from_kohya_file(path: Path, script: str | None = None) -> tuple[Preset, Bridged]:
    bridged = from_kohya(read_kohya_config(path), name=Path(path).stem, script=script)
    return parse_preset(bridged.data, path=str(path)), bridged
