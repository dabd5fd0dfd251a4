"""The public plan API a loop of one's own uses: build, streams, loss, optimizer, resume, audit."""

from __future__ import annotations

import functools
import io
import json

import pytest
import torch
from diffusers import DDPMScheduler

import sdplug
from sdplug.errors import SdplugError
from sdplug.plan.streams import stream_seed
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod, snr

PRESET = {
    "noise": [{"type": "pyramid", "discount": 0.8}],
    "timesteps": {"type": "logit_normal"},
    "loss_weighting": {"type": "min_snr", "gamma": 5.0},
    "caption": [{"type": "dropout", "rate": 0.5}],
}


def build(data=PRESET, **options):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    return parse_preset(data, path="api.toml").build(scheduler, **options)


def draws(plan, steps=3):
    out = []
    for _ in range(steps):
        noise = plan.noise(torch.zeros(2, 4, 8, 8))
        t = plan.timesteps(2)
        out.append((noise.target.clone(), t.clone(), [plan.caption("a cat").dropped for _ in range(4)]))
        plan.step()
    return out


def same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b, strict=True))


def test_build_reads_the_scheduler_and_explicit_values_win():
    plan = build()
    assert isinstance(plan, sdplug.Plan) and plan.prediction_type == "v_prediction"
    assert torch.allclose(plan.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6)
    explicit = parse_preset(PRESET, path="api.toml").build(
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon"
    )
    assert explicit.prediction_type == "epsilon" and explicit.num_train_timesteps == 1000
    with pytest.raises(SdplugError, match="needs a noise scheduler, or alphas_cumprod= and prediction_type="):
        parse_preset(PRESET, path="api.toml").build()


def test_streams_are_one_per_seed_rank_and_purpose():
    seeds = {stream_seed(s, r, p) for s in (0, 1) for r in (0, 1) for p in ("noise", "timesteps", "captions", "data")}
    assert len(seeds) == 16
    assert same(draws(build(seed=3)), draws(build(seed=3)))  # a seed repeats
    other_rank, other_seed = draws(build(seed=3, rank=1)), draws(build(seed=4))
    first = draws(build(seed=3))
    assert not torch.equal(first[0][0], other_rank[0][0]) and not torch.equal(first[0][0], other_seed[0][0])


def test_timesteps_do_not_depend_on_how_much_the_noise_draws():
    # separate streams: a noise strategy that draws more leaves the timesteps as they were
    plain, pyramid = build({"timesteps": {"type": "logit_normal"}}), build(PRESET)
    for _ in range(3):
        plain.noise(torch.zeros(2, 4, 8, 8)), pyramid.noise(torch.zeros(2, 4, 8, 8))
        assert torch.equal(plain.timesteps(2), pyramid.timesteps(2))


def test_an_explicit_generator_overrides_the_stream():
    plan = build()
    a = plan.noise(torch.zeros(1, 4, 8, 8), torch.Generator().manual_seed(5)).target
    b = build().noise(torch.zeros(1, 4, 8, 8), torch.Generator().manual_seed(5)).target
    assert torch.equal(a, b) and not torch.equal(a, build().noise(torch.zeros(1, 4, 8, 8)).target)


def test_state_dict_resumes_the_same_draws_through_a_weights_only_checkpoint():
    whole = draws(build(seed=2), steps=6)
    first = build(seed=2)
    draws(first, steps=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(seed=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert same(draws(resumed, steps=3), whole[3:])
    assert resumed.report()["steps"] == 6
    with pytest.raises(SdplugError, match="resume with the same seed"):
        build(seed=9).load_state_dict(first.state_dict())


def test_loss_is_the_per_sample_mse_then_the_weighting():
    plan = build()
    pred, target, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    ratio = snr(t, plan.alphas_cumprod)
    expected = mse * torch.minimum(ratio, torch.tensor(5.0)) / (ratio + 1)  # min-SNR-5 for v-prediction
    assert torch.allclose(plan.loss(pred, target, t), expected, rtol=1e-5)
    assert torch.allclose(plan.loss(pred, target, t, mask=torch.ones(3, 1, 8, 8)), expected, rtol=1e-5)  # all-ones mask
    with pytest.raises(SdplugError, match="shape"):
        plan.loss(pred, target[:, :2], t)


def test_optimizer_is_the_presets_or_the_default_and_learned_parameters_join():
    model = torch.nn.Linear(4, 4)
    default = functools.partial(torch.optim.SGD, lr=0.1)
    plain = build({}).optimizer(model.parameters(), default=default)
    assert isinstance(plain, torch.optim.SGD) and len(plain.param_groups) == 1
    learned = build({"loss_weighting": {"type": "learned"}, "optimizer": {"type": "adamw", "lr": 1e-3}})
    optimizer = learned.optimizer(model.parameters(), default=default)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["params"] == learned.trainable_parameters()
    with pytest.raises(SdplugError, match="names no optimizer"):
        build({}).optimizer(model.parameters())


def test_write_audit_holds_the_host_and_the_problems(tmp_path):
    plan = build()
    draws(plan, steps=2)
    path = plan.write_audit(tmp_path / "out", host={"name": "test loop", "version": "1"})
    audit = json.loads(path.read_text())
    assert audit["host"] == {"name": "test loop", "version": "1"} and audit["steps"] == 2
    assert audit["problems"] == ["loss weighting ran 0 times in 2 steps"]  # draws() never weighted a loss


def test_validation_calls_neither_shift_the_training_draws_nor_count():
    plain, validated = build(seed=1), build(seed=1)
    with validated.validation():
        validated.noise(torch.zeros(2, 4, 8, 8))
        t = validated.timesteps(2)
        validated.weight(torch.ones(2), t)
        validated.caption("a cat")
    assert same(draws(plain), draws(validated))
    assert validated.report()["loss_weighting"]["calls"] == 0 and validated.report()["caption"]["samples"] == 12


def test_default_timesteps_apply_only_when_the_preset_names_none():
    from sdplug.strategies.timesteps import UniformTimesteps

    narrow = UniformTimesteps(min_timestep=100, max_timestep=110)
    own = build({}, default_timesteps=narrow).timesteps(64)
    assert int(own.min()) >= 100 and int(own.max()) < 110
    assert int(build(PRESET, default_timesteps=narrow).timesteps(64).max()) >= 110  # the preset's logit-normal wins
    assert build({}).matches_schedule(scaled_linear_alphas_cumprod()) and not build({}).matches_schedule(torch.ones(1000))


# -- what every host shares: held caption decisions, optimizer groups, the problems policy -------
def test_deferred_caption_decisions_count_only_when_their_batch_trains():
    plan = build()
    with plan.deferred_captions() as held:
        fetched = [plan.caption("a cat").dropped for _ in range(6)]
    assert plan.report()["caption"]["samples"] == 0 and len(held) == 6
    plan.count_captions(held)
    caption = plan.report()["caption"]
    assert caption["samples"] == 6 and caption["dropped"] == sum(fetched)


def test_the_presets_lr_rules_every_group_but_frozen_ones_and_the_hosts_lr_rules_otherwise():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    groups = [{"params": [params[0]], "lr": 0}, {"params": [params[1]], "lr": 5e-4}, {"params": [params[2]], "lr": 2e-4}]
    with_lr = build({"optimizer": {"type": "adamw", "lr": 1e-3}})
    assert [g["lr"] for g in with_lr.optimizer(groups).param_groups] == [0, 1e-3, 1e-3]
    without_lr = build({"optimizer": {"type": "adamw"}})
    optimizer = without_lr.optimizer([p for p in params], host_lr=3e-5)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-5]
    report = without_lr.report()["optimizer"]
    assert report["strategy"] == "adamw" and report["class"] == "torch.optim.adamw.AdamW" and report["trainable_parameters"] == 6


@pytest.mark.parametrize("where,groups", [("own", 3), ("first", 2)])
def test_a_learned_weighting_joins_its_own_group_or_the_first_trained_one(where, groups):
    plan = build({"loss_weighting": {"type": "learned"}, "optimizer": {"type": "adamw", "lr": 1e-3}})
    frozen, trained = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = plan.optimizer([{"params": [frozen], "lr": 0}, {"params": [trained], "lr": 1e-4}], learned_group=where)
    assert len(optimizer.param_groups) == groups
    learned = {id(p) for p in plan.trainable_parameters()}
    holding = [g for g in optimizer.param_groups if learned <= {id(p) for p in g["params"]}]
    assert len(holding) == 1 and holding[0]["lr"] == 1e-3
    assert plan.report()["optimizer"]["learned_weighting_lr"] == [1e-3]


def test_the_problems_policy_names_what_the_host_never_asked_the_plan_for():
    plan = build({"optimizer": {"type": "adamw"}, "attention": {"type": "sdpa"}})
    report = plan.report()
    assert report["completed"] is True
    assert report["problems"] == [
        "no training step ran (plan.step() was never called): nothing the preset names is proven applied",
        "optimizer 'adamw' was never built (the host did not call plan.optimizer)",
        "attention 'sdpa' was never installed (the host did not call plan.attention)",
    ]
    plan.attention(torch.nn.Module(), install=lambda kind: {"changed": 3, "how": f"the host's {kind} switch"})
    plan.optimizer([torch.nn.Parameter(torch.zeros(1))])
    plan.step()
    assert plan.report()["problems"] == [] and plan.report()["attention"] == {
        "strategy": "sdpa",
        "changed": 3,
        "how": "the host's sdpa switch",
    }
    plan.record_failure(RuntimeError("out of memory"))
    report = plan.report()
    assert report["completed"] is False and report["problems"] == ["stopped at step 1 by RuntimeError: out of memory"]


# -- [schedule] zero_terminal_snr ------------------------------------------------------------------
def test_zero_terminal_snr_rescales_the_plans_schedule_keeping_its_first_step():
    plain = build({})
    rescaled = build({"schedule": {"zero_terminal_snr": True}})  # a v-prediction scheduler
    assert rescaled.alphas_cumprod[-1] == 0 and plain.alphas_cumprod[-1] > 0
    assert torch.isclose(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6)
    assert bool((rescaled.alphas_cumprod[1:] <= rescaled.alphas_cumprod[:-1]).all())  # still decreasing
    again = parse_preset({"schedule": {"zero_terminal_snr": True}}, path="z.toml").build(
        alphas_cumprod=rescaled.alphas_cumprod, prediction_type="v_prediction"
    )
    assert torch.equal(again.alphas_cumprod, rescaled.alphas_cumprod)  # a host that rescaled already: unchanged
    t = torch.tensor([999, 999])
    loss = build({"schedule": {"zero_terminal_snr": True}, "loss_weighting": {"type": "min_snr"}}).loss(
        torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), t
    )
    assert bool(torch.isfinite(loss).all())
    report = rescaled.report()["schedule"]
    assert report["zero_terminal_snr"] is True and report["alpha_cumprod_last"] == 0.0


def test_zero_terminal_snr_with_an_epsilon_model_is_refused_unless_the_preset_says_it_knows():
    from sdplug.errors import PresetError

    preset = parse_preset({"schedule": {"zero_terminal_snr": True}}, path="z.toml")
    with pytest.raises(PresetError, match=r"z\.toml.*schedule\.zero_terminal_snr.*epsilon_ok = true"):
        preset.build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    knows = parse_preset({"schedule": {"zero_terminal_snr": True, "epsilon_ok": True}}, path="z.toml")
    assert knows.build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon").alphas_cumprod[-1] == 0
    with pytest.raises(PresetError, match=r"schedule.*zero_terminal"):
        parse_preset({"schedule": {"zero_terminal": True}}, path="z.toml")  # unknown key, named


def test_a_cached_text_dropout_decision_in_validation_neither_counts_nor_shifts_training():
    training, validating = build(), build()
    with validating.validation():
        [validating.caption_dropped() for _ in range(5)]
    assert validating.report()["caption"]["samples"] == 0
    assert [training.caption_dropped() for _ in range(8)] == [validating.caption_dropped() for _ in range(8)]
