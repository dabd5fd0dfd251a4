"""Noise strategies: the contract, and statistics against their definitions (fixed seeds)."""

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdplug
from sdplug.bench.pyramid_cost import per_level_upsample_reference, seed_code_reference
from sdplug.plan import NoisePipeline
from sdplug.schedule import scaled_linear_alphas_cumprod
from sdplug.strategies.assignment import min_cost_assignment
from sdplug.strategies.pyramid import bilinear_matrix, level_sizes

NOISE = sdplug.available("noise")
SD_ALPHAS = scaled_linear_alphas_cumprod()


def draw(strategy, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One strategy's noise; a time-dependent one gets spread timesteps on SD's schedule too."""
    if not strategy.uses_timesteps:
        return strategy(latents, generator=generator)
    timesteps = torch.linspace(0, 999, latents.shape[0]).long()
    return strategy(latents, generator=generator, timesteps=timesteps, alphas_cumprod=SD_ALPHAS)


def channel_mean_variance(noise: torch.Tensor) -> float:
    """Variance over samples and channels of each map's spatial mean (low-frequency energy)."""
    return noise.double().mean(dim=(-2, -1)).flatten().var().item()


@pytest.mark.parametrize("name", NOISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contract_shape_dtype_device_finite(name, dtype):
    latents = torch.randn(3, 4, 24, 20).to(dtype)
    noise = draw(sdplug.create("noise", name), latents, torch.Generator().manual_seed(0))
    assert noise.shape == latents.shape and noise.dtype == dtype and noise.device == latents.device
    assert torch.isfinite(noise.float()).all()


@pytest.mark.parametrize("name", NOISE)
def test_contract_deterministic_under_seeded_generator(name):
    latents = torch.randn(4, 4, 16, 16)
    strategy = sdplug.create("noise", name)
    first = draw(strategy, latents, torch.Generator().manual_seed(7))
    again = draw(strategy, latents, torch.Generator().manual_seed(7))
    other = draw(strategy, latents, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", NOISE)
def test_contract_roughly_unit_variance(name):
    latents = torch.randn(16, 4, 32, 32)
    noise = draw(sdplug.create("noise", name), latents, torch.Generator().manual_seed(3))
    assert abs(noise.mean().item()) < 0.25
    assert 0.8 < noise.std().item() < 1.25


def test_gaussian_statistics(generator):
    noise = sdplug.create("noise", "gaussian")(torch.zeros(64, 4, 32, 32), generator=generator)
    assert abs(noise.mean().item()) < 0.01
    assert noise.var().item() == pytest.approx(1.0, abs=0.01)
    assert channel_mean_variance(noise) == pytest.approx(1 / (32 * 32), rel=0.3)


def test_offset_adds_per_channel_constant_variance(generator):
    strength = 0.1
    noise = sdplug.create("noise", "offset", strength=strength)(torch.zeros(128, 4, 32, 32), generator=generator)
    assert channel_mean_variance(noise) == pytest.approx(1 / (32 * 32) + strength**2, rel=0.2)
    # the offset is constant within a map: the spatially-centred remainder is white noise
    centred = noise - noise.mean(dim=(-2, -1), keepdim=True)
    assert centred.var().item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("variant", ["intended", "seed-exact", "kohya"])
def test_pyramid_has_far_more_low_frequency_energy(generator, variant):
    latents = torch.zeros(64, 4, 32, 32)
    pyramid = sdplug.create("noise", "pyramid", discount=0.8, variant=variant)(latents, generator=generator)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-4)  # normalised by the batch std
    assert channel_mean_variance(pyramid) > 20 / (32 * 32)


def test_pyramid_per_sample_normalisation(generator):
    noise = sdplug.create("noise", "pyramid", normalize="sample")(torch.zeros(8, 4, 32, 32), generator=generator)
    per_sample = noise.flatten(1).std(dim=1)
    assert torch.allclose(per_sample, torch.ones(8), atol=1e-4)


def test_pyramid_unnormalised_keeps_white_component_at_unit_variance(generator):
    noise = sdplug.create("noise", "pyramid", normalize="none", discount=0.5)(torch.zeros(32, 4, 64, 64), generator=generator)
    white = noise - F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    reference = torch.randn(32, 4, 64, 64, generator=generator)
    white_ref = reference - F.avg_pool2d(reference, 3, stride=1, padding=1, count_include_pad=False)
    # the low levels are smooth, so the high-pass part is that of a unit Gaussian
    assert white.var().item() == pytest.approx(white_ref.var().item(), rel=0.05)
    assert noise.var().item() > 1.1


@pytest.mark.parametrize("out_size,in_size", [(64, 21), (37, 5), (64, 1), (50, 50), (128, 3)])
def test_bilinear_matrix_equals_torch_interpolate(out_size, in_size):
    x = torch.randn(2, 3, in_size, in_size + 2)
    ref = F.interpolate(x, size=(out_size, out_size + 3), mode="bilinear", align_corners=False)
    rows = bilinear_matrix(out_size, in_size, x.device, x.dtype)
    cols = bilinear_matrix(out_size + 3, in_size + 2, x.device, x.dtype)
    assert torch.allclose(rows @ x @ cols.T, ref, atol=1e-5)


def seed_loop_sizes(w, h, scales):
    """The seed article's loop, sizes only (w, h overwritten inside the loop)."""
    sizes = []
    for i, r in enumerate(scales):
        w, h = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        sizes.append((w, h))
        if w == 1 or h == 1:
            break
    return sizes


def test_level_sizes_seed_exact_reproduces_the_seed_loop():
    rng = random.Random(0)
    for _ in range(200):
        scales = [rng.random() * 2 + 2 for _ in range(10)]
        side = rng.choice([32, 64, 96, 128])
        assert level_sizes(side, side, scales, "seed-exact") == seed_loop_sizes(side, side, scales)


def test_level_sizes_intended_divides_the_full_size():
    assert level_sizes(64, 128, [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], "intended") == [
        (32, 64),
        (16, 32),
        (8, 16),
        (4, 8),
        (2, 4),
        (1, 2),
    ]
    # the seed's loop instead divides the already-shrunk size: sizes fall much faster
    assert level_sizes(64, 128, [2.0] * 7, "seed-exact") == [(64, 128), (32, 64), (8, 16), (1, 2)]


@pytest.mark.parametrize("variant,reference", [("seed-exact", seed_code_reference), ("intended", per_level_upsample_reference)])
def test_pyramid_matches_its_reference_in_distribution(variant, reference):
    """Same law as the straightforward implementation: compare the spectrum's low bands."""
    torch.manual_seed(0)
    random.seed(0)
    strategy = sdplug.create("noise", "pyramid", discount=0.8, variant=variant)
    latents = torch.zeros(8, 4, 64, 64)
    ours = torch.cat([strategy(latents) for _ in range(40)])
    theirs = torch.cat([reference(latents, discount=0.8) for _ in range(40)])
    for pool in (64, 16, 4):
        a = channel_mean_variance(F.avg_pool2d(ours, pool))
        b = channel_mean_variance(F.avg_pool2d(theirs, pool))
        assert a == pytest.approx(b, rel=0.15), pool


def radial_power(noise: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    power = torch.fft.rfft2(noise.double()).abs().pow(2).mean(dim=(0, 1))
    h, w = noise.shape[-2:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, -1)
    freq = torch.sqrt(fy**2 + fx**2)
    keep = (freq > 0) & (freq < 0.45)
    return freq[keep].numpy(), power[keep].numpy()


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_pink_noise_spectrum_falls_as_f_to_minus_alpha(generator, alpha):
    noise = sdplug.create("noise", "pink", alpha=alpha)(torch.zeros(32, 4, 64, 64), generator=generator)
    freq, power = radial_power(noise)
    slope = np.polyfit(np.log(freq), np.log(power), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.1)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-4)


def test_perlin_adds_low_frequency_energy(generator):
    latents = torch.zeros(32, 4, 64, 64)
    perlin = sdplug.create("noise", "perlin", strength=1.0, cells=2)(latents, generator=generator)
    gaussian = sdplug.create("noise", "gaussian")(latents, generator=generator)
    assert channel_mean_variance(F.avg_pool2d(perlin, 16)) > 5 * channel_mean_variance(F.avg_pool2d(gaussian, 16))


def test_assignment_is_the_brute_force_minimum():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(20):
            cost = rng.random((n, n))
            order = min_cost_assignment(cost)
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert sorted(order) == list(range(n))
            assert cost[np.arange(n), order].sum() == pytest.approx(best)


def test_immiscible_permutes_the_batch_noise_to_minimise_distance(generator):
    latents = torch.randn(8, 4, 8, 8, generator=generator)
    gaussian = sdplug.create("noise", "gaussian")
    immiscible = sdplug.create("noise", "immiscible")
    base = gaussian(latents, generator=torch.Generator().manual_seed(5))
    assigned = immiscible.transform(base, latents, None)
    # the same noise samples, reordered
    matches = [[torch.equal(assigned[i], base[j]) for j in range(8)] for i in range(8)]
    assert all(sum(row) == 1 for row in matches)
    before = (latents - base).pow(2).sum()
    after = (latents - assigned).pow(2).sum()
    assert after <= before
    # optimal among all permutations of a small batch
    small_l, small_n = latents[:5], base[:5]
    out = immiscible.transform(small_n, small_l, None)
    best = min((small_l - small_n[list(p)]).pow(2).sum() for p in itertools.permutations(range(5)))
    assert (small_l - out).pow(2).sum().item() == pytest.approx(best.item(), rel=1e-6)


def test_input_perturbation_changes_the_model_input_only(generator):
    latents = torch.zeros(16, 4, 32, 32)
    pipeline = NoisePipeline([sdplug.create("noise", "pyramid"), sdplug.create("noise", "input_perturbation", gamma=0.1)])
    draw = pipeline(latents, generator=torch.Generator().manual_seed(0))
    target_only = NoisePipeline([sdplug.create("noise", "pyramid")])(latents, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw.target, target_only.target)  # the clean target is untouched
    assert (draw.model_input - draw.target).std().item() == pytest.approx(0.1, rel=0.05)


def test_noise_strategies_compose_in_the_order_written():
    latents = torch.zeros(64, 4, 32, 32)
    offset_then_pyramid = NoisePipeline([sdplug.create("noise", "offset", strength=0.5), sdplug.create("noise", "pyramid")])
    pyramid_then_offset = NoisePipeline([sdplug.create("noise", "pyramid"), sdplug.create("noise", "offset", strength=0.5)])
    a = offset_then_pyramid(latents, generator=torch.Generator().manual_seed(0)).target
    b = pyramid_then_offset(latents, generator=torch.Generator().manual_seed(0)).target
    assert a.std().item() == pytest.approx(1.0, abs=1e-4)  # pyramid normalised last
    assert b.std().item() == pytest.approx(math.sqrt(1 + 0.25), rel=0.1)  # offset added after


def test_pyramid_rejects_non_image_latents():
    with pytest.raises(ValueError, match="B, C, H, W"):
        sdplug.create("noise", "pyramid")(torch.zeros(4, 16))


def kohya_loop_sizes(w, h, scales):
    """sd-scripts' multires loop, sizes only: i from 0, each level from the full size."""
    sizes = []
    for i, r in enumerate(scales):
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        sizes.append((wn, hn))
        if wn == 1 or hn == 1:
            break
    return sizes


def test_level_sizes_kohya_reproduces_sd_scripts_multires_loop():
    rng = random.Random(1)
    for _ in range(200):
        scales = [rng.random() * 2 + 2 for _ in range(6)]
        side = rng.choice([32, 64, 96, 128])
        assert level_sizes(side, side, scales, "kohya") == kohya_loop_sizes(side, side, scales)


# -- offset random strength and adaptive scale, input perturbation random strength -----------------
def map_means(noise: torch.Tensor) -> torch.Tensor:
    return noise.double().mean(dim=(-2, -1))  # (B, C): offset plus the white part's mean


def test_offset_defaults_draw_exactly_as_before():
    latents = torch.zeros(4, 4, 8, 8)
    got = sdplug.create("noise", "offset", strength=0.1)(latents, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    white = torch.randn(latents.shape, generator=g)
    assert torch.equal(got, white + 0.1 * torch.randn(4, 4, 1, 1, generator=g))


def test_offset_random_strength_scales_by_one_uniform_per_sample(generator):
    """kohya --noise_offset_random_strength: offset strength * U(0, 1) * N(0, 1), U shared by a sample's channels."""
    latents = torch.zeros(4096, 4, 16, 16)
    means = map_means(sdplug.create("noise", "offset", strength=1.0, random_strength=True)(latents, generator=generator))
    white = 1 / 256  # variance of a 16x16 map's mean of unit white noise
    assert means.var().item() == pytest.approx(1 / 3 + white, rel=0.05)  # E[U^2] = 1/3
    # U Z is heavy-tailed: kurtosis E[U^4] E[Z^4] / E[U^2]^2 = (3/5) / (1/9) = 5.4 (3 for a fixed strength)
    centred = means.flatten()
    kurtosis = (centred**4).mean().item() / centred.var().item() ** 2
    assert kurtosis == pytest.approx(5.35, abs=0.8)
    # one U per sample: the channels' squared offsets are correlated, (1/5 - 1/9) / (3/5 - 1/9) = 0.18
    squares = means**2
    correlation = torch.corrcoef(torch.stack([squares[:, 0], squares[:, 1]]))[0, 1].item()
    assert correlation == pytest.approx(0.18, abs=0.06)
    fixed = map_means(sdplug.create("noise", "offset", strength=0.6)(latents, generator=generator)) ** 2
    assert abs(torch.corrcoef(torch.stack([fixed[:, 0], fixed[:, 1]]))[0, 1].item()) < 0.06


def test_offset_adaptive_scale_adds_the_latent_mean_magnitude(generator):
    """kohya --adaptive_noise_scale: strength + adaptive * |mean_HW(latents)| per sample and channel, at least 0."""
    channel_mean = torch.tensor([0.0, 1.0, -2.0, 0.5])
    latents = channel_mean.view(1, 4, 1, 1).expand(4096, 4, 16, 16) + torch.randn(4096, 4, 16, 16, generator=generator) * 0.01
    noise = sdplug.create("noise", "offset", strength=0.1, adaptive_scale=0.4)(latents, generator=generator)
    expected = (0.1 + 0.4 * channel_mean.abs()) ** 2 + 1 / 256
    assert torch.allclose(map_means(noise).var(dim=0).float(), expected, rtol=0.08)
    clamped = sdplug.create("noise", "offset", strength=0.1, adaptive_scale=-1.0)(latents, generator=generator)
    realised = map_means(clamped).var(dim=0).float()
    assert realised[0].item() == pytest.approx(0.01 + 1 / 256, rel=0.1)  # 0.1 - 0 stays 0.1
    assert torch.allclose(realised[1:], torch.full((3,), 1 / 256), rtol=0.1)  # 0.1 - |m| < 0: no offset


def test_input_perturbation_random_strength_is_gamma_times_a_uniform_per_sample(generator):
    """kohya --ip_noise_gamma_random_strength: the perturbation's std per sample is gamma * U(0, 1)."""
    strategy = sdplug.create("noise", "input_perturbation", gamma=0.2, random_strength=True)
    draw = NoisePipeline([strategy])(torch.zeros(8000, 4, 16, 16), generator=generator)
    u = (draw.model_input - draw.target).flatten(1).std(dim=1) / 0.2
    assert u.min().item() >= 0 and u.max().item() <= 1.08  # a 1024-value std estimate is within ~2% of gamma U
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.var().item() == pytest.approx(1 / 12, rel=0.05)
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(torch.quantile(u, q), q, atol=0.02)
    fixed = NoisePipeline([sdplug.create("noise", "input_perturbation", gamma=0.2)])(
        torch.zeros(64, 4, 16, 16), generator=generator
    )
    assert torch.allclose((fixed.model_input - fixed.target).flatten(1).std(dim=1), torch.full((64,), 0.2), rtol=0.1)


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("offset", {"adaptive_scale": 2.0}, "adaptive_scale"),
        ("offset", {"random_strength": 1}, "random_strength"),
        ("input_perturbation", {"random_strength": "yes"}, "random_strength"),
    ],
)
def test_new_noise_parameters_are_validated_naming_the_key(name, params, key):
    with pytest.raises(sdplug.PresetError) as info:
        sdplug.create("noise", name, **params)
    assert info.value.key == key
