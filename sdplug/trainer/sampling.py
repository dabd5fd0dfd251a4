"""Sample grids: fixed prompts, seeds and guidance scales, before and after training.

Sampling starts from the preset's training noise family (e.g. pyramid noise) by default:
a model trained on pyramid noise and sampled from N(0, I) keeps high-frequency noise in its
images (J. Whitaker, "Multi-Resolution Noise for Diffusion Model Training", 2023, and
sdplug's own runs of the embedded model).
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from sdplug.errors import SdplugError
from sdplug.trainer.data import to_image


class NonFiniteSamplesError(SdplugError):
    """The sampler's images hold NaN or inf: a grid of them would only look black."""


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str], device) -> torch.Tensor:
    tokens = bundle.tokenizer(
        prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return bundle.text_encoder(tokens)[0]


@torch.no_grad()
def sample(
    bundle, unet, start_noise, prompts: list[str], guidance: float, steps: int, device, *, refuse_non_finite: bool = False
) -> torch.Tensor:
    """Images (N, 3, R, R) in [-1, 1] by DDIM (eta 0), or the flow-matching Euler sampler for a
    rectified-flow model, with classifier-free guidance.

    With ``refuse_non_finite`` a NaN or inf anywhere in the images raises NonFiniteSamplesError
    (clamping would turn inf into white and NaN into black, hiding it)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if type(bundle.scheduler).__name__.startswith("FlowMatch"):  # x += (sigma_next - sigma) v, sigma 1 -> 0
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler.config)
    else:
        # a zero-terminal schedule must start sampling at its last step, pure noise (Lin et al. 2023, 3.3)
        trailing = {"timestep_spacing": "trailing"} if bundle.scheduler.config.get("rescale_betas_zero_snr") else {}
        scheduler = DDIMScheduler.from_config(bundle.scheduler.config, **trailing)
    scheduler.set_timesteps(steps)
    cond = encode_prompts(bundle, prompts, device)
    uncond = encode_prompts(bundle, [""] * len(prompts), device)
    x = start_noise.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow starts at sigma 1: the noise
    for t in scheduler.timesteps:
        if guidance == 1.0:
            prediction = unet(x, t, encoder_hidden_states=cond).sample
        else:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            unconditional, conditional = both.chunk(2)
            prediction = unconditional + guidance * (conditional - unconditional)
        x = scheduler.step(prediction, t, x).prev_sample
    if bundle.vae is not None:
        x = bundle.vae.decode(x / bundle.latent_scale).sample
    if refuse_non_finite and not bool(torch.isfinite(x).all()):
        raise NonFiniteSamplesError(
            f"the sampler produced non-finite values (NaN or inf) at guidance {guidance:g}; no grid was written. "
            "The model's or the LoRA's weights overflow in this model's layers, or the guidance scale is too large: "
            "check the LoRA (is it for this model?) and try a guidance nearer the usual 3-12."
        )
    return x.float().clamp(-1, 1)


def start_noise(noise_pipeline, shape, seeds: list[int], family: str) -> torch.Tensor:
    """One starting noise per seed: the training noise family (``Plan.noise_pipeline``, or
    ``NoisePipeline`` of a preset's noise entries), or plain Gaussian."""
    draws = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        zeros = torch.zeros(1, *shape)
        draws.append(
            noise_pipeline(zeros, generator).target if family == "training" else torch.randn(zeros.shape, generator=generator)
        )
    return torch.cat(draws)


def sample_grid(
    bundle,
    unet,
    noise_pipeline,
    prompts,
    seeds,
    guidance_scales,
    *,
    steps: int,
    device,
    noise_family: str = "training",
    refuse_non_finite: bool = False,
):
    """(images by [guidance][prompt][seed], PIL grid). Rows: prompts; columns: guidance x seed.

    Used by training's before/after grids and by ``sdplug sample``: the same start noise and
    sampler, so a saved model or LoRA reproduces the grid its run drew. ``refuse_non_finite``:
    see ``sample``."""
    channels = 3 if bundle.vae is None else bundle.unet.config.in_channels
    side = bundle.resolution if bundle.vae is None else bundle.resolution // 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    noise = start_noise(noise_pipeline, (channels, side, side), seeds, noise_family)
    results = {}
    was_training = unet.training
    unet.eval()
    try:
        for guidance in guidance_scales:
            all_prompts = [p for p in prompts for _ in seeds]
            repeated = noise.repeat(len(prompts), 1, 1, 1)
            images = sample(bundle, unet, repeated, all_prompts, guidance, steps, device, refuse_non_finite=refuse_non_finite)
            results[guidance] = images.view(len(prompts), len(seeds), *images.shape[1:])
    finally:  # a refused grid leaves a training UNet training
        unet.train(was_training)
    return results, _grid(results, prompts, seeds, guidance_scales)


def _grid(results, prompts, seeds, guidance_scales, zoom: int = 3) -> Image.Image:
    tile = next(iter(results.values())).shape[-1] * zoom
    label_w, header_h, gap = 260, 18, 4
    columns = len(guidance_scales) * len(seeds)
    grid = Image.new("RGB", (label_w + columns * (tile + gap), header_h + len(prompts) * (tile + gap)), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    for g_index, guidance in enumerate(guidance_scales):
        x = label_w + g_index * len(seeds) * (tile + gap)
        pen.text((x + 2, 3), f"guidance {guidance:g}", fill=(0, 0, 0))
        for p_index, prompt in enumerate(prompts):
            y = header_h + p_index * (tile + gap)
            if g_index == 0:
                pen.text((4, y + tile // 2 - 6), prompt, fill=(0, 0, 0))
            for s_index in range(len(seeds)):
                image = to_image(results[guidance][p_index, s_index]).resize((tile, tile), Image.Resampling.NEAREST)
                grid.paste(image, (x + s_index * (tile + gap), y))
    return grid
