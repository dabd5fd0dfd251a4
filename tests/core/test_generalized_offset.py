"""Generalized offset noise against Algorithm 1 of its article, its closed form, and its statistics."""

from __future__ import annotations

import math

import pytest
import tomllib
import torch

from sdplug.errors import PresetError, SdplugError
from sdplug.preset import parse_preset
from sdplug.schedule import rescale_zero_terminal_snr
from sdplug.strategies.generalized_offset import offset_coefficients


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def algorithm_1(alphas_cumprod: torch.Tensor) -> list[float]:
    """The article's recursion, step by step in Python floats (t = 1..T is index 0..T-1)."""
    abar = [1.0] + alphas_cumprod.tolist()  # abar_0 = 1
    gammas, running = [1.0], 1.0 / math.sqrt(abar[0])
    for t in range(2, len(abar)):
        alpha = abar[t] / abar[t - 1]
        c = (1 - alpha) * math.sqrt(abar[t - 1]) / (alpha * (1 - abar[t - 1]))
        gammas.append(c * running)
        running += gammas[-1] / math.sqrt(abar[t - 1])
    sums, total = [], 0.0
    for t, gamma in enumerate(gammas, start=1):
        total += gamma / math.sqrt(abar[t - 1])
        sums.append(total / math.sqrt(1 - abar[t]))
    return [value / sums[-1] for value in sums]


def test_psi_is_algorithm_1_and_its_closed_form():
    abar = sd_alphas_cumprod()
    psi = offset_coefficients(abar)
    assert torch.allclose(psi, torch.tensor(algorithm_1(abar), dtype=torch.float64), rtol=1e-9)
    closed = (abar[-1] / abar) * ((1 - abar) / (1 - abar[-1])).sqrt()
    assert torch.allclose(psi, closed, rtol=1e-9)
    assert psi[-1] == pytest.approx(1.0) and bool((psi[1:] > psi[:-1]).all())
    assert float(psi[0]) < 1e-3 and 0.005 < float(psi[499]) < 0.05  # the offset lives near t = T


def plan_of(text: str, **build):
    preset = parse_preset(tomllib.loads(text), path="go.toml")
    return preset.build(
        alphas_cumprod=build.pop("alphas_cumprod", sd_alphas_cumprod().float()), prediction_type="epsilon", **build
    )


def test_each_samples_channel_means_carry_strength_times_psi_t():
    strength, count = 0.5, 4000
    plan = plan_of(f'[[noise]]\ntype = "generalized_offset"\nstrength = {strength}\n')
    psi = offset_coefficients(plan.alphas_cumprod)
    latents = torch.zeros(count, 4, 8, 8)
    for t in (999, 700, 300):
        timesteps = torch.full((count,), t, dtype=torch.long)
        draw = plan.noise(latents, timesteps=timesteps)
        channel_means = draw.target.mean(dim=(2, 3))
        expected = 1 / 64 + (strength * float(psi[t])) ** 2
        assert float(channel_means.var()) == pytest.approx(expected, rel=0.08), t
        assert torch.equal(draw.model_input, draw.target)  # a target-noise strategy: the loss sees it
    mixed = plan.noise(latents[:4], timesteps=torch.tensor([0, 999, 0, 999]))
    assert mixed.target.shape == (4, 4, 8, 8)
    assert plan.audit.records()["noise"]["applied"] == [{"type": "generalized_offset", "calls": 4}]


def test_plan_noise_without_timesteps_is_refused_naming_the_strategy():
    plan = plan_of('[[noise]]\ntype = "generalized_offset"\n')
    with pytest.raises(SdplugError, match="GeneralizedOffsetNoise.*timesteps=t"):
        plan.noise(torch.zeros(2, 4, 8, 8))
    with pytest.raises(SdplugError, match="one per sample"):
        plan.noise(torch.zeros(2, 4, 8, 8), timesteps=torch.zeros(3, dtype=torch.long))


def test_a_zero_terminal_snr_schedule_is_refused_with_file_and_key():
    text = '[[noise]]\ntype = "generalized_offset"\n'
    with pytest.raises(PresetError, match=r"go\.toml.*noise\[0\]\.type.*zero-terminal"):
        plan_of(text, alphas_cumprod=rescale_zero_terminal_snr(sd_alphas_cumprod()).float())
    with pytest.raises(ValueError):
        offset_coefficients(rescale_zero_terminal_snr(sd_alphas_cumprod()))


def test_strength_is_validated():
    with pytest.raises(PresetError, match="strength"):
        parse_preset({"noise": [{"type": "generalized_offset", "strength": 2.0}]}, path="go.toml")
