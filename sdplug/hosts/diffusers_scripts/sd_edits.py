"""The edits of diffusers' four SD1.5/SDXL LoRA scripts: at each moment of their step, the
session call that returns the plan's value (``session``)."""

from __future__ import annotations

import dataclasses

from sdplug.hosts.diffusers_scripts.edit import Edit

_OPTION = '{i}parser.add_argument("--sdplug_preset", type=str, default=None, help="sdplug preset (TOML): its tricks replace this script\'s own")'
_IMPORT = Edit("check_min_version(", "import sdplug.hosts.diffusers_scripts.session as _sdplug")
_BIND = Edit("    noise_scheduler = DDPMScheduler.from_pretrained(", "    _sdplug.bind(noise_scheduler, args)")
# the dreambooth scripts' loss, with the prior-preservation pair when they train one
_DREAMBOOTH_LOSS = Edit(
    "                accelerator.backward(loss)",
    "                loss = _sdplug.loss(model_pred, target, timesteps, loss, (model_pred_prior, target_prior, "
    "args.prior_loss_weight) if args.with_prior_preservation else None)",
    before=True,
)
_STEP = Edit("                global_step += 1", "                _sdplug.step()")
_FINISH = Edit("    accelerator.end_training()", "    _sdplug.finish(args.output_dir)", before=True)
_ATTENTION = Edit(
    '            raise ValueError("xformers is not available. Make sure it is installed correctly")',
    "    _sdplug.attention(unet)",
)
_TIMESTEPS = "                timesteps = timesteps.long()"
_TARGET = Edit(
    '                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")',
    "                target = _sdplug.target({x}, noise, timesteps, target)",
)


def _activate(script: str) -> Edit:
    return Edit("    return args", f"    _sdplug.activate(args, parser, {script!r})", before=True)


def _noise(x: str, noisy: str) -> list[Edit]:
    return [
        Edit(_TIMESTEPS, f"                noise, timesteps = _sdplug.noise_and_timesteps({x}, noise, timesteps)"),
        Edit(
            f"                {noisy} = noise_scheduler.add_noise(",
            f"                {noisy} = _sdplug.noisy_input({x}, noise, timesteps, {noisy})",
        ),
        dataclasses.replace(_TARGET, text=_TARGET.text.format(x=x)),
    ]


def _optimizer(name: str) -> Edit:
    return Edit(f"    optimizer = {name}(", "    optimizer = _sdplug.optimizer(optimizer, args)", until="    )")


SD_EDITS: dict[str, list[Edit]] = {
    "train_text_to_image_lora.py": [
        _IMPORT,
        Edit("    args = parser.parse_args()", _OPTION.format(i="    "), before=True),
        _activate("train_text_to_image_lora.py"),
        _BIND,
        _ATTENTION,
        _optimizer("optimizer_cls"),
        *_noise("latents", "noisy_latents"),
        Edit(
            '                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]',
            '                _sdplug.drop_captions(batch, epoch, lambda: tokenize_captions({caption_column: [""]}))',
            before=True,
        ),
        Edit(
            "                # Gather the losses across all processes",
            "                loss = _sdplug.loss(model_pred, target, timesteps, loss)",
            before=True,
        ),
        _STEP,
        _FINISH,
    ],
    "train_dreambooth_lora.py": [
        _IMPORT,
        Edit("    if input_args is not None:", _OPTION.format(i="    "), before=True),
        _activate("train_dreambooth_lora.py"),
        _BIND,
        _ATTENTION,
        _optimizer("optimizer_class"),
        *_noise("model_input", "noisy_model_input"),
        Edit(
            "                # Get the text embedding for conditioning",
            "                _sdplug.drop_captions(batch, epoch, lambda: validation_prompt_negative_prompt_embeds if args.pre_compute_text_embeddings "
            'else tokenize_prompt(tokenizer, "", tokenizer_max_length=args.tokenizer_max_length))',
            before=True,
        ),
        _DREAMBOOTH_LOSS,
        _STEP,
        _FINISH,
    ],
    "train_text_to_image_lora_sdxl.py": [  # two tokenizers: a dropped row gets both tokenizations of ""
        _IMPORT,
        Edit("    if input_args is not None:", _OPTION.format(i="    "), before=True),
        _activate("train_text_to_image_lora_sdxl.py"),
        _BIND,
        _ATTENTION,
        _optimizer("optimizer_class"),
        *_noise("model_input", "noisy_model_input"),
        Edit(
            "                prompt_embeds, pooled_prompt_embeds = encode_prompt(",
            '                _sdplug.drop_captions(batch, epoch, lambda: {"input_ids_one": tokenize_prompt(tokenizer_one, ""), '
            '"input_ids_two": tokenize_prompt(tokenizer_two, "")}, key="input_ids_one")',
            before=True,
        ),
        Edit(
            "                # Gather the losses across all processes",
            "                loss = _sdplug.loss(model_pred, target, timesteps, loss)",
            before=True,
        ),
        _STEP,
        _FINISH,
    ],
    "train_dreambooth_lora_sdxl.py": [  # EDM-style training is refused at bind; two optimizer branches
        _IMPORT,
        Edit("    if input_args is not None:", _OPTION.format(i="    "), before=True),
        _activate("train_dreambooth_lora_sdxl.py"),
        Edit(
            "    text_encoder_one = text_encoder_cls_one.from_pretrained(", "    _sdplug.bind(noise_scheduler, args)", before=True
        ),
        _ATTENTION,
        Edit(
            "    # If custom instance prompts are NOT provided", "    optimizer = _sdplug.optimizer(optimizer, args)", before=True
        ),
        Edit(
            "    " + _TIMESTEPS,
            "                    noise, timesteps = _sdplug.noise_and_timesteps(model_input, noise, timesteps)",
        ),
        *_noise("model_input", "noisy_model_input")[1:],
        # the prompt embeddings the script shares across steps (one row, repeated): one row per
        # sample for this step, the dropped ones the script's own encoding of "", then restored (the
        # script deletes its lists of encoders and tokenizers once the instance prompt is encoded)
        Edit(
            "                # Predict the noise residual",
            "                _sdplug_shared = None if args.train_text_encoder else (prompt_embeds, unet_add_text_embeds)\n"
            "                if _sdplug_shared is not None:\n"
            "                    prompt_embeds, unet_add_text_embeds, elems_to_repeat_text_embeds = _sdplug.drop_embeddings(epoch, prompt_embeds, "
            'unet_add_text_embeds, elems_to_repeat_text_embeds, lambda: compute_text_embeddings("", [text_encoder_one, text_encoder_two], [tokenizer_one, tokenizer_two]))',
            before=True,
        ),
        Edit(
            "                weighting = None",
            "                if _sdplug_shared is not None:\n                    prompt_embeds, unet_add_text_embeds = _sdplug_shared",
            before=True,
        ),
        _DREAMBOOTH_LOSS,
        _STEP,
        _FINISH,
    ],
}
