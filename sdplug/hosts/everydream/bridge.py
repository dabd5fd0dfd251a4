"""EveryDream2 ``train.json`` <-> sdplug preset: ``sdplug from-everydream`` / ``to-everydream``.

``from_everydream`` reads EveryDream2's trick keys -- at their effective values, so a train.json
without ``cond_dropout`` carries EveryDream2's default 0.04 -- and writes a preset; ``to_everydream``
writes the train.json keys for what EveryDream2 does natively and lists what it cannot. Both say
what did not (exactly) carry over: nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError
from sdplug.hosts.everydream.flags import BY_NAME
from sdplug.hosts.kohya.config_bridge import Bridged
from sdplug.preset import Preset

ATTENTION = {"sdp": "sdpa", "xformers": "xformers", "slice": "sliced"}
OPTIMIZERS = {
    "adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "lion8bit": "lion8bit",
    "prodigy": "prodigy",
    "dadapt_adam": "dadapt_adam",
    "adafactor": "adafactor",
    "came": "came",
}


def read_train_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PresetError(f"cannot read EveryDream2's train.json: {exc}", path=str(path)) from None
    if not isinstance(data, dict):
        raise PresetError("EveryDream2's train.json must hold one JSON object of settings.", path=str(path))
    return data


def _value(config: dict[str, Any], name: str) -> Any:
    return config.get(name, BY_NAME[name].default if name in BY_NAME else None)


def from_everydream(config: dict[str, Any], *, name: str = "from-everydream", optimizer: dict | None = None) -> Bridged:
    """A preset from a train.json's settings (``optimizer``: its optimizer.json, when readable)."""
    notes: list[str] = []
    preset: dict[str, Any] = {"preset": {"name": name, "description": "translated from an EveryDream2 train.json"}}
    noise: list[dict[str, Any]] = []
    if float(_value(config, "zero_frequency_noise_ratio") or 0) > 0:  # EveryDream2's offset noise
        noise.append({"type": "offset", "strength": float(_value(config, "zero_frequency_noise_ratio"))})
    if config.get("pyramid_noise_discount"):  # EveryDream2 runs the article's loop as published
        noise.append({"type": "pyramid", "variant": "seed-exact", "discount": float(config["pyramid_noise_discount"])})
    if noise:
        preset["noise"] = noise
    start, end = int(_value(config, "timestep_start")), int(_value(config, "timestep_end"))
    if (start, end) != (0, 1000):
        preset["timesteps"] = {"type": "uniform", "min_timestep": start, "max_timestep": end}
    if config.get("min_snr_gamma"):
        preset["loss_weighting"] = {"type": "min_snr", "gamma": float(config["min_snr_gamma"])}
        notes.append("min_snr_gamma: EveryDream2 applies the epsilon form to every model; sdplug's is right for v-prediction too")
    loss = str(_value(config, "loss_type"))
    if loss == "huber":
        preset["loss"] = {"type": "huber"}
    elif loss != "mse":
        notes.append(
            f"loss_type {loss!r}: EveryDream2's timestep blend of MSE and Huber has no sdplug loss type (sdplug uses mse)"
        )
    captions: list[dict[str, Any]] = []
    if float(_value(config, "cond_dropout") or 0) > 0:
        captions.append({"type": "dropout", "rate": float(_value(config, "cond_dropout"))})
    if config.get("shuffle_tags"):
        captions.append({"type": "shuffle", "keep_tokens": int(config.get("keep_tags") or 0)})
    if captions:
        preset["caption"] = captions
    attention = str(_value(config, "attn_type"))
    if attention != "sdp":
        preset["attention"] = {"type": ATTENTION.get(attention, attention)}
    if config.get("gradient_checkpointing"):
        preset["memory"] = {"gradient_checkpointing": True}
    if config.get("enable_zero_terminal_snr"):
        preset["schedule"] = {"zero_terminal_snr": True}
    if config.get("ema_decay_rate"):
        preset["ema"] = {"decay": float(config["ema_decay_rate"]), "update_every": int(config.get("ema_update_interval") or 500)}
        notes.append("ema: EveryDream2 updates its average every ema_update_interval steps (default 500), as carried here")
    base = (optimizer or {}).get("base", {})
    if base.get("optimizer"):
        kind = str(base["optimizer"])
        if kind in OPTIMIZERS:
            preset["optimizer"] = {"type": OPTIMIZERS[kind], **({"lr": float(base["lr"])} if base.get("lr") else {})}
        else:
            notes.append(f"optimizer {kind!r} (optimizer.json): not carried over (sdplug has {', '.join(OPTIMIZERS)})")
    return Bridged(preset, notes)


def to_everydream(preset: Preset) -> Bridged:
    """train.json keys for what EveryDream2 does natively; EveryDream2's own defaults are written
    off where the preset does not ask for them (its 0.04 dropout and 0.02 offset would otherwise run)."""
    config: dict[str, Any] = {"cond_dropout": 0.0, "zero_frequency_noise_ratio": 0.0}
    notes: list[str] = []
    for spec in preset.noise:
        strategy = spec.create()
        if spec.type == "offset" and not (strategy.random_strength or strategy.adaptive_scale):
            config["zero_frequency_noise_ratio"] = strategy.strength
        elif spec.type == "pyramid":
            config["pyramid_noise_discount"] = strategy.discount
            if strategy.variant != "seed-exact":
                notes.append(f"pyramid variant {strategy.variant!r}: EveryDream2 runs only the article's loop ('seed-exact')")
        elif spec.type != "gaussian":
            notes.append(f"noise {spec.type!r}: EveryDream2 has no equivalent (use the sdplug plugin)")
    if preset.timesteps is not None:
        if preset.timesteps.type == "uniform":
            timesteps = preset.timesteps.create()
            config["timestep_start"] = timesteps.min_timestep
            config["timestep_end"] = timesteps.max_timestep if timesteps.max_timestep is not None else 1000
        else:
            notes.append(f"timesteps {preset.timesteps.type!r}: EveryDream2 has no equivalent")
    if preset.loss_weighting is not None:
        if preset.loss_weighting.type == "min_snr":
            config["min_snr_gamma"] = preset.loss_weighting.create().gamma
            notes.append("min_snr: EveryDream2's form is right for epsilon models only")
        elif preset.loss_weighting.type != "constant":
            notes.append(f"loss_weighting {preset.loss_weighting.type!r}: EveryDream2 has no equivalent")
    loss = preset.loss.type if preset.loss is not None else "mse"
    if loss in ("mse", "huber"):
        config["loss_type"] = loss
    else:
        notes.append(f"loss {loss!r}: EveryDream2 has no equivalent")
    for spec in preset.caption:
        if spec.type == "dropout":
            dropout = spec.create()
            config["cond_dropout"] = dropout.rate
            if getattr(dropout, "every_n_epochs", 1) not in (None, 1):
                notes.append("caption dropout every_n_epochs: EveryDream2 drops in every epoch")
        elif spec.type == "shuffle":
            config.update(shuffle_tags=True, keep_tags=spec.create().keep_tokens)
        else:
            notes.append(f"caption {spec.type!r}: EveryDream2 has no equivalent")
    if preset.attention is not None:
        native = {v: k for k, v in ATTENTION.items()}.get(preset.attention.type)
        if native is None:
            notes.append(f"attention {preset.attention.type!r}: EveryDream2 has no equivalent")
        else:
            config["attn_type"] = native
    if preset.memory.gradient_checkpointing:
        config["gradient_checkpointing"] = True
    if preset.schedule.zero_terminal_snr:
        config["enable_zero_terminal_snr"] = True
    if preset.ema.decay is not None:
        config.update(ema_decay_rate=preset.ema.decay, ema_update_interval=preset.ema.update_every)
    if preset.optimizer is not None:
        notes.append(
            f"optimizer {preset.optimizer.type!r}: EveryDream2 reads it from optimizer.json ('base': "
            f"{{'optimizer': {preset.optimizer.type!r}, 'lr': {preset.optimizer.create().lr}}})"
        )
    return Bridged(config, notes)
