"""Loss types: each formula per sample (its own timestep's threshold), masking, presets, errors."""

import math

import pytest
import torch

import sdplug
from sdplug.preset import parse_preset
from sdplug.schedule import rescale_zero_terminal_snr, scaled_linear_alphas_cumprod
from sdplug.strategies.loss import huber_threshold, resize_mask
from tests.core.test_no_sync import syncs_raise_inside

LOSSES = sdplug.available("loss")
SCHEDULED = ("pseudo_huber", "smooth_l1")
T = torch.tensor([0, 250, 999])  # a different timestep per sample


def pair(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)


def kohya_threshold(t: int, c: float, schedule: str, scale: float, alphas) -> float:
    """kohya sd-scripts get_huber_threshold_if_needed, one timestep (scale applied to every schedule here)."""
    a = alphas[t].double().item()
    if schedule == "constant":
        return c * scale
    if schedule == "exponential":
        return math.exp(math.log(c) / len(alphas) * t) * scale
    sigma = math.sqrt((1 - a) / a)
    return ((1 - c) / (1 + sigma) ** 2 + c) * scale


def elementwise(name: str, d: torch.Tensor, c: float = 0.0, delta: float = 1.0) -> torch.Tensor:
    """Each loss's definition on the difference d (float64)."""
    if name == "mse":
        return d**2
    if name == "l1":
        return d.abs()
    if name == "huber":
        return torch.where(d.abs() <= delta, 0.5 * d**2, delta * (d.abs() - 0.5 * delta))
    if name == "pseudo_huber":
        return 2 * c * ((d**2 + c**2).sqrt() - c)
    return 2 * ((d**2 + c**2).sqrt() - c)  # smooth_l1


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contract_per_sample_float32_finite_zero_at_target(name, dtype, sd_alphas):
    loss = sdplug.create("loss", name)
    pred, target = (x.to(dtype) for x in pair())
    out = loss.per_sample(pred, target, T, sd_alphas)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all() and (out > 0).all()
    assert torch.equal(loss.per_sample(target, target, T, sd_alphas), torch.zeros(3))


@pytest.mark.parametrize("name", ["mse", "l1", "huber"])
@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
def test_unscheduled_losses_match_their_formula(name, delta, sd_alphas):
    pred, target = pair()
    params = {"delta": delta} if name == "huber" else {}
    got = sdplug.create("loss", name, **params).per_sample(pred, target, None, sd_alphas)
    want = elementwise(name, (pred - target).double(), delta=delta).mean(dim=(1, 2, 3))
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_true_huber_is_quadratic_inside_delta_and_linear_beyond(sd_alphas):
    loss = sdplug.create("loss", "huber", delta=1.0)
    d = torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1)
    got = loss.per_sample(d, torch.zeros_like(d), None, sd_alphas)
    assert got.tolist() == pytest.approx([0.125, 0.5, 2.5])


@pytest.mark.parametrize("name", SCHEDULED)
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("c,scale", [(0.1, 1.0), (0.5, 2.0)])
def test_scheduled_losses_use_each_samples_own_threshold(name, schedule, c, scale, sd_alphas):
    pred, target = pair()
    loss = sdplug.create("loss", name, c=c, schedule=schedule, scale=scale)
    got = loss.per_sample(pred, target, T, sd_alphas).double()
    d = (pred - target).double()
    for i, t in enumerate(T.tolist()):
        c_t = kohya_threshold(t, c, schedule, scale, sd_alphas)
        want = elementwise(name, d[i], c=c_t).mean()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5), (schedule, t)
        alone = loss.per_sample(pred[i : i + 1], target[i : i + 1], T[i : i + 1], sd_alphas)
        assert alone.item() == pytest.approx(got[i].item(), rel=1e-6)  # same as a batch of one
    if schedule != "constant":  # a batch-wide threshold (kohya v0.8.7's one timestep) would differ
        one_t = loss.per_sample(pred, target, torch.full((3,), 250), sd_alphas)
        assert not torch.allclose(one_t, got.float())


def test_threshold_schedules_at_their_ends(sd_alphas, zero_terminal_alphas):
    t = torch.tensor([0, 1000 // 2, 999])
    exp = huber_threshold(0.1, "exponential", 2.0, t, sd_alphas, 3)
    assert exp.tolist() == pytest.approx([2.0, 2.0 * 0.1**0.5, 2.0 * 0.1 ** (999 / 1000)], rel=1e-5)
    snr_c = huber_threshold(0.1, "snr", 1.0, t, sd_alphas, 3)
    assert 0.9 < snr_c[0].item() <= 1.0 and snr_c[2].item() == pytest.approx(0.1, abs=0.01)
    assert (snr_c.diff() < 0).all()  # falls from ~1 (clean) to ~c (noisy)
    terminal = huber_threshold(0.1, "snr", 1.0, torch.tensor([999]), zero_terminal_alphas, 1)
    assert terminal.item() == pytest.approx(0.1, rel=1e-6)  # a_T = 0: exactly c, finite
    assert huber_threshold(0.3, "constant", 0.5, None, sd_alphas, 4).tolist() == pytest.approx([0.15] * 4)


def test_pseudo_huber_is_smooth_l1_times_c_and_tends_to_mse_and_l1(sd_alphas):
    pred, target = pair()
    ph = sdplug.create("loss", "pseudo_huber", c=0.3, schedule="constant").per_sample(pred, target, None, sd_alphas)
    sl = sdplug.create("loss", "smooth_l1", c=0.3, schedule="constant").per_sample(pred, target, None, sd_alphas)
    assert torch.allclose(ph, 0.3 * sl, rtol=1e-5)
    big = sdplug.create("loss", "pseudo_huber", c=100.0, schedule="constant").per_sample(pred, target, None, sd_alphas)
    mse = sdplug.create("loss", "mse").per_sample(pred, target, None, sd_alphas)
    assert torch.allclose(big, mse, rtol=1e-3)  # c >> |d|: d**2
    small = sdplug.create("loss", "smooth_l1", c=1e-3, schedule="constant").per_sample(pred, target, None, sd_alphas)
    l1 = sdplug.create("loss", "l1").per_sample(pred, target, None, sd_alphas)
    assert torch.allclose(small, 2 * l1, rtol=1e-2)  # c << |d|: 2 |d|


def test_scheduled_threshold_needs_timesteps_but_constant_does_not(sd_alphas):
    pred, target = pair()
    assert not sdplug.create("loss", "pseudo_huber", schedule="constant").needs_timesteps()
    assert sdplug.create("loss", "smooth_l1", schedule="snr").needs_timesteps()
    with pytest.raises(sdplug.SdplugError, match="needs each sample's timestep"):
        sdplug.create("loss", "pseudo_huber", schedule="snr").per_sample(pred, target, None, sd_alphas)
    with pytest.raises(sdplug.SdplugError, match="one timestep per sample"):
        sdplug.create("loss", "pseudo_huber").per_sample(pred, target, torch.tensor([1, 2]), sd_alphas)


# -- masks ---------------------------------------------------------------------------------------
def half_mask(batch=3):
    mask = torch.zeros(batch, 1, 8, 8)
    mask[..., :4] = 1.0  # left half trains
    return mask


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("options", [{}, {"unmasked_weight": 0.3}, {"normalize_by_mask_area": True}])
def test_all_ones_mask_changes_nothing(name, options, sd_alphas):
    pred, target = pair()
    loss = sdplug.create("loss", name, **options)
    plain = loss.per_sample(pred, target, T, sd_alphas)
    for mask in (torch.ones(3, 1, 8, 8), torch.ones(8, 8), torch.ones(3, 4, 8, 8, dtype=torch.bool)):
        assert torch.allclose(loss.per_sample(pred, target, T, sd_alphas, mask), plain, rtol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("w", [0.0, 0.1, 0.5])
def test_half_mask_with_unmasked_weight_and_area_normalisation(name, w, sd_alphas):
    pred, target = pair()
    full = sdplug.create("loss", name).elementwise(pred, target, T, sd_alphas).double()
    left, right = full[..., :4].sum(dim=(1, 2, 3)), full[..., 4:].sum(dim=(1, 2, 3))
    n = full[0].numel()
    plain = sdplug.create("loss", name, unmasked_weight=w).per_sample(pred, target, T, sd_alphas, half_mask())
    assert torch.allclose(plain.double(), (left + w * right) / n, rtol=1e-5)  # kohya (w = 0) / OneTrainer
    normalised = sdplug.create("loss", name, unmasked_weight=w, normalize_by_mask_area=True)
    got = normalised.per_sample(pred, target, T, sd_alphas, half_mask())
    assert torch.allclose(got.double(), (left + w * right) / (n / 2 * (1 + w)), rtol=1e-5)  # weighted mean over the mask


def test_fractional_masks_are_clamped_to_unmasked_weight_and_one(sd_alphas):
    pred, target = pair(batch=1)
    mask = torch.tensor([-1.0, 0.05, 0.5, 2.0]).repeat(16).view(1, 1, 8, 8)
    loss = sdplug.create("loss", "mse", unmasked_weight=0.1)
    weight = torch.tensor([0.1, 0.1, 0.5, 1.0]).repeat(16).view(1, 1, 8, 8)
    expected = ((pred - target) ** 2 * weight).mean()
    assert loss.per_sample(pred, target, None, sd_alphas, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_an_empty_mask_gives_zero_not_nan(sd_alphas):
    pred, target = pair()
    mask = half_mask()
    mask[1] = 0.0
    got = sdplug.create("loss", "l1", normalize_by_mask_area=True).per_sample(pred, target, None, sd_alphas, mask)
    assert torch.isfinite(got).all() and got[1].item() == 0.0 and got[0].item() > 0


def test_a_mask_that_does_not_broadcast_is_a_clear_error(sd_alphas):
    pred, target = pair()
    with pytest.raises(sdplug.SdplugError, match=r"mask has shape \(3, 1, 4, 4\).*broadcast"):
        sdplug.create("loss", "mse").per_sample(pred, target, None, sd_alphas, torch.ones(3, 1, 4, 4))
    with pytest.raises(sdplug.SdplugError, match="broadcast"):  # would grow the loss, not weight it
        sdplug.create("loss", "mse").per_sample(pred, target, None, sd_alphas, torch.ones(2, 3, 4, 8, 8))


def test_resize_mask_averages_pixel_areas():
    mask = torch.zeros(2, 64, 64)
    mask[:, :, :32] = 1.0
    small = resize_mask(mask, torch.zeros(2, 4, 8, 8))
    assert small.shape == (2, 1, 8, 8)
    assert torch.equal(small[..., :4], torch.ones(2, 1, 8, 4)) and torch.equal(small[..., 4:], torch.zeros(2, 1, 8, 4))
    assert resize_mask(torch.full((1, 1, 16, 16), 0.25), torch.zeros(1, 4, 2, 2)).unique().tolist() == [0.25]


# -- presets and the plan ------------------------------------------------------------------------
def plan_for(data, prediction_type="epsilon", alphas=None):
    return parse_preset(data, path="loss.toml").build(
        alphas_cumprod=scaled_linear_alphas_cumprod() if alphas is None else alphas, prediction_type=prediction_type
    )


def test_plan_loss_is_loss_type_then_mask_then_weighting():
    data = {
        "loss": {"type": "pseudo_huber", "c": 0.2, "schedule": "snr", "unmasked_weight": 0.1},
        "loss_weighting": {"type": "min_snr"},
    }
    plan = plan_for(data, "v_prediction")
    pred, target = pair()
    mask = half_mask()
    per_sample = plan.loss_type.per_sample(pred, target, T, plan.alphas_cumprod, mask)
    weights = plan.loss_weighting.weights(T, plan.alphas_cumprod, "v_prediction")
    assert torch.allclose(plan.loss(pred, target, T, mask=mask), per_sample * weights)
    assert torch.allclose(plan.unweighted_loss(pred, target, mask, timesteps=T), per_sample)
    with pytest.raises(sdplug.SdplugError, match="pass timesteps="):
        plan.unweighted_loss(pred, target)


def test_plan_defaults_to_mse_and_needs_no_timesteps_for_it():
    plan = plan_for({})
    pred, target = pair()
    assert type(plan.loss_type).__name__ == "MSELoss"
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(plan.unweighted_loss(pred, target), mse)
    assert torch.allclose(plan.loss(pred, target, T, mask=half_mask()), ((pred - target) ** 2 * half_mask()).mean(dim=(1, 2, 3)))


def test_plan_thresholds_on_a_zero_terminal_schedule_are_finite():
    plan = plan_for({"loss": {"type": "smooth_l1"}}, alphas=rescale_zero_terminal_snr(scaled_linear_alphas_cumprod()))
    pred, target = pair()
    assert torch.isfinite(plan.loss(pred, target, torch.tensor([0, 500, 999]))).all()


@pytest.mark.parametrize("name", LOSSES)
def test_masked_scheduled_loss_never_syncs(name):
    plan = plan_for({"loss": {"type": name, "normalize_by_mask_area": True}, "loss_weighting": {"type": "min_snr"}})
    pred, target = pair()
    with syncs_raise_inside(plan):
        plan.loss(pred, target, T, mask=half_mask()).mean()


def test_loss_section_round_trips_through_toml():
    preset = parse_preset({"loss": {"type": "smooth_l1", "c": 0.25, "schedule": "exponential"}}, path="a.toml")
    assert preset.loss.type == "smooth_l1" and preset.loss.params == {"c": 0.25, "schedule": "exponential"}
    text = preset.to_toml()
    assert '[loss]\ntype = "smooth_l1"' in text and "unmasked_weight = 0.0" in text and "scale = 1.0" in text
    from sdplug.preset.files import tomllib

    again = parse_preset(tomllib.loads(text), path="b.toml")
    assert again.loss.create() == preset.loss.create()


@pytest.mark.parametrize(
    "table,key,words",
    [
        ({"type": "pseudo_huber", "c": 0.0}, "loss.c", ["0.0 is not allowed", "> 0.0"]),
        ({"type": "smooth_l1", "schedule": "linear"}, "loss.schedule", ["'linear'", "'constant', 'exponential', 'snr'"]),
        ({"type": "pseudo_huber", "scale": -1.0}, "loss.scale", ["-1.0"]),
        ({"type": "huber", "delta": 0}, "loss.delta", ["> 0.0"]),
        ({"type": "mse", "unmasked_weight": 1.5}, "loss.unmasked_weight", ["1.5", ">= 0.0 and <= 1.0"]),
        ({"type": "l1", "normalize_by_mask_area": "yes"}, "loss.normalize_by_mask_area", ["true or false"]),
        ({"type": "mse", "huber_c": 0.1}, "loss.huber_c", ["unknown key 'huber_c'"]),
        ({"type": "huber", "c": 0.1}, "loss.c", ["unknown key 'c'", "delta"]),
        ({"type": "l2"}, "loss.type", ["not a loss strategy", "mse"]),
    ],
)
def test_bad_loss_tables_name_the_key(table, key, words):
    with pytest.raises(sdplug.PresetError) as info:
        parse_preset({"loss": table}, path="bad.toml")
    assert info.value.key == key and info.value.path == "bad.toml"
    for word in words:
        assert word in str(info.value)


def test_loss_family_is_listed():
    assert set(LOSSES) >= {"mse", "l1", "huber", "pseudo_huber", "smooth_l1"}
    assert "loss" in sdplug.FAMILIES
