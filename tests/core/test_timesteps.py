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


# -- shift, stratified, and OneTrainer's distributions for discrete models --------------------------
QUANTILES = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)


def realised_quantiles(t: torch.Tensor) -> torch.Tensor:
    return torch.quantile(t.double(), QUANTILES)


def assert_quantiles(t: torch.Tensor, unit_quantiles: torch.Tensor, T: int = 1000, abs_tol: float = 8.0):
    """Realised quantiles of floor(u T) against T * (the law's quantiles of u)."""
    expected = T * unit_quantiles
    assert torch.allclose(realised_quantiles(t), expected, atol=abs_tol), (realised_quantiles(t), expected)


def shifted(u: torch.Tensor, s: float) -> torch.Tensor:
    return s * u / ((s - 1) * u + 1)


def test_uniform_with_default_shift_draws_exactly_as_before():
    t = sdplug.create("timesteps", "uniform", min_timestep=100)(64, 1000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.randint(100, 1000, (64,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_uniform_shift_moves_the_quantiles_by_the_shift_map(generator, shift):
    t = sdplug.create("timesteps", "uniform", shift=shift)(N, 1000, generator=generator)
    assert_quantiles(t, shifted(QUANTILES, shift))
    assert (t.float().mean().item() > 500) == (shift > 1)


def test_uniform_shift_keeps_the_range(generator):
    t = sdplug.create("timesteps", "uniform", min_timestep=200, max_timestep=400, shift=3.0)(N, 1000, generator=generator)
    assert t.min() >= 200 and t.max() <= 399
    assert torch.allclose(realised_quantiles(t), 200 + 200 * shifted(QUANTILES, 3.0), atol=3.0)


def test_logit_normal_shift_moves_its_median(generator):
    t = sdplug.create("timesteps", "logit_normal", shift=3.0)(N, 1000, generator=generator).float()
    assert t.median().item() == pytest.approx(1000 * shifted(torch.tensor(0.5), 3.0).item(), abs=10)  # 750


@pytest.mark.parametrize("batch", [8, 10, 3, 1, 1500])
def test_stratified_covers_each_stratum_exactly_once_per_batch(batch):
    sampler = sdplug.create("timesteps", "stratified")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = sampler(batch, 1000, generator=g).sort().values
        i = torch.arange(batch)
        low = torch.div(1000 * i, batch, rounding_mode="floor")  # stratum i is [1000 i / B, 1000 (i + 1) / B)
        high = -torch.div(-1000 * (i + 1), batch, rounding_mode="floor") - 1
        assert ((t >= low) & (t <= high)).all()
    if batch in (8, 10):  # equal integer strata: exactly one timestep in each
        assert torch.equal(torch.bincount(t // (1000 // batch), minlength=batch), torch.ones(batch, dtype=torch.long))


def test_stratified_marginal_is_uniform_and_shuffle_is_random_order(generator):
    sampler = sdplug.create("timesteps", "stratified")
    draws = torch.stack([sampler(8, 1000, generator=generator) for _ in range(5000)])
    assert draws.float().mean().item() == pytest.approx(499.5, abs=3.0)
    low, high = binomial_bounds(0.1, draws.numel())
    for decile in range(10):
        rate = ((draws >= 100 * decile) & (draws < 100 * (decile + 1))).float().mean().item()
        assert low <= rate <= high
    # shuffled: sample 0 lands in every stratum equally often
    first = torch.bincount(draws[:, 0] // 125, minlength=8).float() / len(draws)
    assert torch.allclose(first, torch.full((8,), 1 / 8), atol=0.025)
    ordered = sdplug.create("timesteps", "stratified", shuffle=False)(8, 1000, generator=generator)
    assert torch.equal(ordered // 125, torch.arange(8))


def test_stratified_respects_range_and_schedule():
    t = sdplug.create("timesteps", "stratified", min_timestep=100, max_timestep=300)(4, 1000, generator=torch.Generator())
    assert torch.equal((t.sort().values - 100) // 50, torch.arange(4))
    with pytest.raises(sdplug.PresetError, match="timesteps 'stratified' max_timestep = 2000"):
        sdplug.create("timesteps", "stratified", max_timestep=2000)(4, 1000)


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (1.0, 3.0), (2.0, 5.0), (0.5, 0.5), (3.0, 0.7)])
def test_beta_realised_mean_and_variance(generator, alpha, beta):
    t = sdplug.create("timesteps", "beta", alpha=alpha, beta=beta)(N, 1000, generator=generator).double()
    u = (t + 0.5) / 1000  # bin centres
    mean = alpha / (alpha + beta)
    var = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    assert u.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / N) + 1e-3)
    assert u.var().item() == pytest.approx(var, rel=0.05, abs=2e-4)


def test_beta_quantiles_where_the_cdf_is_closed_form(generator):
    # beta = 1: CDF u**alpha, quantile q**(1/alpha); alpha = 1: quantile 1 - (1 - q)**(1/beta)
    t = sdplug.create("timesteps", "beta", alpha=0.5, beta=1.0)(N, 1000, generator=generator)
    assert_quantiles(t, QUANTILES**2)
    t = sdplug.create("timesteps", "beta", alpha=1.0, beta=3.0)(N, 1000, generator=generator)
    assert_quantiles(t, 1 - (1 - QUANTILES) ** (1 / 3))


def test_cosmap_quantiles(generator):
    t = sdplug.create("timesteps", "cosmap")(N, 1000, generator=generator)
    assert_quantiles(t, 1 - 1 / (torch.tan(math.pi / 2 * QUANTILES) + 1))
    shifted_t = sdplug.create("timesteps", "cosmap", shift=3.0)(N, 1000, generator=generator)
    assert_quantiles(shifted_t, shifted(1 - 1 / (torch.tan(math.pi / 2 * QUANTILES) + 1), 3.0))


@pytest.mark.parametrize("scale", [-1.0, 0.0, 1.29, 1.75])
def test_mode_quantiles(generator, scale):
    def f(u):
        return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)

    t = sdplug.create("timesteps", "mode", scale=scale)(N, 1000, generator=generator)
    assert_quantiles(t, f(1 - QUANTILES))  # f decreases from 1 to 0, so quantile q is f(1 - q)
    middle = ((t >= 400) & (t < 600)).float().mean().item()
    assert (middle > 0.21) == (scale > 0) and (middle < 0.19) == (scale < 0)


def test_heavy_tail_is_mode_under_onetrainers_name():
    a = sdplug.create("timesteps", "heavy_tail", scale=0.8)(256, 1000, generator=torch.Generator().manual_seed(3))
    b = sdplug.create("timesteps", "mode", scale=0.8)(256, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("uniform", {"shift": 0.0}, "shift"),
        ("logit_normal", {"shift": -1.0}, "shift"),
        ("mode", {"scale": 1.8}, "scale"),
        ("beta", {"alpha": 0.0}, "alpha"),
        ("stratified", {"shuffle": 1}, "shuffle"),
    ],
)
def test_new_parameters_are_validated_naming_the_key(name, params, key):
    with pytest.raises(sdplug.PresetError) as info:
        sdplug.create("timesteps", name, **params)
    assert info.value.key == key
