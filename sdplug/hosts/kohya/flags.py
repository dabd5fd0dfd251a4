"""Every argument of sd-scripts' four training scripts (main and v0.8.7), classified once.

The adapter's checks (``reconcile``) and the config bridge read this table; nothing else
decides what a kohya flag means next to a preset. Each flag of a trick family is one
``HostFlag`` (``sdplug.hosts.host_flags``): ``conflict``, ``reconciled`` or ``independent``.

``sections`` are the preset sections (``noise``, ``timesteps``, ... or one ``memory.<key>``)
that take the flag over; with none of them set, kohya does what the flag says, as without
sdplug. ``agrees`` lists (section, value) pairs where the flag, written at that value, is what
the section needs of kohya (v0.8.7's ``--loss_type l2`` next to sdplug's noise): no conflict.
Flags that set no trick at all (paths, saving, logging, data layout, networks, distributed
training) are listed by group in ``HOST_SETTINGS``. ``tests/data/
kohya_parser_flags.json`` holds every argument name of both versions' parsers, and a test
checks that each is classified here exactly once.
"""

from __future__ import annotations

from sdplug.hosts.host_flags import HostFlag
from sdplug.strategies import FAMILIES as STRATEGY_FAMILIES

VERSIONS = ("main", "v0.8.7")
FAMILIES = (*STRATEGY_FAMILIES, "memory")  # what a flag belongs to: a strategy family, or [memory]
MEMORY_KEYS = ("gradient_checkpointing", "mixed_precision", "cache_latents", "cache_text_encoder_outputs")


def _rows(family: str, kind: str, sections: tuple[str, ...], why: str, *names: str, versions=VERSIONS, agrees=()):
    sections = sections if kind != "independent" else ()
    return tuple(HostFlag(n, sections, why, kind=kind, family=family, versions=versions, agrees=agrees) for n in names)


_NOISE = ("noise", "timesteps")  # sdplug's noise hook replaces kohya's whole noise function for either

# fmt: off
# (a data table: one line per group of flags, kept as written)
FLAGS: tuple[HostFlag, ...] = (
    # -- noise: kohya's noise function, replaced by sdplug's when the preset sets [[noise]] or [timesteps]
    *_rows("noise", "conflict", _NOISE, "kohya's offset noise (sdplug: noise 'offset')", "noise_offset"),
    *_rows("noise", "conflict", _NOISE, "a random offset strength (sdplug: noise 'offset' random_strength)", "noise_offset_random_strength"),
    *_rows("noise", "conflict", _NOISE, "an offset scaled by the latent mean (sdplug: noise 'offset' adaptive_scale)", "adaptive_noise_scale"),
    *_rows("noise", "conflict", _NOISE, "kohya's multires noise (sdplug: noise 'pyramid', variant 'kohya')", "multires_noise_iterations", "multires_noise_discount"),
    *_rows("noise", "conflict", _NOISE, "input perturbation (sdplug: noise 'input_perturbation')", "ip_noise_gamma"),
    *_rows("noise", "conflict", _NOISE, "a random perturbation strength (sdplug: noise 'input_perturbation' random_strength)", "ip_noise_gamma_random_strength"),
    *_rows("noise", "independent", (), "the noise schedule: sdplug binds the preset to the schedule it gives, rescaled as kohya rescales it (a preset [schedule] zero_terminal_snr turns it on)", "zero_terminal_snr"),
    # -- timesteps
    *_rows("timesteps", "conflict", ("timesteps",), "kohya's timestep range; with [[noise]] alone it carries over into sdplug's uniform draw (sdplug: timesteps 'uniform' min_timestep/max_timestep)", "min_timestep", "max_timestep"),
    # -- loss weighting (kohya's loss and its weights)
    *_rows("loss_weighting", "conflict", ("loss_weighting",), "kohya's min-SNR weighting (sdplug: loss_weighting 'min_snr')", "min_snr_gamma"),
    *_rows("loss_weighting", "conflict", ("loss_weighting",), "kohya's debiased estimation weighting (sdplug: loss_weighting 'debiased')", "debiased_estimation_loss"),
    *_rows("loss_weighting", "conflict", ("loss_weighting",), "kohya's SNR rescaling of a v-prediction loss (sdplug: loss_weighting 'scale_v_pred_loss_like_noise_pred')", "scale_v_pred_loss_like_noise_pred"),
    *_rows("loss_weighting", "conflict", ("loss_weighting",), "an extra v-prediction-like loss term (sdplug: loss_weighting 'v_pred_like_loss')", "v_pred_like_loss"),
    *_rows("loss_weighting", "independent", (), "the prediction type: sdplug binds the preset's weighting and targets to it", "v_parameterization"),
    *_rows("loss_weighting", "conflict", ("loss",), "kohya's loss type and its huber threshold (sdplug: [loss] type, c, schedule; kohya's huber is 'pseudo_huber'); without [loss], kohya's loss is computed on sdplug's timesteps", "loss_type", "huber_c", "huber_schedule", versions=("main",)),
    *_rows("loss_weighting", "conflict", ("loss",), "kohya's huber scale (sdplug: [loss] scale)", "huber_scale", versions=("main",)),
    *_rows("loss_weighting", "conflict", (*_NOISE, "loss"), "kohya's loss type (sdplug: [loss] type); v0.8.7 draws ONE timestep per batch for a huber/smooth_l1 loss, inside the noise function sdplug replaces (sdplug draws one per sample); use --loss_type l2 with this preset", "loss_type", versions=("v0.8.7",), agrees=(("noise", "l2"), ("timesteps", "l2"))),
    *_rows("loss_weighting", "conflict", ("loss",), "kohya's huber threshold (sdplug: [loss] c, schedule); without [loss] only a huber/smooth_l1 --loss_type uses it, computed by kohya's own noise function", "huber_c", "huber_schedule", versions=("v0.8.7",)),
    *_rows("loss_weighting", "independent", (), "a per-pixel loss mask, applied by kohya before the preset's per-sample weighting", "masked_loss"),
    *_rows("loss_weighting", "independent", (), "a per-pixel loss mask, applied by kohya before the preset's per-sample weighting", "alpha_mask", versions=("main",)),
    *_rows("loss_weighting", "independent", (), "the loss weight of regularization images (kohya's per-sample loss_weights), multiplied with the preset's weighting", "prior_loss_weight"),
    # -- caption: kohya's own caption transforms, which run before the preset's in process_caption
    *_rows("caption", "conflict", ("caption",), "kohya's caption dropout (sdplug: caption 'dropout')", "caption_dropout_rate", "caption_dropout_every_n_epochs"),
    *_rows("caption", "conflict", ("caption",), "kohya's tag dropout (sdplug: caption 'tag_dropout')", "caption_tag_dropout_rate"),
    *_rows("caption", "conflict", ("caption",), "kohya's caption shuffle (sdplug: caption 'shuffle')", "shuffle_caption"),
    *_rows("caption", "conflict", ("caption",), "tokens kohya's shuffle/tag dropout keep in place (sdplug: keep_tokens of caption 'shuffle'/'tag_dropout')", "keep_tokens"),
    *_rows("caption", "conflict", ("caption",), "the separator of kohya's fixed caption part: only kohya's shuffle/dropout remove it, so the preset's transforms would see it as text", "keep_tokens_separator"),
    *_rows("caption", "conflict", ("caption",), "the tag separator of kohya's caption transforms (sdplug: separator of the caption transforms)", "caption_separator"),
    *_rows("caption", "conflict", ("caption",), "a separator kohya replaces after its own shuffle/dropout, i.e. before the preset's transforms would run", "secondary_separator"),
    *_rows("caption", "conflict", ("caption",), "kohya's tag-count warm-up, a caption transform of its own (no sdplug equivalent)", "token_warmup_min", "token_warmup_step"),
    *_rows("caption", "reconciled", ("caption",), "set to 0 with [caption]: caption decisions are made, and audited, in the training process", "max_data_loader_n_workers", "persistent_data_loader_workers"),
    *_rows("caption", "independent", (), "kohya builds the caption text (prefix, suffix, wildcards) before the preset's transforms run on it, as before its own", "caption_prefix", "caption_suffix", "enable_wildcard"),
    *_rows("caption", "independent", (), "kohya parses (token:1.3) weights when tokenizing, after every caption transform", "weighted_captions"),
    # -- optimizer: kohya's get_optimizer, replaced by the preset's [optimizer]
    *_rows("optimizer", "conflict", ("optimizer",), "kohya's optimizer choice", "optimizer_type", "use_8bit_adam", "use_lion_optimizer"),
    *_rows("optimizer", "conflict", ("optimizer",), "arguments of kohya's optimizer (sdplug: parameters of [optimizer], e.g. weight_decay, betas)", "optimizer_args"),
    *_rows("optimizer", "conflict", ("optimizer",), "fuses kohya's own Adafactor step into the backward pass", "fused_backward_pass", versions=("main",)),
    *_rows("optimizer", "reconciled", ("optimizer",), "set to the preset's [optimizer] lr, as every parameter group is (an lr of 0, kohya's way to leave a part untrained, stays 0); without an lr in the preset kohya's lrs rule", "learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_te"),
    *_rows("optimizer", "independent", (), "presets set no gradient clipping: kohya clips before the preset optimizer's step", "max_grad_norm"),
    *_rows("optimizer", "independent", (), "presets set no lr schedule: kohya's scheduler scales the preset optimizer's lr over the run", "lr_scheduler", "lr_scheduler_args", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_type", "lr_warmup_steps"),
    *_rows("optimizer", "independent", (), "presets set no lr schedule: kohya's scheduler scales the preset optimizer's lr over the run", "lr_decay_steps", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio", versions=("main",)),
    *_rows("optimizer", "independent", (), "kohya's training loop accumulates gradients before the preset optimizer's step", "gradient_accumulation_steps"),
    # -- attention: kohya's replace_unet_modules switches, driven by the preset's [attention]
    *_rows("attention", "conflict", ("attention",), "kohya's attention switch (sdplug: attention 'xformers'/'sdpa'/'default')", "xformers", "sdpa", "mem_eff_attn"),
    *_rows("attention", "conflict", ("attention",), "diffusers' xformers in place of kohya's switches, which the preset's attention goes through", "diffusers_xformers"),
    # -- memory: the preset's [memory] turns kohya's switches on
    *_rows("memory", "reconciled", ("memory.gradient_checkpointing",), "turned on by the preset's memory.gradient_checkpointing", "gradient_checkpointing"),
    *_rows("memory", "reconciled", ("memory.cache_latents",), "turned on by the preset's memory.cache_latents", "cache_latents"),
    *_rows("memory", "reconciled", ("memory.cache_text_encoder_outputs",), "turned on by the preset's memory.cache_text_encoder_outputs", "cache_text_encoder_outputs"),
    *_rows("memory", "conflict", ("memory.mixed_precision",), "set to the preset's memory.mixed_precision; another value on the command line is refused", "mixed_precision"),
    *_rows("memory", "independent", (), "presets set no full half-precision training; kohya checks it against --mixed_precision", "full_fp16", "full_bf16"),
    *_rows("memory", "independent", (), "presets set no fp8 or VAE precision; kohya applies it", "fp8_base", "no_half_vae"),
    *_rows("memory", "independent", (), "presets set no fp8 or offloading; kohya applies it", "fp8_base_unet", "cpu_offload_checkpointing", versions=("main",)),
    *_rows("memory", "independent", (), "where and how kohya caches what the preset may turn caching on for", "cache_latents_to_disk", "cache_text_encoder_outputs_to_disk", "vae_batch_size"),
    *_rows("memory", "independent", (), "where and how kohya caches what the preset may turn caching on for", "skip_cache_check", versions=("main",)),
    *_rows("memory", "independent", (), "kohya's RAM/VRAM placement of the models; presets set none", "lowram", "highvram"),
)

# Flags that set no trick: kohya alone uses them, with or without a preset.
HOST_SETTINGS: dict[str, tuple[str, ...]] = {
    "model and tokenizer": (
        "pretrained_model_name_or_path", "v2", "vae", "tokenizer_cache_dir", "clip_skip", "max_token_length",
        "no_token_padding", "disable_mmap_load_safetensors",
    ),
    "data: files, layout, buckets, augmentation, validation split": (
        "train_data_dir", "reg_data_dir", "in_json", "dataset_class", "dataset_config", "dataset_repeats",
        "conditioning_data_dir", "caption_extension", "caption_extention", "resolution", "enable_bucket",
        "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "color_aug", "flip_aug",
        "random_crop", "face_crop_aug_range", "debug_dataset", "cache_info", "resize_interpolation",
        "validation_split", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
    ),
    "what is trained and for how long (sdplug derives its random streams from --seed)": (
        "seed", "train_batch_size", "max_train_steps", "max_train_epochs", "initial_epoch", "initial_step",
        "skip_until_initial_step", "train_text_encoder", "stop_text_encoder_training", "network_train_unet_only",
        "network_train_text_encoder_only",
    ),
    "the network (LoRA) being trained": (
        "network_module", "network_dim", "network_alpha", "network_args", "network_dropout", "network_weights",
        "dim_from_weights", "base_weights", "base_weights_multiplier", "scale_weight_norms",
    ),
    "saving, resuming, uploading and metadata": (
        "output_dir", "output_name", "save_model_as", "use_safetensors", "save_precision", "save_every_n_epochs",
        "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs", "save_last_n_epochs_state",
        "save_last_n_steps", "save_last_n_steps_state", "save_state", "save_state_on_train_end", "resume",
        "save_state_to_huggingface", "resume_from_huggingface", "huggingface_repo_id", "huggingface_repo_type",
        "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility", "async_upload",
        "no_metadata", "training_comment", "metadata_title", "metadata_author", "metadata_description",
        "metadata_license", "metadata_tags", "metadata_is_negative_embedding", "metadata_merged_from",
        "metadata_preprocessor", "metadata_thumbnail", "metadata_trigger_phrase", "metadata_usage_hint",
    ),
    "logging and sample images": (
        "logging_dir", "log_with", "log_prefix", "log_tracker_name", "log_tracker_config", "log_config",
        "wandb_api_key", "wandb_run_name", "console_log_level", "console_log_file", "console_log_simple",
        "sample_every_n_steps", "sample_every_n_epochs", "sample_prompts", "sample_sampler", "sample_at_first",
    ),
    "configuration files, compilation, distributed training": (
        "config_file", "output_config", "torch_compile", "dynamo_backend", "ddp_timeout", "ddp_gradient_as_bucket_view",
        "ddp_static_graph", "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
        "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
        "fp16_master_weights_and_gradients",
    ),
    "sdplug's own option (added by `sdplug patch kohya`)": ("sdplug_preset",),
}
# fmt: on


def flags_for(version: str) -> dict[str, HostFlag]:
    """The trick-family flags of one sd-scripts version, by name."""
    return {f.name: f for f in FLAGS if version in f.versions}


def host_setting_group(name: str) -> str | None:
    return next((group for group, names in HOST_SETTINGS.items() if name in names), None)
