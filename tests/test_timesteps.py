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


# -- issue 8, item 9: biased parameters the chosen bias would ignore are refused ------------------
@pytest.mark.parametrize(
    "params,words",
    [
        ({"bias": "range", "begin": 100, "portion": 0.5}, "portion applies to bias 'earlier' and 'later' only"),
        ({"bias": "later", "begin": 100}, "begin and end apply to bias 'range' only"),
        ({"bias": "earlier", "end": 300}, "begin and end apply to bias 'range' only"),
        ({"bias": "range"}, "needs begin > 0 and/or end"),
        ({"bias": "range", "begin": 0}, "needs begin > 0 and/or end"),
        ({"bias": "range", "begin": 300, "end": 200}, "end (200) must be > begin (300)"),
        ({"bias": "later", "multiplier": 1.0}, "multiplier = 1.0 draws the biased region exactly as often"),
    ],
)
def test_biased_refuses_parameters_its_bias_ignores(params, words):
    with pytest.raises(sdplug.PresetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sdplug.create("timesteps", "biased", **params)


def test_biased_defaults_per_bias():
    assert sdplug.create("timesteps", "biased").portion == 0.25
    ranged = sdplug.create("timesteps", "biased", bias="range", end=300)
    assert (ranged.begin, ranged.end, ranged.portion) == (0, 300, None)


def test_biased_range_beyond_the_schedule_is_an_error_not_uniform(generator):
    sampler = sdplug.create("timesteps", "biased", bias="range", begin=5000)
    with pytest.raises(sdplug.PresetError, match="begin = 5000 is beyond the noise schedule") as info:
        sampler(16, 1000, generator=generator)
    assert info.value.key == "begin"
    assert sampler.schedule_problem(10_000) is None  # fits a longer schedule


def test_uniform_schedule_problem_names_the_parameter():
    assert sdplug.create("timesteps", "uniform", max_timestep=5000).schedule_problem(1000)[0] == "max_timestep"
    assert sdplug.create("timesteps", "uniform", min_timestep=1000).schedule_problem(1000)[0] == "min_timestep"
    assert sdplug.create("timesteps", "uniform", min_timestep=10, max_timestep=1000).schedule_problem(1000) is None
