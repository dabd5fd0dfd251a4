"""Caption dropout per text encoder (SD3's clip_l / clip_g / t5, kohya's per-encoder rates):
decisions per table, the text kept for the other encoders, the same draws on the text and the
cached routes, realised rates in the audit, and names the host does not have refused."""

from __future__ import annotations

import pytest

import sdplug
from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod

ENCODERS = ("clip_l", "clip_g", "t5")
PRESET = {
    "caption": [
        {"type": "dropout", "rate": 0.3, "encoders": ["t5"]},
        {"type": "dropout", "rate": 0.2, "encoders": ["clip_l", "clip_g"]},
    ]
}


def plan_of(data=PRESET, seed=0, text_encoders=ENCODERS):
    preset = parse_preset(data, path="enc.toml")
    return bind(
        preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon", seed=seed, text_encoders=text_encoders
    )


def test_each_table_drops_its_encoders_and_the_text_stays():
    plan = plan_of(seed=1)
    draws = [plan.caption("a red circle") for _ in range(6000)]
    assert all(d == "a red circle" and not d.dropped for d in draws)
    t5 = sum("t5" in d.dropped_encoders for d in draws) / len(draws)
    clips = [("clip_l" in d.dropped_encoders, "clip_g" in d.dropped_encoders) for d in draws]
    assert abs(t5 - 0.3) < 0.025 and abs(sum(a for a, _ in clips) / len(draws) - 0.2) < 0.025
    assert all(a == b for a, b in clips)  # one table: dropped together
    both = sum("t5" in d.dropped_encoders and "clip_l" in d.dropped_encoders for d in draws) / len(draws)
    assert abs(both - 0.3 * 0.2) < 0.015  # two tables: independent
    caption = plan.report()["caption"]["encoders"]
    assert caption["t5"]["dropout_rate_within_interval"]
    assert caption["t5"]["dropout_rate_configured"] == 0.3  # what was written, not 1 - (1 - 0.3)
    assert caption["clip_g"]["dropped"] == sum(b for _, b in clips)


def test_the_cached_route_draws_what_the_text_route_draws():
    by_text, by_cache = plan_of(seed=2), plan_of(seed=2)
    for _ in range(200):
        assert by_text.caption("x").dropped_encoders == by_cache.dropped_encoders(ENCODERS)


def test_a_whole_caption_dropout_drops_every_encoder_of_the_host():
    plan = plan_of({"caption": [{"type": "dropout", "rate": 1.0}]}, seed=3)
    assert plan.dropped_encoders(ENCODERS) == frozenset(ENCODERS) and plan.caption_dropped()
    assert plan.caption("x").dropped


def test_an_encoder_the_host_does_not_have_is_refused_naming_file_and_key():
    with pytest.raises(sdplug.PresetError) as info:
        plan_of({"caption": [{"type": "dropout", "encoders": ["llm"]}]})
    assert "enc.toml" in str(info.value) and "caption[0].encoders" in str(info.value)
    assert "clip_l, clip_g, t5" in str(info.value)
    with pytest.raises(sdplug.PresetError, match="does not name its text encoders"):
        plan_of({"caption": [{"type": "dropout", "encoders": ["t5"]}]}, text_encoders=None)
