"""Timestep samplers: ranges, determinism and realised distributions."""

import math

import pytest
import torch

import sdplug

N = 40_000


def binomial_bounds(p: float, n: int, z: float = 3.29) -> tuple[float, float]:
    """99.9% normal-approximation interval of a realised binomial rate."""
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


@pytest.mark.parametrize("name", sdplug.available("timesteps"))
def test_contract_range_dtype_determinism(name):
    sampler = sdplug.create("timesteps", name)
    t = sampler(256, 1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (256,)
    assert 0 <= t.min() and t.max() < 1000
    assert torch.equal(t, sampler(256, 1000, generator=torch.Generator().manual_seed(0)))


def test_uniform_respects_min_and_max(generator):
    t = sdplug.create("timesteps", "uniform", min_timestep=200, max_timestep=400)(N, 1000, generator=generator)
    assert t.min() == 200 and t.max() == 399
    assert t.float().mean().item() == pytest.approx(299.5, abs=2.0)


def test_uniform_range_must_fit_the_scheduler():
    with pytest.raises(sdplug.PresetError, match="max_timestep <= 500"):
        sdplug.create("timesteps", "uniform", max_timestep=800)(4, 500)
    with pytest.raises(sdplug.PresetError, match="must be > min_timestep"):
        sdplug.create("timesteps", "uniform", min_timestep=500, max_timestep=100)


def test_logit_normal_median_and_shift(generator):
    t = sdplug.create("timesteps", "logit_normal")(N, 1000, generator=generator).float()
    assert t.median().item() == pytest.approx(500, abs=10)
    shifted = sdplug.create("timesteps", "logit_normal", mean=1.0)(N, 1000, generator=generator).float()
    expected_median = 1000 / (1 + math.exp(-1.0))
    assert shifted.median().item() == pytest.approx(expected_median, abs=10)


@pytest.mark.parametrize("bias,region", [("later", (750, 1000)), ("earlier", (0, 250))])
def test_biased_draws_its_region_multiplier_times_as_often(generator, bias, region):
    t = sdplug.create("timesteps", "biased", bias=bias, multiplier=3.0, portion=0.25)(N, 1000, generator=generator)
    realised = ((t >= region[0]) & (t < region[1])).float().mean().item()
    p = 0.25 * 3 / (0.25 * 3 + 0.75)
    low, high = binomial_bounds(p, N)
    assert low <= realised <= high


def test_biased_range(generator):
    t = sdplug.create("timesteps", "biased", bias="range", begin=100, end=200, multiplier=10.0)(N, 1000, generator=generator)
    realised = ((t >= 100) & (t < 200)).float().mean().item()
    p = 100 * 10 / (100 * 10 + 900)
    low, high = binomial_bounds(p, N)
    assert low <= realised <= high
