"""The plan: what every host calls, checked against the forward-process formulas."""

import random

import pytest
import torch

from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod


def make_plan(data, prediction_type="epsilon"):
    return bind(
        parse_preset(data, path="plan.toml"), alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type=prediction_type
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noisy_input_and_target_follow_the_forward_process(prediction_type):
    plan = make_plan({}, prediction_type)
    x0 = torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 500, 999])
    noise = plan.noise(x0, generator=torch.Generator().manual_seed(0))
    a = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    assert torch.allclose(plan.noisy_input(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise.target, atol=1e-6)
    expected = {"epsilon": noise.target, "sample": x0, "v_prediction": a.sqrt() * noise.target - (1 - a).sqrt() * x0}
    assert torch.allclose(plan.target(x0, noise, t), expected[prediction_type], atol=1e-6)


def test_input_perturbation_reaches_the_input_but_not_the_target():
    plan = make_plan({"noise": [{"type": "offset"}, {"type": "input_perturbation", "gamma": 0.2}]})
    x0 = torch.zeros(8, 4, 16, 16)
    t = torch.full((8,), 999)
    noise = plan.noise(x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plan.target(x0, noise, t), noise.target)
    a = scaled_linear_alphas_cumprod()[999]
    gap = plan.noisy_input(x0, noise, t) - (1 - a).sqrt() * noise.target
    assert gap.std().item() == pytest.approx(0.2 * (1 - a).sqrt().item(), rel=0.1)


def test_weight_and_learned_parameters():
    plan = make_plan({"loss_weighting": {"type": "min_snr", "gamma": 5.0}}, "v_prediction")
    loss = torch.ones(3)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(plan.weight(loss, t), plan.loss_weighting.weights(t, plan.alphas_cumprod, "v_prediction"))
    assert plan.trainable_parameters() == []
    learned = make_plan({"loss_weighting": {"type": "learned"}})
    assert len(learned.trainable_parameters()) == 2


def test_captions_and_timesteps_are_reproducible():
    plan = make_plan({"caption": [{"type": "dropout", "rate": 0.5}], "timesteps": {"type": "uniform", "min_timestep": 100}})
    first = [plan.caption("a cat", rng=random.Random(s)) for s in range(20)]
    assert first == [plan.caption("a cat", rng=random.Random(s)) for s in range(20)]
    assert {d.dropped for d in first} == {True, False}
    assert all(d.text == ("" if d.dropped else "a cat") for d in first)
    t = plan.timesteps(512, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 100


def test_caption_audit_without_draws_reports_no_rates():
    # a run that stopped before loading a caption must not read as "dropout configured 0"
    plan = make_plan({"caption": [{"type": "dropout", "rate": 0.5}]})
    caption = plan.audit.records()["caption"]
    assert caption["samples"] == 0 and caption["dropout_rate_configured"] is None
    assert caption["dropout_rate_within_interval"] is None
    assert "no captions drawn" in plan.audit.summary()
    rng = random.Random(0)
    for _ in range(200):
        plan.caption("a photo", rng=rng)
    caption = plan.audit.records()["caption"]
    assert caption["dropout_rate_configured"] == pytest.approx(0.5) and caption["dropout_rate_within_interval"]
    assert "configured (ok)" in plan.audit.summary()


def test_plan_to_moves_a_learned_weightings_parameters_and_buffers_in_place():
    """The one move every host uses (a dtype stands in for a GPU, which CI lacks): buffers
    such as the Fourier frequencies must follow the parameters, or the first CUDA step fails."""
    plan = make_plan({"loss_weighting": {"type": "learned"}})
    parameters = plan.trainable_parameters()
    network = plan.loss_weighting.network
    plan.to(dtype=torch.float64)
    assert [p.dtype for p in network.parameters()] == [torch.float64] * len(parameters)
    assert {b.dtype for b in network.buffers()} == {torch.float64}
    assert all(a is b for a, b in zip(parameters, plan.trainable_parameters(), strict=True))  # optimizer refs stay valid
    loss = plan.weight(torch.ones(3, dtype=torch.float64), torch.tensor([1, 500, 999]))
    assert loss.dtype == torch.float64
    assert make_plan({}).to(dtype=torch.float64) is not None  # a plan with nothing to move
