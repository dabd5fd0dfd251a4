"""The audit: its figures are unbiased estimates, compared with references computed the same way."""

from __future__ import annotations

import random

import pytest
import torch

from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod


def make_plan(data):
    return bind(parse_preset(data, path="audit.toml"), alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")


def low_frequency_energy(plan, shape, draws, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        plan.noise(torch.zeros(shape), generator)
    noise = plan.audit.records()["noise"]
    return noise["channel_mean_variance_mean"], noise["gaussian_channel_mean_variance"]


def test_low_frequency_energy_of_gaussian_noise_matches_its_reference_at_batch_1():
    """4 channels at batch 1: the biased variance would read 3/4 of the reference."""
    measured, reference = low_frequency_energy(make_plan({"noise": [{"type": "gaussian"}]}), (1, 4, 8, 8), 4000)
    assert reference == pytest.approx(1 / 64)
    assert measured == pytest.approx(reference, rel=0.06)


def test_offset_noise_reads_above_the_gaussian_reference_even_in_one_step():
    plan = make_plan({"noise": [{"type": "offset", "strength": 0.1}]})
    measured, reference = low_frequency_energy(plan, (1, 4, 8, 8), 1)
    many, _ = low_frequency_energy(make_plan({"noise": [{"type": "offset", "strength": 0.1}]}), (1, 4, 8, 8), 2000, seed=1)
    assert many == pytest.approx(reference + 0.1**2, rel=0.08)  # offset adds strength^2 per channel mean
    assert measured > 0  # one draw: a finite estimate, not a biased-low figure


def test_tag_dropout_reports_its_realised_rate_and_the_kept_head():
    plan = make_plan({"caption": [{"type": "tag_dropout", "rate": 0.3, "keep_tokens": 2}]})
    rng = random.Random(0)
    caption = ", ".join(f"tag{i}" for i in range(10))
    for _ in range(500):
        plan.caption(caption, rng=rng)
    (tags,) = plan.audit.records()["caption"]["tag_dropout"]
    assert tags["tags_droppable"] == 500 * 8
    assert tags["tag_drop_rate_configured"] == 0.3
    assert tags["tag_drop_rate_within_interval"] and abs(tags["tag_drop_rate_realised"] - 0.3) < 0.03
    assert tags["keep_tokens_always_kept"] is True
    assert "tag dropout [0]" in plan.audit.summary()


def test_a_lost_keep_tokens_head_is_reported():
    import sdplug

    transform = sdplug.create("caption", "tag_dropout", rate=0.5, keep_tokens=1)
    assert transform.count("a, b, c", "a, c").kept_head
    lost = transform.count("a, b, c", "b, c")
    assert not lost.kept_head and lost.droppable == 2 and lost.dropped == 1
