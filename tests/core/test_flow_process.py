"""The rectified-flow process: its sigmas, input, target and time against diffusers and the
formulas, SNR-based weightings on velocity against their sigma-space form, and the refusals
of what a flow plan cannot take."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sdplug
from sdplug.errors import SdplugError
from sdplug.plan import NoiseDraw, bind
from sdplug.preset import parse_preset
from sdplug.process import DDPM, Flow, flow_sigmas
from sdplug.schedule import scaled_linear_alphas_cumprod, snr


def flow_plan(data: dict | None = None, shift: float = 3.0, steps: int = 1000, **options):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    return bind(parse_preset(data or {}, path="flow.toml"), scheduler, **options)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_the_sigmas_are_diffusers_flow_sigmas_lowest_noise_first(shift):
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas
    ours = flow_sigmas(1000, shift)
    assert torch.allclose(ours, theirs.flip(0).float(), atol=1e-6)
    assert ours[-1] == 1.0 and bool((ours[1:] > ours[:-1]).all())


def test_input_target_and_model_time_are_the_flow_formulas():
    sigmas = flow_sigmas(1000, 3.0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 700, 999])
    s = sigmas[t].view(-1, 1, 1, 1)
    velocity = Flow(sigmas, "velocity", 3.0)
    assert torch.allclose(velocity.noisy_input(x0, noise, t), (1 - s) * x0 + s * noise)
    assert torch.allclose(velocity.target(x0, noise, t), noise - x0)
    assert torch.allclose(velocity.model_time(t), sigmas[t] * 1000)
    reversed_ = Flow(sigmas, "velocity_reversed", 3.0)  # Lumina 2: x0 - noise, time 1 - sigma
    assert torch.allclose(reversed_.target(x0, noise, t), x0 - noise)
    assert torch.allclose(reversed_.model_time(t), (1 - sigmas[t]) * 1000)
    # at sigma = 1 the input is the noise alone: no zero-terminal rescaling is needed
    assert torch.equal(velocity.noisy_input(x0, noise, torch.tensor([999] * 4)), noise)


def test_a_flow_process_gives_the_table_of_its_snr():
    sigmas = flow_sigmas(1000, 3.0)
    t = torch.arange(0, 1000, 37)
    expected = ((1 - sigmas[t].double()) / sigmas[t].double()) ** 2
    got = snr(t, Flow(sigmas).alphas_cumprod)
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    assert got[-1] == 0 or snr(torch.tensor([999]), Flow(sigmas).alphas_cumprod) == 0


# each SNR weighting written directly in sigma, the velocity error's weight: w_x0(SNR) * sigma^2
def _sigma_space(name: str, s: torch.Tensor) -> torch.Tensor:
    r = (1 - s) / s  # sqrt(SNR)
    return {
        "constant": torch.ones_like(s),
        "snr": (1 - s) ** 2,
        "min_snr": torch.minimum(r**2, torch.tensor(5.0, dtype=s.dtype)) * s**2,
        "max_snr": torch.maximum(r**2, torch.tensor(1.0, dtype=s.dtype)) * s**2,
        "soft_min_snr": r**2 * 5.0 / (r**2 + 5.0) * s**2,
        "debiased": (1 - s) * s,
        "p2": (1 - s) ** 2 / (1.0 + r**2),
        # SD3's two, on the x0 error as diffusers' SD3 scripts (preconditioned) and kohya (sigma_scaled) apply them
        "sigma_sqrt": s**-2 * s**2,
        "cosmap": 2 / (torch.pi * (1 - 2 * s + 2 * s**2)) * s**2,
    }[name]


FLOW_WEIGHTINGS = ["constant", "snr", "min_snr", "max_snr", "soft_min_snr", "debiased", "p2", "sigma_sqrt", "cosmap"]


@pytest.mark.parametrize("prediction_type", ["velocity", "velocity_reversed"])
@pytest.mark.parametrize("name", FLOW_WEIGHTINGS)
def test_snr_weightings_on_velocity_match_their_sigma_space_form(name, prediction_type):
    plan = flow_plan({"loss_weighting": {"type": name}}, prediction_type=prediction_type)
    t = torch.tensor([0, 5, 100, 400, 700, 950, 999])
    s = plan.process.sigmas[t].double()
    got = plan.loss_weighting.weights(t, plan.alphas_cumprod, plan.prediction_type).double()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, _sigma_space(name, s), rtol=2e-3, atol=1e-6)


def test_min_snr_on_velocity_reduces_to_its_two_regimes():
    """Noisy steps (SNR < gamma) keep (1 - sigma)^2, the SNR weight; clean ones gamma sigma^2."""
    plan = flow_plan({"loss_weighting": {"type": "min_snr", "gamma": 5.0}})
    t = torch.arange(1000)
    s = plan.process.sigmas.double()
    w = plan.loss_weighting.weights(t, plan.alphas_cumprod, plan.prediction_type).double()
    noisy = ((1 - s) / s) ** 2 < 5.0
    assert noisy.any() and (~noisy).any()
    assert torch.allclose(w[noisy], (1 - s[noisy]) ** 2, rtol=1e-3)
    assert torch.allclose(w[~noisy], 5.0 * s[~noisy] ** 2, rtol=1e-3)


def test_the_scheduled_huber_threshold_runs_the_ddpm_direction_on_flow():
    """c_t -> c at high noise (sigma -> 1), -> 1 at low noise, computed from SNR(sigma)."""
    plan = flow_plan({"loss": {"type": "pseudo_huber", "c": 0.1, "schedule": "snr"}})
    t = torch.tensor([0, 500, 999])
    c = plan.loss_type.threshold(t, plan.alphas_cumprod, torch.zeros(3, 1)).flatten()
    s = plan.process.sigmas[t].double()
    inverse_root_snr = s / (1 - s).clamp_min(1e-12)  # DDPM's sigma_t = sqrt((1 - a) / a) = 1 / sqrt(SNR)
    expected = (1 - 0.1) / (1 + inverse_root_snr) ** 2 + 0.1
    assert torch.allclose(c.double(), expected, rtol=1e-3, atol=1e-6)
    assert c[0] > 0.99 and abs(float(c[-1]) - 0.1) < 1e-6 and c[0] > c[1] > c[2]


def test_a_flow_plan_draws_trains_and_records_its_process():
    plan = flow_plan({"timesteps": {"type": "logit_normal"}, "loss_weighting": {"type": "min_snr"}}, seed=1)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    optimizer = plan.optimizer(model.parameters(), default=lambda p: torch.optim.AdamW(p, lr=1e-2))
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    for _ in range(3):
        t = plan.timesteps(len(x0))
        noise = plan.noise(x0, timesteps=t)
        prediction = model(plan.noisy_input(x0, noise, t))
        loss = plan.loss(prediction, plan.target(x0, noise, t), t).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        plan.step()
    report = plan.report()
    assert report["schedule"]["process"] == "flow" and report["schedule"]["shift"] == 3.0
    assert report["schedule"]["prediction_type"] == "velocity" and report["problems"] == []
    assert sum(report["timesteps"]["histogram"]) == 24 and report["loss_weighting"]["calls"] == 3
    assert report["timesteps"]["binned_by"] == "sigma" and report["loss_weighting"]["bin_edges"][-1] == 1.0
    assert "rectified flow, velocity prediction, shift 3" in plan.summary()
    assert "% in each tenth of sigma" in plan.summary()


def test_the_flow_audit_bins_sigma_not_the_index():
    """With shift 3 most indices carry sigma above 0.5: the histogram counts each draw's sigma."""
    plan = flow_plan()
    t = torch.tensor([0, 100, 500, 999])  # sigmas 0.003, 0.25, 0.75, 1.0
    plan.audit.record_timesteps(t)
    bins = plan.audit.records()["timesteps"]["histogram"]
    expected = [0] * 10
    for sigma in plan.process.sigmas[t].tolist():
        expected[min(int(sigma * 10), 9)] += 1
    assert bins == expected and bins[0] == 1 and bins[9] == 1


def test_a_ddpm_plan_records_its_process_as_before(sd_alphas):
    plan = bind(parse_preset({}, path="p.toml"), alphas_cumprod=sd_alphas, prediction_type="epsilon")
    assert isinstance(plan.process, DDPM)
    assert plan.report()["schedule"]["process"] == "ddpm"
    assert torch.equal(plan.model_time(torch.tensor([3, 999])), torch.tensor([3, 999]))


def test_a_ddpm_only_strategy_on_a_flow_model_is_refused_naming_file_key_and_what_is_allowed():
    with pytest.raises(sdplug.PresetError) as info:
        flow_plan({"noise": [{"type": "gaussian"}, {"type": "generalized_offset", "strength": 0.1}]})
    message = str(info.value)
    assert "flow.toml" in message and "noise[1].type" in message and "'generalized_offset'" in message
    assert "Allowed on flow: gaussian, immiscible, input_perturbation, offset" in message
    with pytest.raises(sdplug.PresetError, match="v_pred_like_loss.*written for ddpm"):
        flow_plan({"loss_weighting": {"type": "v_pred_like_loss"}})


def test_a_preset_shift_on_a_shifted_scheduler_is_refused_never_doubled():
    with pytest.raises(sdplug.PresetError, match=r"timesteps.shift.*shifted twice"):
        flow_plan({"timesteps": {"type": "logit_normal", "shift": 3.0}}, shift=3.0)
    plan = flow_plan({"timesteps": {"type": "logit_normal", "shift": 3.0}}, shift=1.0)  # the shift acts once
    assert plan.process.shift == 1.0 and plan.timestep_sampler.shift == 3.0


def test_zero_terminal_snr_on_a_flow_model_is_refused():
    with pytest.raises(sdplug.PresetError, match="schedule.zero_terminal_snr.*sigma = 1 already is"):
        flow_plan({"schedule": {"zero_terminal_snr": True}})


def test_what_cannot_be_a_flow_process_is_refused_with_what_is_allowed():
    with pytest.raises(SdplugError, match="rectified-flow scheduler.*'epsilon' a DDPM one"):
        flow_plan(prediction_type="epsilon")
    dynamic = bind(parse_preset({}, path="p.toml"), FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(SdplugError, match=r"latent_size=\(height, width\)"):
        dynamic.timesteps(2)
    with pytest.raises(sdplug.PresetError, match="biased.*written for ddpm"):
        flow_plan({"timesteps": {"type": "biased", "bias": "later"}})
    with pytest.raises(SdplugError, match="rectified-flow type"):
        bind(parse_preset({}, path="p.toml"), alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="velocity")
    with pytest.raises(SdplugError, match="ascend"):
        Flow(flow_sigmas(10).flip(0))


def test_a_plugin_declaring_an_unknown_process_is_refused_when_it_registers():
    from sdplug.registry import Registry
    from sdplug.strategies.base import TimestepStrategy
    from sdplug.strategies.timesteps import UniformTimesteps

    class OnSde(UniformTimesteps):
        processes = frozenset({"sde"})

    with pytest.raises(sdplug.PluginError, match="processes.*allowed: a non-empty set of ddpm, flow"):
        Registry("timesteps", TimestepStrategy).register("on_sde", OnSde)


def test_the_readme_flow_table_says_what_each_strategy_declares():
    """The README's table of the flow forms lists, per family, exactly the strategies that
    declare flow (or says "all" where every one does)."""
    import re
    from pathlib import Path

    from sdplug.strategies import registry

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### On rectified-flow models", 1)[1].split("Python:", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([a-z_]+) \| ([^|]*) \|", section, re.M)}
    for family in ("noise", "timesteps", "loss", "loss_weighting"):
        names = registry(family).names()
        on_flow = [n for n in names if "flow" in registry(family).get(n).cls.processes]
        listed = re.findall(r"`([a-z0-9_]+)`", rows[family].split(":")[0])
        if rows[family].startswith("all"):
            assert on_flow == names, family
        else:
            assert sorted(listed) == sorted(on_flow), family


def test_a_shifted_scheduler_maps_each_position_to_its_shifted_sigma():
    """Position i / N lands within 1 / (2N) of diffusers' shifted sigma of index i (ascending)."""
    plan = flow_plan(shift=3.0)
    n = plan.num_train_timesteps
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=3.0).sigmas.flip(0).double()
    position = torch.arange(n, dtype=torch.float64) / n
    ours = plan.process.sigmas.double()[plan.process.index(position)]
    assert (ours - theirs).abs().max() <= 0.5 / n + 1e-6


def _ks(sigmas: torch.Tensor, cdf) -> float:
    """The Kolmogorov-Smirnov distance of draws to a CDF."""
    x = sigmas.double().sort().values
    n = len(x)
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float((empirical - cdf(x)).abs().max())


def test_uniform_on_a_shifted_flow_draws_the_shifted_law():
    """u uniform, sigma = 3u / (1 + 2u): P(sigma <= x) = x / (3 - 2x)."""
    plan = flow_plan(shift=3.0, seed=4)
    sigmas = plan.process.sigmas[plan.timesteps(20000)]
    assert _ks(sigmas, lambda x: x / (3 - 2 * x)) < 0.015  # 1.36 / sqrt(20000) = 0.0096, plus the grid


def test_logit_normal_on_flow_is_the_sd3_rf_lognorm_law():
    """Esser et al. 2024's rf/lognorm(0, 1): P(sigma <= x) = Phi(logit(x))."""
    plan = flow_plan({"timesteps": {"type": "logit_normal"}}, shift=1.0, seed=5)
    sigmas = plan.process.sigmas[plan.timesteps(20000)]
    normal = torch.distributions.Normal(0.0, 1.0)
    assert _ks(sigmas, lambda x: normal.cdf(torch.logit(x.clamp(1e-9, 1 - 1e-9)))) < 0.015


def test_the_resolution_dependent_shift_is_fluxs():
    """mu linear in the token count (FLUX: 0.5 at 256, 1.15 at 4096; 1024 tokens: 0.63, as
    diffusers' calculate_shift gives), sigma' = e^mu / (e^mu + 1 / sigma - 1) (the scheduler's
    own time_shift), recorded per latent size."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    plan = bind(parse_preset({}, path="p.toml"), scheduler, seed=6)
    assert plan.process.dynamic.mu(64, 64) == pytest.approx(0.63)
    n = plan.num_train_timesteps
    position = torch.arange(n, dtype=torch.float64) / n
    for size in ((32, 32), (64, 64), (128, 96)):
        mu = plan.process.dynamic.mu(*size)
        expected = scheduler.time_shift(mu, 1.0, (position + 1 / n)).double()
        ours = plan.process.sigmas.double()[plan.process.index(position, size)]
        assert (ours - expected).abs().max() <= 0.5 / n + 1e-6
        plan.timesteps(4, latent_size=size)
    bigger = plan.process.sigmas[plan.process.index(position, (128, 128))]
    smaller = plan.process.sigmas[plan.process.index(position, (32, 32))]
    assert bool((bigger >= smaller).all()) and bigger.mean() > smaller.mean()  # more tokens, noisier
    report = plan.report()
    assert report["schedule"]["shift"] == "dynamic" and report["schedule"]["dynamic_shift"]["max_shift"] == 1.15
    assert report["timesteps"]["mu_per_latent_size"] == {
        f"{h}x{w}": pytest.approx(plan.process.dynamic.mu(h, w)) for h, w in ((32, 32), (64, 64), (128, 96))
    }


def test_input_perturbation_on_flow_is_kohyas_flow_form():
    """x_t = (1 - s) x0 + s (noise + gamma xi), the target noise - x0 from the clean noise."""
    plan = flow_plan({"noise": [{"type": "input_perturbation", "gamma": 0.1}]}, seed=2)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = plan.timesteps(4)
    draw = plan.noise(x0, timesteps=t)
    s = plan.process.sigmas[t].view(-1, 1, 1, 1)
    xi = (draw.model_input - draw.target) / 0.1
    assert 0.8 < float(xi.std()) < 1.2  # the extra Gaussian, gamma 0.1
    assert torch.allclose(plan.noisy_input(x0, draw, t), (1 - s) * x0 + s * (draw.target + 0.1 * xi), atol=1e-6)
    assert torch.allclose(plan.target(x0, draw, t), draw.target - x0)


def test_offset_noise_on_flow_shifts_what_sigma_1_looks_like():
    """At sigma = 1 the model input is the noise itself: an offset's per-channel shift is there
    whole, which is why sampling starts from the training noise family."""
    plan = flow_plan({"noise": [{"type": "offset", "strength": 0.5}]}, seed=3)
    x0 = torch.zeros(64, 4, 16, 16)
    t = torch.full((64,), plan.num_train_timesteps - 1)
    x_1 = plan.noisy_input(x0, plan.noise(x0, timesteps=t), t)
    channel_means = x_1.mean(dim=(2, 3)).flatten()
    # N(0, I) gives channel means of variance 1 / 256; the offset adds 0.5^2
    assert 0.15 < float(channel_means.var()) < 0.4


def test_a_presets_flow_shift_shifts_the_sigmas_once():
    """[schedule] flow_shift = 3 with an unshifted scheduler: the uniform law shifted by 3
    (P(sigma <= x) = x / (3 - 2x)), recorded; with a shifted scheduler, or on DDPM, refused."""
    plan = flow_plan({"schedule": {"flow_shift": 3.0}}, shift=1.0, seed=7)
    assert plan.process.shift == 3.0 and plan.report()["schedule"]["shift"] == 3.0
    sigmas = plan.process.sigmas[plan.timesteps(20000)]
    assert _ks(sigmas, lambda x: x / (3 - 2 * x)) < 0.015
    with pytest.raises(sdplug.PresetError, match=r"schedule.flow_shift.*already shifts its sigmas \(shift 3\)"):
        flow_plan({"schedule": {"flow_shift": 3.0}}, shift=3.0)
    with pytest.raises(sdplug.PresetError, match="schedule.flow_shift.*DDPM one"):
        bind(
            parse_preset({"schedule": {"flow_shift": 3.0}}, path="p.toml"),
            alphas_cumprod=scaled_linear_alphas_cumprod(),
            prediction_type="epsilon",
        )


def test_a_presets_dynamic_shift_follows_the_latent_size():
    preset = {"schedule": {"dynamic_shift": True, "base_shift": 0.5, "max_shift": 1.15}}
    plan = flow_plan(preset, shift=1.0, seed=8)
    assert plan.report()["schedule"]["dynamic_shift"]["base_seq_len"] == 256
    small = plan.process.sigmas[plan.timesteps(4000, latent_size=(32, 32))].mean()
    large = plan.process.sigmas[plan.timesteps(4000, latent_size=(128, 128))].mean()
    assert large > small + 0.05  # 4096 tokens: mu 1.15; 256 tokens: mu 0.5
    with pytest.raises(sdplug.PresetError, match="schedule.dynamic_shift.*already shifts"):
        bind(parse_preset(preset, path="p.toml"), FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(sdplug.PresetError, match="schedule.flow_shift.*one of them acts"):
        parse_preset({"schedule": {"dynamic_shift": True, "flow_shift": 2.0}}, path="p.toml")
    with pytest.raises(sdplug.PresetError, match="schedule.max_seq_len"):
        parse_preset({"schedule": {"dynamic_shift": True, "max_seq_len": 100}}, path="p.toml")


def test_the_dynamic_shift_counts_the_models_own_latent_patches():
    """A host that knows its model gives the process its latent patch, and the dynamic shift counts
    (H / p) (W / p) tokens: on one 32x32 latent, HunyuanImage-2.1's 1x1 patches are 1024 tokens and
    FLUX's 2x2 ones 256. A written patch_size that disagrees with the model's is refused; where the
    host does not say, the written one stands, else FLUX's 2."""

    def bound(schedule: dict, patch: int | None):
        preset = parse_preset({"schedule": {"dynamic_shift": True, **schedule}}, path="p.toml")
        return bind(preset, process=Flow(flow_sigmas(1000), patch_size=patch), seed=5)

    ones, twos = bound({}, 1), bound({}, 2)
    assert ones.process.dynamic.mu(32, 32) == pytest.approx(0.5 + 0.65 * (1024 - 256) / (4096 - 256))
    assert twos.process.dynamic.mu(32, 32) == pytest.approx(0.5)
    assert ones.report()["schedule"]["dynamic_shift"]["patch_size"] == 1
    # one seed, one stream of positions: 1x1 patches of a 64x64 latent are as many tokens as 2x2
    # patches of a 128x128 one (4096: mu 1.15), so the same sigmas; on one latent, more noise
    torch.testing.assert_close(ones.timesteps(4000, latent_size=(64, 64)), twos.timesteps(4000, latent_size=(128, 128)))
    sigmas_1 = ones.process.sigmas[ones.timesteps(4000, latent_size=(64, 64))]
    sigmas_2 = twos.process.sigmas[twos.timesteps(4000, latent_size=(64, 64))]
    assert float(sigmas_1.mean()) > float(sigmas_2.mean()) + 0.05
    assert bound({}, None).process.dynamic.patch_size == 2
    assert bound({"patch_size": 4}, None).process.dynamic.patch_size == 4
    assert bound({"patch_size": 1}, 1).process.dynamic.patch_size == 1
    with pytest.raises(sdplug.PresetError, match=r"schedule.patch_size = 2, and this model embeds 1x1 latent patches") as e:
        bound({"patch_size": 2}, 1)
    assert e.value.path == "p.toml" and e.value.key == "schedule.patch_size"
    assert "leave schedule.patch_size out (the model's 1), or 1" in str(e.value)


@pytest.mark.parametrize("name", ["flow-lognorm", "flow-min-snr", "flux-dynamic-shift"])
def test_the_shipped_flow_presets_bind_to_a_flow_model_and_not_to_ddpm(name):
    preset = sdplug.load_preset(name)
    plan = preset.build(FlowMatchEulerDiscreteScheduler(shift=1.0))
    assert plan.process.kind == "flow" and plan.timesteps(4, latent_size=(64, 64)).shape == (4,)
    if name == "flux-dynamic-shift":
        assert plan.process.dynamic is not None
        with pytest.raises(SdplugError):
            preset.build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")


def test_sd3s_weightings_are_rectified_flows_and_refused_on_ddpm(sd_alphas):
    for name in ("sigma_sqrt", "cosmap"):
        with pytest.raises(sdplug.PresetError, match=f"'{name}' is written for flow"):
            bind(
                parse_preset({"loss_weighting": {"type": name}}, path="p.toml"),
                alphas_cumprod=sd_alphas,
                prediction_type="v_prediction",
            )
    plan = flow_plan({"loss_weighting": {"type": "cosmap"}})
    w = plan.loss_weighting.weights(torch.tensor([0, 999]), plan.alphas_cumprod, "velocity")
    assert float(w[0]) < 1e-5 and float(w[1]) == pytest.approx(2 / torch.pi, rel=1e-4)


def test_the_learned_weighting_learns_on_a_flow_model():
    """EDM2's u(log SNR) over a flow's SNR, ((1 - sigma) / sigma)^2: it trains, starts at weight 1,
    and its features see the whole range of noise levels."""
    plan = flow_plan({"loss_weighting": {"type": "learned"}}, seed=9)
    t = torch.arange(0, 1000, 7)
    assert torch.allclose(plan.loss_weighting.weights(t, plan.alphas_cumprod, "velocity"), torch.ones(len(t)))
    optimizer = plan.optimizer([torch.nn.Parameter(torch.zeros(1))], default=lambda p: torch.optim.Adam(p, lr=0.05))
    for _ in range(20):
        loss = plan.weight(torch.full((len(t),), 4.0), t).mean()  # a loss scale of 4 everywhere: u -> log 4
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = plan.loss_weighting.weights(t, plan.alphas_cumprod, "velocity")
    assert torch.isfinite(weights).all() and float(weights.mean()) < 0.8


# kohya's --model_prediction_type, expressed on the process (sdplug.process's docstring)
def _draw(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise, output = (torch.randn(6, 3, 8, 8, generator=g) for _ in range(3))
    return x0, noise, output, torch.tensor([0, 100, 333, 500, 800, 999])


@pytest.mark.parametrize("prediction_type", ["velocity", "velocity_reversed"])
def test_a_sigma_scaled_output_is_sd3s_preconditioned_x0_loss(prediction_type):
    """SD3's scripts: x0^ = x_t - s v^ against x0 (reversed: x_t + s v^, as x_t = x0 - s (x0 - eps)).
    Its error is -s (v^ - v), so the MSE is s^2 times the velocity MSE, and sigma_sqrt's s^-2 on it
    gives the plain velocity MSE back."""
    sigmas = flow_sigmas(1000)
    x0, noise, output, t = _draw()
    scaled = Flow(sigmas, prediction_type, output="sigma_scaled")
    raw = Flow(sigmas, prediction_type)
    s = sigmas[t].view(-1, 1, 1, 1)
    x_t = scaled.noisy_input(x0, noise, t)
    sign = 1 if prediction_type == "velocity_reversed" else -1
    assert torch.allclose(scaled.prediction(output, x_t, t), x_t + sign * s * output)
    assert torch.equal(scaled.target(x0, noise, t), x0)
    assert scaled.loss_space == "sample" and raw.loss_space == prediction_type
    x0_error = scaled.prediction(output, x_t, t) - scaled.target(x0, noise, t)
    v_error = raw.prediction(output, x_t, t) - raw.target(x0, noise, t)
    assert torch.allclose(x0_error, sign * s * v_error, atol=1e-5)
    plain = bind(parse_preset({}, path="p.toml"), process=raw)
    for data in ({"loss_weighting": {"type": "sigma_sqrt"}}, {"loss_weighting": {"type": "min_snr"}}):
        on_x0 = bind(parse_preset(data, path="p.toml"), process=scaled)
        on_v = bind(parse_preset(data, path="p.toml"), process=raw)
        a = on_x0.loss(on_x0.prediction(output, x_t, t), on_x0.target(x0, NoiseDraw(noise, noise), t), t)
        b = on_v.loss(on_v.prediction(output, x_t, t), on_v.target(x0, NoiseDraw(noise, noise), t), t)
        assert torch.allclose(a, b, rtol=1e-4)  # one weighting in x0, whichever space the loss is in
    # sigma_sqrt on the x0 loss is exactly the velocity MSE (SD3's default pairing)
    sd3 = bind(parse_preset({"loss_weighting": {"type": "sigma_sqrt"}}, path="p.toml"), process=scaled)
    got = sd3.loss(sd3.prediction(output, x_t, t), x0, t)
    assert torch.allclose(got, plain.loss(output, raw.target(x0, noise, t), t), rtol=1e-4)
    assert sd3.report()["schedule"]["output"] == "sigma_scaled"


def test_an_additive_output_learns_velocity_minus_the_input_and_steps_with_output_plus_input():
    """kohya's FLUX ``additive``: v^ + x_t against v, so the loss is zero when the output is
    v - x_t, and the velocity a sampler steps with is output + x_t."""
    sigmas = flow_sigmas(1000)
    x0, noise, _, t = _draw(1)
    additive = Flow(sigmas, output="additive")
    x_t = additive.noisy_input(x0, noise, t)
    v = noise - x0
    perfect = v - x_t
    assert torch.allclose(additive.prediction(perfect, x_t, t), additive.target(x0, noise, t), atol=1e-6)
    assert torch.allclose(additive.velocity(perfect, x_t), v, atol=1e-6)
    assert additive.loss_space == "velocity"
    assert torch.equal(Flow(sigmas, output="sigma_scaled").velocity(v, x_t), v)  # still a velocity model
    with pytest.raises(SdplugError, match="raw, sigma_scaled, additive"):
        Flow(sigmas, output="scaled")


def test_a_ddpm_plans_prediction_is_the_output_itself(sd_alphas):
    plan = bind(parse_preset({}, path="p.toml"), alphas_cumprod=sd_alphas, prediction_type="epsilon")
    output = torch.randn(2, 4, 8, 8)
    assert plan.prediction(output, torch.randn(2, 4, 8, 8), torch.tensor([1, 2])) is output


def _chi_square(sigmas: torch.Tensor, cdf, bins: int = 20) -> float:
    """Pearson's chi-square of draws over ``bins`` equal-probability bins of a CDF's law (the
    bin edges by bisection on the CDF)."""
    x = sigmas.double()
    edges = [0.0]
    for k in range(1, bins):
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if float(cdf(torch.tensor([mid], dtype=torch.float64))) < k / bins else (low, mid)
        edges.append((low + high) / 2)
    counts = torch.bucketize(x, torch.tensor(edges[1:], dtype=torch.float64))
    observed = torch.bincount(counts, minlength=bins).double()
    expected = len(x) / bins
    return float(((observed - expected) ** 2 / expected).sum())


# chi-square, 19 degrees of freedom: 43.8 is the 0.999 quantile
CHI2_19_999 = 43.8
_PHI = torch.distributions.Normal(0.0, 1.0).cdf


def _logit(x):
    return torch.logit(x.clamp(1e-12, 1 - 1e-12))


def _mode_cdf(scale: float):
    """P(t <= x) for t = 1 - u - scale (cos^2(pi u / 2) - 1 + u), decreasing in u: 1 - u(x),
    u(x) by bisection."""

    def cdf(x):
        low, high = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            mid = (low + high) / 2
            t = 1 - mid - scale * (torch.cos(torch.pi / 2 * mid) ** 2 - 1 + mid)
            low, high = torch.where(t > x, mid, low), torch.where(t > x, high, mid)
        return 1 - (low + high) / 2

    return cdf


# a table this fine puts the grid's rounding (up to 1 / N in sigma, more where a shift is steep)
# far below what 20000 draws resolve: the tests compare laws, not the table
FINE = 100_000

# each position sampler on an unshifted flow, against its law written independently
SAMPLER_LAWS = {
    "uniform": ({}, lambda x: x),
    "stratified": ({}, lambda x: x),
    "logit_normal": ({"mean": 0.5, "std": 0.8}, lambda x: _PHI((_logit(x) - 0.5) / 0.8)),
    "beta": ({"alpha": 0.5, "beta": 1.0}, lambda x: x.sqrt()),
    "cosmap": ({}, lambda x: 2 / torch.pi * torch.atan(x / (1 - x).clamp_min(1e-12))),
    "mode": ({"scale": 1.29}, _mode_cdf(1.29)),
    "heavy_tail": ({"scale": -0.5}, _mode_cdf(-0.5)),
}


@pytest.mark.parametrize("name", sorted(SAMPLER_LAWS))
def test_every_position_sampler_on_flow_draws_its_law(name):
    params, cdf = SAMPLER_LAWS[name]
    plan = flow_plan({"timesteps": {"type": name, **params}}, shift=1.0, steps=FINE, seed=11)
    sigmas = torch.cat([plan.process.sigmas[plan.timesteps(500)] for _ in range(40)])  # batches, as hosts draw
    assert _chi_square(sigmas, cdf) < CHI2_19_999


def test_kohyas_flow_samplers_are_logit_normal_with_their_shift():
    """kohya's flow ``--timestep_sampling``: ``sigmoid`` is sigmoid(scale N(0, 1)), i.e.
    logit_normal with std = sigmoid_scale; ``shift`` shifts it by ``discrete_flow_shift``
    (s x / (1 + (s - 1) x)); ``flux_shift`` by FLUX's resolution-dependent shift with mu from
    (H // 2)(W // 2) tokens (0.5 at 256, 1.15 at 4096). Each law is inverted here by hand."""
    scale = 1.3
    sigmoid = flow_plan({"timesteps": {"type": "logit_normal", "std": scale}}, shift=1.0, steps=FINE, seed=100)
    draws = sigmoid.process.sigmas[sigmoid.timesteps(20000)]
    assert _chi_square(draws, lambda x: _PHI(_logit(x) / scale)) < CHI2_19_999
    k = 3.1582  # kohya's recommended FLUX discrete_flow_shift
    shifted = flow_plan(
        {"timesteps": {"type": "logit_normal", "std": scale}, "schedule": {"flow_shift": k}}, shift=1.0, steps=FINE, seed=101
    )
    draws = shifted.process.sigmas[shifted.timesteps(20000)]
    assert _chi_square(draws, lambda x: _PHI(_logit(x / (k - (k - 1) * x)) / scale)) < CHI2_19_999
    flux = flow_plan(
        {"timesteps": {"type": "logit_normal", "std": scale}, "schedule": {"dynamic_shift": True}},
        shift=1.0,
        steps=FINE,
        seed=102,
    )
    h, w = 64, 48
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((h // 2) * (w // 2) - 256)
    draws = flux.process.sigmas[flux.timesteps(20000, latent_size=(h, w))]
    assert _chi_square(draws, lambda x: _PHI(_logit(1 / (1 + math.exp(mu) * (1 / x - 1))) / scale)) < CHI2_19_999
    # and the test can tell them apart: the unshifted law fails against the flux-shifted draws
    assert _chi_square(draws, lambda x: _PHI(_logit(x) / scale)) > 10 * CHI2_19_999
