"""The edits of diffusers' flow-matching DreamBooth LoRA scripts (FLUX.1, FLUX.2, SD3, Qwen-Image,
Z-Image, Lumina 2): at each moment of their step, the session call that returns the plan's value.

The six steps are one step written six times: noise drawn inline, ``u`` from
``compute_density_for_timestep_sampling``, sigma looked up in the scheduler's descending table,
the noisy input built inline (Lumina 2's the other way round), ``compute_loss_weighting_for_sd3``,
a weighted MSE. So the same edits fit all six: after the noisy input, the plan's noise, sigma and
input replace the script's (``flow_draw``); the weighting line is followed by the plan's weights
(``flow_weighting``); the loss is the plan's just before ``backward`` (``flow_loss``). Caption
dropout swaps a dropped sample's prompt rows, where the script holds them in its step, for the
script's own encoding of ``""``: per text encoder on FLUX.1 (CLIP-L's pooled embedding, T5's
sequence) and SD3 (CLIP-L's and CLIP-G's columns, T5's tokens, the pooled halves), whole on the
one-encoder models. The scripts that delete their encoder before the loop encode ``""`` just
before they do.
"""

from __future__ import annotations

from sdplug.hosts.diffusers_scripts.edit import Edit

FLUX = "train_dreambooth_lora_flux.py"
FLUX2 = "train_dreambooth_lora_flux2.py"
SD3 = "train_dreambooth_lora_sd3.py"
QWEN_IMAGE = "train_dreambooth_lora_qwen_image.py"
Z_IMAGE = "train_dreambooth_lora_z_image.py"
LUMINA2 = "train_dreambooth_lora_lumina2.py"
FLOW_SCRIPTS = (FLUX, FLUX2, SD3, QWEN_IMAGE, Z_IMAGE, LUMINA2)

_NOISY = "                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise"
_NOISY_REVERSED = "                noisy_model_input = (1.0 - sigmas) * noise + sigmas * model_input"  # Lumina 2
_DRAW = (
    "                noise, timesteps, sigmas, noisy_model_input = _sdplug.flow_draw(model_input, noise, timesteps, sigmas, "
    "noisy_model_input)"
)
_WEIGHTING = "                weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)"


def _common(script: str, noisy: str) -> list[Edit]:
    return [
        Edit('check_min_version("0.40.0.dev0")', "import sdplug.hosts.diffusers_scripts.session as _sdplug"),
        Edit(
            "    if input_args is not None:",
            '    parser.add_argument("--sdplug_preset", type=str, default=None, help="sdplug preset (TOML): its tricks '
            "replace this script's own\")",
            before=True,
        ),
        Edit("    return args", f"    _sdplug.activate(args, parser, {script!r})", before=True),
        Edit("    noise_scheduler_copy = copy.deepcopy(noise_scheduler)", "    _sdplug.bind_flow(noise_scheduler_copy, args)"),
        Edit("    lr_scheduler = get_scheduler(", "    optimizer = _sdplug.optimizer(optimizer, args)", before=True),
        Edit(noisy, _DRAW),
        Edit(_WEIGHTING, "                weighting = _sdplug.flow_weighting(weighting)"),
        Edit(
            "                accelerator.backward(loss)",
            "                loss = _sdplug.flow_loss(model_pred, target, loss, (model_pred_prior, target_prior, "
            "args.prior_loss_weight) if args.with_prior_preservation else None)",
            before=True,
        ),
        Edit("                global_step += 1", "                _sdplug.step()"),
        Edit("    accelerator.end_training()", "    _sdplug.finish(args.output_dir)", before=True),
    ]


# FLUX.1 encodes its prompts inside the step (without --train_text_encoder, which [[caption]]
# refuses): CLIP-L gives the pooled embedding, T5-XXL the sequence, so each encoder's dropout
# swaps its own rows.
_FLUX_CAPTIONS = Edit(
    "                # Convert images to latent space",
    "                prompt_embeds, pooled_prompt_embeds = _sdplug.drop_encoder_rows(epoch, len(prompts), "
    '{"t5xxl": prompt_embeds, "clip_l": pooled_prompt_embeds}, lambda: dict(zip(("t5xxl", "clip_l"), '
    'compute_text_embeddings("", text_encoders, tokenizers)[:2])))',
    before=True,
)

# Lumina 2 keeps one instance-prompt row (repeated at the model call) or encodes custom prompts per
# step: a dropped sample's row (and mask) is swapped for the encoding of "", then the one shared
# row is put back for the next step.
_LUMINA2_CAPTIONS = [
    Edit(
        "                model_pred = transformer(",
        "                _sdplug_shared = (prompts, prompt_embeds, prompt_attention_mask)\n"
        "                _sdplug_rows = _sdplug.drop_rows(epoch, len(prompts), (prompt_embeds, prompt_attention_mask), "
        'lambda: compute_text_embeddings("", text_encoding_pipeline))\n'
        "                if _sdplug_rows is not None:\n"
        "                    prompt_embeds, prompt_attention_mask = _sdplug_rows\n"
        "                    prompts = prompts[:1] if not train_dataset.custom_instance_prompts else prompts",
        before=True,
    ),
    Edit(_WEIGHTING, "                prompts, prompt_embeds, prompt_attention_mask = _sdplug_shared", before=True),
]

# The scripts that encode every prompt before the loop and then delete their text encoder: the
# empty caption is encoded once, by the script's own function, just before that deletion.
_LATENTS = "                # Convert images to latent space"
_PIPELINE_TO_CPU = '    text_encoding_pipeline = text_encoding_pipeline.to("cpu")'
_ENCODE_EMPTY = '_sdplug.encode_empty_caption(lambda: compute_text_embeddings("", text_encoding_pipeline))'

# FLUX.2: one (Mistral) encoder, a row per sample (the shared instance row repeated per sample)
_FLUX2_CAPTIONS = [
    Edit(
        "    " + _PIPELINE_TO_CPU,
        '        _sdplug.encode_empty_caption(lambda: compute_text_embeddings("", text_encoding_pipeline)[:1])',  # no text ids
        before=True,
    ),
    Edit(
        _LATENTS,
        "                (prompt_embeds,) = _sdplug.drop_caption_rows(epoch, len(prompts), (prompt_embeds,))",
        before=True,
    ),
]
# Qwen-Image: (embedding, mask) pairs per instance sample, its own --caption_dropout swap right after
_QWEN_IMAGE_CAPTIONS = [
    Edit(_PIPELINE_TO_CPU, "    " + _ENCODE_EMPTY, before=True),
    Edit(
        "                if args.caption_dropout > 0:",
        "                instance_pairs = _sdplug.drop_caption_pairs(epoch, instance_pairs)",
        before=True,
    ),
]
# Z-Image: a list of variable-length embeddings (its shared list, put back after the model call)
_Z_IMAGE_CAPTIONS = [
    Edit(_PIPELINE_TO_CPU, "    " + _ENCODE_EMPTY, before=True),
    Edit(
        _LATENTS,
        "                _sdplug_shared = prompt_embeds\n"
        "                prompt_embeds = _sdplug.drop_caption_list(epoch, len(prompts), prompt_embeds)",
        before=True,
    ),
    Edit(_WEIGHTING, "                prompt_embeds = _sdplug_shared", before=True),
]
# SD3: CLIP-L | CLIP-G columns of the first 77 tokens, then T5's tokens; pooled CLIP-L | CLIP-G. The
# empty caption and CLIP-L's widths are read before the script deletes its encoders.
_SD3_CAPTIONS = [
    Edit(
        "    # Clear the memory here",
        '    _sdplug.encode_empty_caption(lambda: (*compute_text_embeddings("", text_encoders, tokenizers), '
        "text_encoder_one.config.hidden_size, text_encoder_one.config.projection_dim))",
        before=True,
    ),
    Edit(
        _LATENTS,
        "                _sdplug_shared = (prompt_embeds, pooled_prompt_embeds)\n"
        "                prompt_embeds, pooled_prompt_embeds = _sdplug.drop_sd3_encoders(epoch, len(prompts), prompt_embeds, "
        "pooled_prompt_embeds, args.max_sequence_length)",
        before=True,
    ),
    Edit(_WEIGHTING, "                prompt_embeds, pooled_prompt_embeds = _sdplug_shared", before=True),
]

FLOW_EDITS: dict[str, list[Edit]] = {
    FLUX: [*_common(FLUX, _NOISY), _FLUX_CAPTIONS],
    FLUX2: [*_common(FLUX2, _NOISY), *_FLUX2_CAPTIONS],
    SD3: [*_common(SD3, _NOISY), *_SD3_CAPTIONS],
    QWEN_IMAGE: [*_common(QWEN_IMAGE, _NOISY), *_QWEN_IMAGE_CAPTIONS],
    Z_IMAGE: [*_common(Z_IMAGE, _NOISY), *_Z_IMAGE_CAPTIONS],
    LUMINA2: [*_common(LUMINA2, _NOISY_REVERSED), *_LUMINA2_CAPTIONS],
}
