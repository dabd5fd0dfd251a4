"""What sd-scripts main's five rectified-flow LoRA scripts do with the trick flags they accept.

Every flow script builds its parser from ``train_network.setup_parser()``, so it accepts all of
the SD scripts' trick flags; but each subclasses ``NetworkTrainer`` and overrides the methods
those tricks live in (``get_noise_pred_and_target``, ``post_process_loss``,
``get_noise_scheduler``), so many of them parse and then do nothing. Others act only next to
another flag (``--weighting_scheme sigma_sqrt`` only with ``--model_prediction_type
sigma_scaled`` on FLUX), and one raises on the first training step (a huber loss with the default
``snr`` schedule: kohya's flow scheduler has no ``alphas_cumprod``). Read from sd-scripts main at
``48d368f`` (``tests/data/kohya_flow_parsers.json`` holds those parsers' arguments; a test checks
that every argument of every flow script is named here, in ``FLOW_TRICKS``, or in a host-settings
group).

``SCRIPT_EFFECTS`` is the "ignored by this script" class of the flag table: each row says which
scripts it holds for, when the flag acts after all (``acts_when``, on the parsed arguments; none:
never), and what does what the user meant. ``sdplug check kohya`` reads it (``flag_check``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from sdplug.hosts.host_flags import HostFlag

FLUX, SD3, LUMINA, HUNYUAN, ANIMA = (
    "flux_train_network.py",
    "sd3_train_network.py",
    "lumina_train_network.py",
    "hunyuan_image_train_network.py",
    "anima_train_network.py",
)
FLOW_SCRIPTS = (FLUX, SD3, LUMINA, HUNYUAN, ANIMA)
_ALL = FLOW_SCRIPTS
# the scripts whose σ comes from flux_train_utils'/lumina_train_util's draw (timestep_sampling)
_SAMPLING = (FLUX, LUMINA, HUNYUAN, ANIMA)

# what each script's model reads as its text: the names a preset's caption dropout may give
TEXT_ENCODERS: dict[str, tuple[str, ...]] = {
    FLUX: ("clip_l", "t5xxl"),
    SD3: ("clip_l", "clip_g", "t5xxl"),
    LUMINA: ("gemma2",),
    HUNYUAN: ("qwen2_5_vl", "byt5"),
    ANIMA: ("qwen3",),
}

# each script's model's latent patch (its tokens are (H / p) (W / p) of the latent kohya draws on),
# what the plan's dynamic shift counts; kohya's own flux_shift / nextdit_shift count (h // 2) (w // 2)
# on every script, HunyuanImage's 1x1 patches included
MODEL_PATCH: dict[str, int] = {FLUX: 2, SD3: 2, LUMINA: 2, HUNYUAN: 1, ANIMA: 2}

Arguments = Mapping[str, Any]  # the parsed arguments, by name

# each script's defaults of the flags this table's conditions read (a config file alone does not
# give them; a test holds them to the real parsers')
_COMMON_DEFAULTS = {"weighting_scheme": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
_COMMON_DEFAULTS |= {"loss_type": "l2", "huber_schedule": "snr"}
SCRIPT_DEFAULTS: dict[str, dict[str, Any]] = {
    FLUX: {
        **_COMMON_DEFAULTS,
        "timestep_sampling": "sigma",
        "model_prediction_type": "sigma_scaled",
        "discrete_flow_shift": 3.0,
        "sigmoid_scale": 1.0,
    },
    SD3: {**_COMMON_DEFAULTS, "training_shift": 1.0},
    LUMINA: {
        **_COMMON_DEFAULTS,
        "timestep_sampling": "shift",
        "model_prediction_type": "raw",
        "discrete_flow_shift": 6.0,
        "sigmoid_scale": 1.0,
    },
    HUNYUAN: {
        **_COMMON_DEFAULTS,
        "timestep_sampling": "sigma",
        "model_prediction_type": "raw",
        "discrete_flow_shift": 5.0,
        "sigmoid_scale": 1.0,
    },
    ANIMA: {**_COMMON_DEFAULTS, "timestep_sampling": "sigmoid", "discrete_flow_shift": 1.0, "sigmoid_scale": 1.0},
}

# effects: what the script does with the flag when ``acts_when`` does not hold
EFFECTS = ("ignored", "fails")


@dataclasses.dataclass(frozen=True)
class ScriptEffect:
    """A flag a flow script accepts and ignores (or fails on), unless ``acts_when`` holds."""

    names: tuple[str, ...]
    scripts: tuple[str, ...]
    why: str  # what the script does instead, said in every message about it
    instead: str  # what would do what the user meant
    acts_when: Callable[[Arguments], bool] | None = None  # None: never acts in these scripts
    effect: str = "ignored"  # one of EFFECTS

    def __post_init__(self) -> None:
        if self.effect not in EFFECTS:
            raise ValueError(f"ScriptEffect {self.names}: effect {self.effect!r}; allowed: {', '.join(EFFECTS)}")

    def holds(self, script: str, arguments: Arguments) -> bool:
        """Whether the flag is ignored (or fails) in ``script`` with these arguments."""
        return script in self.scripts and (self.acts_when is None or not self.acts_when(arguments))


def _sampling(*values: str) -> Callable[[Arguments], bool]:
    return lambda a: a.get("timestep_sampling") in values


def _weighting_acts(script: str) -> Callable[[Arguments], bool]:
    """Whether ``--weighting_scheme`` (and its parameters) acts: logit_normal/mode shape the draw
    (SD3 always; the others with timestep_sampling sigma only), sigma_sqrt/cosmap weight the loss
    (SD3 and Anima always; the others with model_prediction_type sigma_scaled only)."""

    def acts(a: Arguments) -> bool:
        scheme = a.get("weighting_scheme")
        if scheme in ("logit_normal", "mode"):
            return script == SD3 or a.get("timestep_sampling") == "sigma"
        if scheme in ("sigma_sqrt", "cosmap"):
            return script in (SD3, ANIMA) or a.get("model_prediction_type") == "sigma_scaled"
        return False  # none / uniform: nothing to do

    return acts


def _per_script(names: tuple[str, ...], why: str, instead: str, make: Callable[[str], Callable[[Arguments], bool]]):
    return tuple(ScriptEffect(names, (script,), why, instead, make(script)) for script in _ALL)


_NOISE_WHY = (
    "this flow script draws its noise with torch.randn_like in its own get_noise_pred_and_target, which never "
    "reads it (kohya's noise tricks live in train_util.get_noise_noisy_latents_and_timesteps, the SD scripts' path)"
)
_WEIGHT_WHY = (
    "this flow script's post_process_loss returns the loss unchanged (kohya's min-SNR, debiased and v-prediction "
    "weights live in the SD scripts' post_process_loss)"
)
# where a preset section is what would act: ``flag_check`` fills in how that preset reaches the
# script (``sdplug kohya`` runs the SD scripts; the flow scripts not yet)
_PRESET = "{preset}"

# fmt: off
# (a data table: one row per group of flags, kept as written)
SCRIPT_EFFECTS: tuple[ScriptEffect, ...] = (
    # -- noise
    ScriptEffect(("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale"), _ALL, _NOISE_WHY,
                 f"a preset's [[noise]] type = 'offset' ({_PRESET})"),
    ScriptEffect(("multires_noise_iterations", "multires_noise_discount"), _ALL, _NOISE_WHY,
                 f"a preset's [[noise]] type = 'pyramid' ({_PRESET})"),
    ScriptEffect(("ip_noise_gamma", "ip_noise_gamma_random_strength"), (SD3,),
                 "sd3_train_utils.get_noisy_model_input_and_timesteps has no input perturbation (the FLUX, Lumina, "
                 "HunyuanImage and Anima draws have)", f"a preset's [[noise]] type = 'input_perturbation' ({_PRESET})"),
    ScriptEffect(("ip_noise_gamma_random_strength",), (FLUX, LUMINA, HUNYUAN, ANIMA),
                 "it scales --ip_noise_gamma, which is not set", "--ip_noise_gamma G with it",
                 acts_when=lambda a: bool(a.get("ip_noise_gamma"))),
    ScriptEffect(("zero_terminal_snr",), _ALL,
                 "only the SD scripts' get_noise_scheduler rescales a schedule; a rectified flow's sigma = 1 is pure "
                 "noise already", "nothing: a flow model needs no zero-terminal rescaling"),
    # -- timesteps
    ScriptEffect(("min_timestep", "max_timestep"), (FLUX, LUMINA, HUNYUAN, ANIMA),
                 "this script's sigma draw never reads them (only SD3's does); kohya's fixed-timestep validation loss "
                 "sets them too, so its validation sigmas are random here",
                 f"a preset's [timesteps] with min_timestep / max_timestep ({_PRESET})"),
    ScriptEffect(("sigmoid_scale",), (FLUX, HUNYUAN, ANIMA),
                 "it scales the normal draw of --timestep_sampling sigmoid, shift and flux_shift only",
                 "--timestep_sampling sigmoid, shift or flux_shift", acts_when=_sampling("sigmoid", "shift", "flux_shift")),
    ScriptEffect(("sigmoid_scale",), (LUMINA,),
                 "it scales the normal draw of --timestep_sampling sigmoid, shift and flux_shift only (not nextdit_shift)",
                 "--timestep_sampling sigmoid, shift or flux_shift", acts_when=_sampling("sigmoid", "shift", "flux_shift")),
    ScriptEffect(("discrete_flow_shift",), (FLUX, LUMINA, HUNYUAN, ANIMA),
                 "it shifts --timestep_sampling shift's draw and the scheduler's sigmas that sigma sampling indexes; "
                 "uniform, sigmoid, flux_shift (and Lumina's nextdit_shift) draw unshifted or shift otherwise",
                 "--timestep_sampling shift (or sigma), or a preset's [schedule] flow_shift", acts_when=_sampling("shift", "sigma")),
    *_per_script(("weighting_scheme",),
                 "logit_normal and mode shape the draw only with --timestep_sampling sigma (SD3: always); sigma_sqrt and "
                 "cosmap weight the loss only with --model_prediction_type sigma_scaled (SD3 and Anima: always)",
                 "--timestep_sampling sigma for logit_normal/mode, --model_prediction_type sigma_scaled for "
                 "sigma_sqrt/cosmap; or a preset's [timesteps] / [loss_weighting]", _weighting_acts),
    *_per_script(("logit_mean", "logit_std"), "they are parameters of --weighting_scheme logit_normal",
                 "--weighting_scheme logit_normal (and --timestep_sampling sigma), or a preset's [timesteps] type = "
                 "'logit_normal'", lambda s: lambda a: a.get("weighting_scheme") == "logit_normal" and _weighting_acts(s)(a)),
    *_per_script(("mode_scale",), "it is the parameter of --weighting_scheme mode",
                 "--weighting_scheme mode (and --timestep_sampling sigma), or a preset's [timesteps] type = 'mode'",
                 lambda s: lambda a: a.get("weighting_scheme") == "mode" and _weighting_acts(s)(a)),
    # -- loss weighting and the prediction
    ScriptEffect(("min_snr_gamma",), _ALL, _WEIGHT_WHY,
                 f"a preset's [loss_weighting] type = 'min_snr' (its flow form, from SNR(sigma); {_PRESET})"),
    ScriptEffect(("debiased_estimation_loss",), _ALL, _WEIGHT_WHY,
                 f"a preset's [loss_weighting] type = 'debiased' ({_PRESET})"),
    ScriptEffect(("v_pred_like_loss", "scale_v_pred_loss_like_noise_pred"), _ALL, _WEIGHT_WHY,
                 "nothing: these are DDPM v-prediction weights; a flow model predicts a velocity"),
    ScriptEffect(("v_parameterization",), _ALL,
                 "a flow script's prediction is fixed (a velocity); the flag only changes checks and metadata",
                 "nothing: leave it out"),
    # -- loss type
    ScriptEffect(("loss_type", "huber_schedule"), _ALL,
                 "with --loss_type huber or smooth_l1, the default schedule 'snr' raises NotImplementedError on the "
                 "first step (kohya's flow scheduler has no alphas_cumprod)",
                 "--huber_schedule exponential or constant, or a preset's [loss] with schedule = 'snr' (computed from "
                 f"SNR(sigma); {_PRESET})",
                 acts_when=lambda a: a.get("loss_type") not in ("huber", "smooth_l1") or a.get("huber_schedule") != "snr",
                 effect="fails"),
    ScriptEffect(("huber_c", "huber_scale"), _ALL, "they are parameters of --loss_type huber / smooth_l1",
                 "--loss_type huber or smooth_l1", acts_when=lambda a: a.get("loss_type") in ("huber", "smooth_l1")),
    # -- captions and cached text-encoder outputs
    ScriptEffect(("caption_dropout_every_n_epochs",), (FLUX, SD3, HUNYUAN, ANIMA),
                 "with --cache_text_encoder_outputs the cached captions never change (kohya's cache check does not "
                 "look at this flag)", f"no cache, or a preset's [[caption]] dropout ({_PRESET})",
                 acts_when=lambda a: not a.get("cache_text_encoder_outputs")),
    ScriptEffect(("caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "shuffle_caption"),
                 (LUMINA,),
                 "with --cache_text_encoder_outputs and --network_train_unet_only, Gemma2's cached outputs are used "
                 "and the caption is never read again (Lumina's script has no cache check)",
                 f"no cache, or a preset's [[caption]] dropout ({_PRESET})",
                 acts_when=lambda a: not (a.get("cache_text_encoder_outputs") and a.get("network_train_unet_only"))),
    ScriptEffect(("apply_lg_attn_mask", "apply_t5_attn_mask"), (SD3,),
                 "SD3's uncached training path encodes without them (they act on cached outputs and sampling)",
                 "--cache_text_encoder_outputs", acts_when=lambda a: bool(a.get("cache_text_encoder_outputs"))),
    ScriptEffect(("llm_adapter_path", "llm_adapter_lr", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr"), (ANIMA,),
                 "only anima_train.py (full training) reads them; the LoRA script never does",
                 "anima_train.py, or the network's own arguments (--network_args)"),
)
# fmt: on

# The flow scripts' own trick flags that, where they act, set what a preset section sets: with the
# section set too, the run is refused (the SD scripts' table, ``flags.FLAGS``, holds the shared ones)
FLOW_CONFLICTS: tuple[HostFlag, ...] = tuple(
    HostFlag(name, sections, why, family=sections[0])
    for names, sections, why in (
        (("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "training_shift"), ("timesteps",),
         "kohya's flow sampler and its shift (sdplug: [timesteps], [schedule] flow_shift / dynamic_shift)"),
        (("logit_mean", "logit_std", "mode_scale"), ("timesteps",), "kohya's sigma sampling density (sdplug: [timesteps])"),
        (("weighting_scheme",), ("timesteps", "loss_weighting"),
         "kohya's sampling density or SD3 weighting (sdplug: [timesteps] / [loss_weighting])"),
        (("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate"), ("caption",),
         "SD3's per-encoder dropout (sdplug: [[caption]] dropout with encoders)"),
    )
    for name in names
)  # fmt: skip

# --weighting_scheme is two tricks by value: a sampling density or an SD3 loss weighting
WEIGHTING_SCHEME_SECTIONS: dict[str, tuple[str, ...]] = {"logit_normal": ("timesteps",), "mode": ("timesteps",)}
WEIGHTING_SCHEME_SECTIONS |= {"sigma_sqrt": ("loss_weighting",), "cosmap": ("loss_weighting",), "none": (), "uniform": ()}


def sections_set_by(flag: HostFlag, value: Any) -> tuple[str, ...]:
    """The preset sections this flag, at this value, sets what of."""
    if flag.name == "weighting_scheme":
        return WEIGHTING_SCHEME_SECTIONS.get(value, flag.sections)
    return flag.sections


# The trick flags a flow script adds that do act (the preset sections that would take them over
# are the flow adapter's business): read here so every argument is accounted for.
FLOW_TRICKS: dict[str, str] = {
    "timestep_sampling": "how sigma is drawn: sigma (the scheduler's table, --weighting_scheme's density), uniform, "
    "sigmoid, shift, flux_shift (Lumina: nextdit_shift); sdplug: [timesteps] logit_normal with std = sigmoid_scale, "
    "then [schedule] flow_shift or dynamic_shift",
    "training_shift": "SD3's shift of the drawn position (sdplug: [schedule] flow_shift)",
    "model_prediction_type": "how the output is read before the loss: raw, additive, sigma_scaled (FLUX's default, "
    "compared with the velocity target there; sdplug.process's Flow.output)",
    "guidance_scale": "the guidance value FLUX.1 dev and Chroma are given while training (schnell ignores it)",
    "clip_l_dropout_rate": "SD3's dropout of CLIP-L's output (sdplug: [[caption]] dropout with encoders = ['clip_l'])",
    "clip_g_dropout_rate": "SD3's dropout of CLIP-G's output (sdplug: [[caption]] dropout with encoders = ['clip_g'])",
    "t5_dropout_rate": "SD3's dropout of T5-XXL's output (sdplug: [[caption]] dropout with encoders = ['t5xxl'])",
    "pos_emb_random_crop_rate": "SD3's random crop of the positional embedding (a model option; presets set none)",
    "enable_scaled_pos_embed": "SD3's scaled positional embedding for multi-resolution training (a model option)",
}

# Flow-script arguments that set no trick: the script alone uses them, with or without a preset.
FLOW_HOST_SETTINGS: dict[str, tuple[str, ...]] = {
    "model files and text encoders": (
        "ae",
        "clip_l",
        "clip_g",
        "t5xxl",
        "gemma2",
        "qwen3",
        "byt5",
        "text_encoder",
        "t5_tokenizer_path",
        "controlnet_model_name_or_path",
        "model_type",
        "save_clip",
        "save_t5xxl",
        "system_prompt",
    ),
    "token lengths, precision, placement and attention kernels": (
        "t5xxl_max_token_length",
        "gemma2_max_token_length",
        "qwen3_max_token_length",
        "t5_max_token_length",
        "t5xxl_device",
        "t5xxl_dtype",
        "fp8_scaled",
        "fp8_vl",
        "text_encoder_cpu",
        "blocks_to_swap",
        "split_mode",
        "attn_mode",
        "split_attn",
        "use_flash_attn",
        "use_sage_attn",
        "unsloth_offload_checkpointing",
    ),
    "batching of the encoders, the VAE and samples": (
        "text_encoder_batch_size",
        "vae_chunk_size",
        "vae_disable_cache",
        "sample_batch_size",
    ),
}


def effects_for(script: str, name: str) -> list[ScriptEffect]:
    """The rows of ``SCRIPT_EFFECTS`` about ``name`` in ``script``."""
    return [row for row in SCRIPT_EFFECTS if name in row.names and script in row.scripts]


def flow_setting_group(name: str) -> str | None:
    return next((group for group, names in FLOW_HOST_SETTINGS.items() if name in names), None)
