"""Loss weightings against their formulas for epsilon, v and x0 models, and finiteness."""

import math

import pytest
import torch

import sdplug
from sdplug.schedule import DDPM_PREDICTION_TYPES, snr

# the weightings of DDPM models (sigma_sqrt and cosmap are rectified flow's: test_flow_process.py)
FIXED = [
    name
    for name in sdplug.available("loss_weighting")
    if name != "learned" and "ddpm" in sdplug.strategies.registry("loss_weighting").get(name).cls.processes
]


def x0_weight(name: str, s: float, **p) -> float:
    """Each weighting's definition in x0 space (docs/techniques.md section 2 and the cited papers)."""
    gamma = p.get("gamma")
    return {
        "constant": None,
        "snr": s,
        "min_snr": min(s, gamma or 5.0),
        "max_snr": max(s, gamma or 1.0),
        "soft_min_snr": s * (gamma or 5.0) / (s + (gamma or 5.0)),
        "debiased": math.sqrt(s),
        "p2": s / (p.get("k", 1.0) + s) ** p.get("gamma", 1.0),
        # kohya's two, with S = min(SNR, 1000) as sd-scripts caps it
        "scale_v_pred_loss_like_noise_pred": (s + 1) * min(s, 1000.0) / (min(s, 1000.0) + 1),
        "v_pred_like_loss": s + p.get("strength", 0.1) * (min(s, 1000.0) + 1) * s / min(s, 1000.0),
    }[name]


def expected(name: str, s: float, prediction_type: str, **p) -> float:
    """The weight of the model's own loss: x0 weight / SNR (eps), / (SNR + 1) (v), as is (x0)."""
    if name == "constant":
        return 1.0
    w = x0_weight(name, s, **p)
    return {"sample": w, "v_prediction": w / (s + 1), "epsilon": w / s}[prediction_type]


def test_min_snr_matches_the_paper_table():
    """Hang et al. 2023, table: x0 min(SNR, g); eps min(SNR, g)/SNR; v min(SNR, g)/(SNR+1)."""
    strategy = sdplug.create("loss_weighting", "min_snr", gamma=5.0)
    s = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(strategy.weight_for(s, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    assert torch.allclose(strategy.weight_for(s, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(strategy.weight_for(s, "v_prediction"), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))


WITH_PARAMS = (
    [(name, {}) for name in FIXED]
    + [(name, {"gamma": 2.0}) for name in ("min_snr", "max_snr", "soft_min_snr", "p2")]
    + [("p2", {"k": 0.5, "gamma": 0.5})]
    + [("v_pred_like_loss", {"strength": 0.5})]
)


@pytest.mark.parametrize("name,params", WITH_PARAMS)
@pytest.mark.parametrize("prediction_type", DDPM_PREDICTION_TYPES)
def test_fixed_weightings_match_their_formula(name, prediction_type, params, sd_alphas):
    strategy = sdplug.create("loss_weighting", name, **params)
    timesteps = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    got = strategy.weights(timesteps, sd_alphas, prediction_type)
    for t, w in zip(timesteps.tolist(), got.tolist(), strict=True):
        a = sd_alphas[t].double().item()
        s = a / (1 - a)
        assert w == pytest.approx(expected(name, s, prediction_type, **params), rel=1e-4), (t, s)


@pytest.mark.parametrize("name", [n for n in FIXED if n != "constant"])  # constant keeps each native loss
def test_same_x0_space_weight_whatever_the_prediction_type(name, sd_alphas):
    """Weighting the eps loss by w/SNR, v loss by w/(SNR+1) and x0 loss by w is ONE weighting."""
    strategy = sdplug.create("loss_weighting", name)
    t = torch.arange(0, 1000, 37)
    s = snr(t, sd_alphas).double()
    as_x0 = strategy.weights(t, sd_alphas, "sample").double()
    assert torch.allclose(strategy.weights(t, sd_alphas, "epsilon").double() * s, as_x0, rtol=1e-4)
    assert torch.allclose(strategy.weights(t, sd_alphas, "v_prediction").double() * (s + 1), as_x0, rtol=1e-4)


@pytest.mark.parametrize("name", sdplug.available("loss_weighting"))
@pytest.mark.parametrize("prediction_type", DDPM_PREDICTION_TYPES)
def test_finite_for_every_timestep_including_zero_terminal_snr(name, prediction_type, zero_terminal_alphas):
    assert zero_terminal_alphas[-1].item() == 0.0  # SNR(T) = 0
    strategy = sdplug.create("loss_weighting", name)
    t = torch.arange(1000)
    loss = torch.rand(1000) + 0.1
    weights = strategy.weights(t, zero_terminal_alphas, prediction_type)
    weighted = strategy.apply(loss, t, zero_terminal_alphas, prediction_type)
    assert torch.isfinite(weights).all() and torch.isfinite(weighted).all()
    assert weighted.shape == loss.shape


def test_min_snr_epsilon_at_zero_snr_is_the_limit_one(zero_terminal_alphas):
    strategy = sdplug.create("loss_weighting", "min_snr")
    assert strategy.weights(torch.tensor([999]), zero_terminal_alphas, "epsilon").item() == 1.0
    assert strategy.weights(torch.tensor([999]), zero_terminal_alphas, "v_prediction").item() == 0.0


@pytest.mark.parametrize("name", FIXED)
def test_apply_is_loss_times_weights(name, sd_alphas, generator):
    strategy = sdplug.create("loss_weighting", name)
    t = torch.randint(0, 1000, (16,), generator=generator)
    loss = torch.rand(16, generator=generator)
    expected_loss = loss * strategy.weights(t, sd_alphas, "v_prediction")
    assert torch.allclose(strategy.apply(loss, t, sd_alphas, "v_prediction"), expected_loss)


def test_unknown_prediction_type_is_a_clear_error(sd_alphas):
    with pytest.raises(sdplug.PresetError, match="epsilon, v_prediction, sample"):
        sdplug.create("loss_weighting", "min_snr").weights(torch.tensor([1]), sd_alphas, "flow")


def test_learned_weighting_starts_neutral_and_learns_the_loss_scale(sd_alphas):
    """EDM2: minimising L/exp(u) + u over u gives u = log L per noise level."""
    torch.manual_seed(0)
    strategy = sdplug.create("loss_weighting", "learned", num_features=32)
    t = torch.arange(0, 1000, 10)
    level_loss = 0.05 + torch.linspace(0, 1, len(t)) ** 2 * 2  # losses of very different scale by t
    assert torch.allclose(strategy.apply(level_loss, t, sd_alphas, "epsilon"), level_loss)  # u = 0 at start
    params = strategy.parameters()
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        strategy.apply(level_loss, t, sd_alphas, "epsilon").mean().backward()
        optimizer.step()
    learned_scale = 1 / strategy.weights(t, sd_alphas, "epsilon")
    correlation = torch.corrcoef(torch.stack([learned_scale.log(), level_loss.log()]))[0, 1]
    assert correlation > 0.95


def kohya_snr_scale(s: float) -> float:
    """sd-scripts custom_train_functions.get_snr_scale: SNR capped at 1000, then SNR / (SNR + 1)."""
    s = min(s, 1000.0)
    return s / (s + 1)


@pytest.mark.parametrize("t", [0, 1, 10, 100, 500, 900, 999])
def test_scale_v_pred_like_noise_pred_is_kohyas_factor_for_v_models(t, sd_alphas):
    """kohya: loss * get_snr_scale(t), for v-prediction models (the flag's purpose)."""
    a = sd_alphas[t].double().item()
    weighting = sdplug.create("loss_weighting", "scale_v_pred_loss_like_noise_pred")
    got = weighting.weights(torch.tensor([t]), sd_alphas, "v_prediction").item()
    assert got == pytest.approx(kohya_snr_scale(a / (1 - a)), rel=1e-5)


@pytest.mark.parametrize("t", [0, 1, 10, 100, 500, 900, 999])
@pytest.mark.parametrize("strength", [0.1, 1.0])
def test_v_pred_like_loss_is_kohyas_added_term_for_epsilon_models(t, strength, sd_alphas):
    """kohya: loss + loss / get_snr_scale(t) * v_pred_like_loss, for epsilon models; and, for a v model
    with --scale_v_pred_loss_like_noise_pred too, the same below the cap (scale first, then the term)."""
    a = sd_alphas[t].double().item()
    s = a / (1 - a)
    weighting = sdplug.create("loss_weighting", "v_pred_like_loss", strength=strength)
    eps = weighting.weights(torch.tensor([t]), sd_alphas, "epsilon").item()
    assert eps == pytest.approx(1 + strength / kohya_snr_scale(s), rel=1e-5)
    if s <= 1000:
        scaled = kohya_snr_scale(s)
        v = weighting.weights(torch.tensor([t]), sd_alphas, "v_prediction").item()
        assert v == pytest.approx(scaled + scaled / scaled * strength, rel=1e-5)


def test_kohya_weightings_differ_from_snr_only_above_the_cap(sd_alphas):
    t = torch.arange(1000)
    ours = sdplug.create("loss_weighting", "scale_v_pred_loss_like_noise_pred").weights(t, sd_alphas, "v_prediction")
    plain = sdplug.create("loss_weighting", "snr").weights(t, sd_alphas, "v_prediction")
    above = snr(t, sd_alphas) > 1000
    assert above.any() and not above.all()
    assert torch.allclose(ours[~above], plain[~above], rtol=1e-6)
    assert (ours[above] < plain[above]).all()  # the cap: 1000/1001 below SNR(0)/(SNR(0) + 1)
