"""``sdplug from-kohya --script FLOW_SCRIPT``: a kohya config of one of sd-scripts' flow scripts,
read as that script reads it.

The generic translation (``config_bridge.from_kohya``) reads the SD scripts' meaning of every
key. A flow script draws sigma its own way and ignores many of those keys
(``flow_flags.SCRIPT_EFFECTS``), so this module, given the script:

- translates ``--timestep_sampling`` with its parameters into ``[timesteps]`` and ``[schedule]``:
  ``uniform`` -> uniform; ``sigmoid`` -> logit_normal(0, sigmoid_scale); ``shift`` -> that with
  ``flow_shift = discrete_flow_shift``; ``flux_shift`` -> that with ``dynamic_shift``; Lumina's
  ``nextdit_shift`` -> uniform with ``dynamic_shift``; ``sigma`` -> ``--weighting_scheme``'s
  density (logit_normal, mode; uniform otherwise) over the scheduler's table shifted by
  ``discrete_flow_shift``. That table descends, so a position ``u`` lands on sigma ``1 - u``
  (shifted): ``logit_mean`` changes sign (the mode law is symmetric). SD3 draws ``u`` as sigma
  itself, shifted by ``training_shift``, over ``[min_timestep, max_timestep]``;
- translates an acting ``sigma_sqrt`` / ``cosmap`` weighting into ``[loss_weighting]``, and SD3's
  per-encoder dropout rates into caption dropouts naming their encoder;
- keeps what the script ignored but the user asked for (noise offset, min-SNR, ...) and says so:
  the preset applies it, in its flow form where it has one; drops zero-terminal SNR (a flow's
  sigma = 1 is pure noise, and a flow plan refuses it) with a note.
"""

from __future__ import annotations

from typing import Any

from sdplug.hosts.flow_density import density_timesteps
from sdplug.hosts.kohya.flow_flags import ANIMA, FLOW_TRICKS, LUMINA, MODEL_PATCH, SCRIPT_DEFAULTS, SD3, effects_for

# the flow keys the translation reads (model_prediction_type and guidance_scale stay kohya's)
READ = (
    "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "training_shift", "weighting_scheme", "logit_mean",
    "logit_std", "mode_scale", "model_prediction_type",
)  # fmt: skip
# the encoders of SD3's per-encoder dropout flags, by the names sdplug's flow hosts give them
SD3_ENCODER_DROPOUT = {"clip_l_dropout_rate": "clip_l", "clip_g_dropout_rate": "clip_g", "t5_dropout_rate": "t5xxl"}


def translate(config: Any, script: str, preset: dict[str, Any], notes: list[str]) -> None:
    """Rewrite ``preset`` (the generic translation of ``config``) as ``script`` reads the config."""
    arguments = {**SCRIPT_DEFAULTS[script], **dict(config)}
    for key in (*READ, *SD3_ENCODER_DROPOUT):
        config.get(key)  # read here: no "not carried over" note for them
    for key in sorted(k for k, v in dict(config).items() if v not in (None, False, "", [], 0)):
        for row in effects_for(script, key):
            if row.holds(script, arguments) and key != "zero_terminal_snr":
                done = "ignored it" if row.effect == "ignored" else "fails on it"
                notes.append(f"{key}: {script} {done}: {row.why}; the preset applies it")
                break
    preset.pop("timesteps", None)
    schedule = preset.setdefault("schedule", {})
    if schedule.pop("zero_terminal_snr", None):
        schedule.pop("epsilon_ok", None)
        notes[:] = [n for n in notes if not n.startswith("zero_terminal_snr")]  # the DDPM reading's note
        notes.append("zero_terminal_snr: dropped: a rectified flow's sigma = 1 is pure noise already")
    if script == SD3:
        sd3_timesteps(config, arguments, preset, schedule, notes)
        _sd3_encoder_dropout(config, preset, notes)
    else:
        sampled_timesteps(script, arguments, preset, schedule, notes)
    if not schedule:
        del preset["schedule"]
    scheme = arguments.get("weighting_scheme")
    weighting_acts = script in (SD3, ANIMA) or arguments.get("model_prediction_type") == "sigma_scaled"
    if scheme in ("sigma_sqrt", "cosmap") and weighting_acts:
        replaced = preset.get("loss_weighting", {}).get("type")
        if replaced:
            notes.append(f"{replaced}: {script} ignored it; its --weighting_scheme {scheme} is the weighting kept")
        preset["loss_weighting"] = {"type": scheme}
    if "model_prediction_type" in config and script not in (SD3, ANIMA):
        notes.append(
            f"model_prediction_type {config['model_prediction_type']}: stays a kohya setting: {FLOW_TRICKS['model_prediction_type']}"
        )


def sampled_timesteps(script: str, a: dict[str, Any], preset: dict[str, Any], schedule: dict[str, Any], notes: list[str]) -> None:
    """``--timestep_sampling`` (and what it reads, ``a``) as ``[timesteps]`` in ``preset`` and a
    shift in ``schedule``: flux, lumina, hunyuan and anima (SD3 draws through its weighting scheme)."""
    sampling, scale = a.get("timestep_sampling"), float(a.get("sigmoid_scale") or 1.0)
    if sampling == "uniform":
        preset["timesteps"] = {"type": "uniform"}
    elif sampling in ("sigmoid", "shift", "flux_shift"):
        preset["timesteps"] = {"type": "logit_normal", "mean": 0.0, "std": scale}
        if sampling == "shift" and float(a.get("discrete_flow_shift") or 1.0) != 1.0:
            schedule["flow_shift"] = float(a["discrete_flow_shift"])
        if sampling == "flux_shift":
            schedule["dynamic_shift"] = True
            _count_note(script, notes)
    elif sampling == "nextdit_shift" and script == LUMINA:
        preset["timesteps"] = {"type": "uniform"}
        schedule["dynamic_shift"] = True
    else:  # sigma: the weighting scheme's density over the scheduler's descending, shifted table
        preset["timesteps"] = density_timesteps(a, flip=True)
        if float(a.get("discrete_flow_shift") or 1.0) != 1.0:
            schedule["flow_shift"] = float(a["discrete_flow_shift"])
        if a.get("weighting_scheme") == "logit_normal" and float(a.get("logit_mean") or 0.0) != 0.0:
            notes.append(
                f"logit_mean {a['logit_mean']}: mean {-float(a['logit_mean'])} in the preset: {script}'s sigma sampling "
                "indexes a descending table, so its u lands on sigma 1 - u"
            )


def sd3_timesteps(config: Any, a: dict[str, Any], preset: dict[str, Any], schedule: dict[str, Any], notes: list[str]) -> None:
    timesteps = density_timesteps(a, flip=False)
    for key in ("min_timestep", "max_timestep"):
        if config.get(key) is not None:
            if timesteps["type"] == "uniform":
                timesteps[key] = int(config[key])
            else:
                notes.append(f"{key}: not carried over: sdplug's {timesteps['type']} timesteps span the whole schedule")
    preset["timesteps"] = timesteps
    if float(a.get("training_shift") or 1.0) != 1.0:
        schedule["flow_shift"] = float(a["training_shift"])


def _sd3_encoder_dropout(config: Any, preset: dict[str, Any], notes: list[str]) -> None:
    """SD3's per-encoder rates, each a caption dropout naming its encoder."""
    for key, encoder in SD3_ENCODER_DROPOUT.items():
        if config.get(key):
            preset.setdefault("caption", []).append({"type": "dropout", "rate": float(config[key]), "encoders": [encoder]})
            notes.append(f"{key}: kohya zeroes a dropped encoder's output; sdplug's hosts give it the empty caption's encoding")


def to_flow_script(preset: Any, script: str, config: dict[str, Any], notes: list[str]) -> None:
    """Rewrite ``config`` (the SD scripts' keys for ``preset``) as ``script`` reads its keys: drop
    what it ignores (with a note), write its sampler, shift, weighting and per-encoder dropout."""
    arguments = {**SCRIPT_DEFAULTS[script], **config}
    for key in sorted(config):
        for row in effects_for(script, key):
            if row.holds(script, arguments) and key in config:
                if row.effect == "fails":  # the loss type and its threshold: none of it can be written
                    notes.append(f"loss {preset.loss.type!r}: {script} fails on it ({row.why}); not written")
                    for name in ("loss_type", "huber_c", "huber_schedule", "huber_scale"):
                        config.pop(name, None)
                else:
                    notes.append(f"{key}: {script} ignores it ({row.why}); not written")
                    del config[key]
                break
    if preset.timesteps is not None or preset.schedule.flow_shift != 1.0 or preset.schedule.dynamic_shift:
        if script == SD3:
            _sd3_sampler(preset, config, notes)
        else:
            _flow_sampler(preset, script, config, notes)
    if script == "flux_train_network.py":
        config["model_prediction_type"] = "raw"  # the velocity compared with noise - x0, as sdplug's plan compares it
    weighting = preset.loss_weighting.type if preset.loss_weighting is not None else None
    if weighting in ("sigma_sqrt", "cosmap"):
        if script in (SD3, ANIMA) and config.get("weighting_scheme", "uniform") == "uniform":
            config["weighting_scheme"] = weighting
        else:
            notes.append(
                f"loss_weighting {weighting!r}: {script} applies it only through --weighting_scheme, which here either "
                "draws the timesteps already or needs --model_prediction_type sigma_scaled (compared with the velocity "
                "target there): not written"
            )
    for spec in preset.caption:
        encoders = spec.params.get("encoders")
        if spec.type == "dropout" and encoders:
            by_encoder = {encoder: key for key, encoder in SD3_ENCODER_DROPOUT.items()}
            if script == SD3 and all(e in by_encoder for e in encoders):
                for encoder in encoders:
                    config[by_encoder[encoder]] = spec.create().rate
                notes.append("per-encoder dropout: kohya zeroes a dropped encoder's output, sdplug's hosts encode ''")
            else:
                notes.append(f"caption dropout of encoders {encoders}: {script} has no per-encoder dropout")


def _flow_sampler(preset: Any, script: str, config: dict[str, Any], notes: list[str]) -> None:
    """kohya's ``--timestep_sampling`` (and shift) for the preset's timesteps on flux/lumina/hunyuan/anima."""
    spec, schedule = preset.timesteps, preset.schedule
    kind = spec.type if spec is not None else "uniform"
    params: Any = spec.create() if spec is not None else None
    shift = schedule.flow_shift
    if schedule.dynamic_shift and not _default_dynamic_shift(schedule, script):
        notes.append(
            "dynamic_shift: kohya's flux_shift has FLUX's fixed 0.5 / 1.15 at 256 / 4096 tokens of 2x2 patches; not written"
        )
        return
    if kind == "uniform" and getattr(params, "shift", 1.0) == 1.0 and (params is None or params.max_timestep is None):
        if schedule.dynamic_shift:
            if script != LUMINA:
                notes.append(f"uniform timesteps with dynamic_shift: {script} has no such sampler (Lumina: nextdit_shift)")
                return
            config["timestep_sampling"] = "nextdit_shift"
        elif shift == 1.0:
            config["timestep_sampling"] = "uniform"
        else:  # sigma sampling: uniform u over the scheduler's table, shifted
            config.update(timestep_sampling="sigma", weighting_scheme="uniform", discrete_flow_shift=shift)
    elif kind == "logit_normal" and params.shift == 1.0 and params.mean == 0.0:
        config["sigmoid_scale"] = params.std
        if schedule.dynamic_shift:
            config["timestep_sampling"] = "flux_shift"
        elif shift == 1.0:
            config["timestep_sampling"] = "sigmoid"
        else:
            config.update(timestep_sampling="shift", discrete_flow_shift=shift)
    elif kind in ("logit_normal", "mode") and getattr(params, "shift", 1.0) == 1.0 and not schedule.dynamic_shift:
        # sigma sampling indexes the descending table: a position u lands on 1 - u (mode's law is symmetric)
        config.update(timestep_sampling="sigma", weighting_scheme=kind, discrete_flow_shift=shift)
        if kind == "logit_normal":
            config.update(logit_mean=-params.mean, logit_std=params.std)
        else:
            config["mode_scale"] = params.scale
    else:
        notes.append(f"timesteps {kind!r} {dict(spec.params) if spec else ''}: {script} has no equivalent sampler")


def _sd3_sampler(preset: Any, config: dict[str, Any], notes: list[str]) -> None:
    spec, schedule = preset.timesteps, preset.schedule
    kind = spec.type if spec is not None else "uniform"
    params: Any = spec.create() if spec is not None else None
    if schedule.dynamic_shift or getattr(params, "shift", 1.0) != 1.0 or kind not in ("uniform", "logit_normal", "mode"):
        notes.append(f"timesteps {kind!r} with this shift: sd3_train_network.py has no equivalent sampler")
        return
    if kind == "logit_normal":
        config.update(weighting_scheme="logit_normal", logit_mean=params.mean, logit_std=params.std)
    elif kind == "mode":
        config.update(weighting_scheme="mode", mode_scale=params.scale)
    if schedule.flow_shift != 1.0:
        config["training_shift"] = schedule.flow_shift


def _count_note(script: str, notes: list[str]) -> None:
    """kohya's flux_shift counts (h // 2) (w // 2) tokens whatever the model; the plan counts the model's own."""
    if MODEL_PATCH[script] != 2:
        notes.append(
            f"flux_shift: kohya counts {script}'s tokens as 2x2 latent patches, its model embeds "
            f"{MODEL_PATCH[script]}x{MODEL_PATCH[script]} ones: the preset's dynamic shift counts the model's tokens, "
            "so it shifts more than kohya's"
        )


def _default_dynamic_shift(schedule: Any, script: str) -> bool:
    patch = schedule.patch_size or MODEL_PATCH[script]
    return (schedule.base_shift, schedule.max_shift, schedule.base_seq_len, schedule.max_seq_len, patch) == (
        0.5,
        1.15,
        256,
        4096,
        2,
    )
