"""The numerical strategies against their own formulas and the rules they state: adaptive
optimizers' lr with a host's groups, the SNR floor, heavy-tail timesteps, debiased weighting at
t = 0, EMA with a schedule-free optimizer, Perlin octaves, the audit's configured dropout rate,
its console table, and CAME's state per parameter."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

import sdplug
from sdplug.errors import PresetError
from sdplug.plan import Plan
from sdplug.preset import parse_preset
from sdplug.schedule import rescale_zero_terminal_snr, scaled_linear_alphas_cumprod
from sdplug.strategies import registry

ADAPTIVE = {"prodigy": "prodigyopt", "dadapt_adam": "dadaptation"}


def plan_of(table: dict, prediction_type: str = "epsilon", alphas: torch.Tensor | None = None) -> Plan:
    preset = parse_preset(table, path="fix.toml")
    return preset.build(
        alphas_cumprod=scaled_linear_alphas_cumprod() if alphas is None else alphas, prediction_type=prediction_type
    )


def groups(lrs: list[float]) -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.full((8,), float(i + 1)))], "lr": lr} for i, lr in enumerate(lrs)]


# -- 1. optimizers that estimate their own step size -------------------------------------------
@pytest.mark.parametrize("name", list(ADAPTIVE))
@pytest.mark.parametrize("host_lrs", [[1e-4, 1e-4, 0.0], [1e-4, 5e-5, 0.0]])
@pytest.mark.parametrize("host_lr", [1e-4, None])
def test_an_adaptive_optimizer_without_a_preset_lr_gives_every_trained_group_its_multiplier(name, host_lrs, host_lr):
    """kohya's train_network passes groups at --unet_lr / --text_encoder_lr (EveryDream2 its
    optimizer.json's): with Prodigy's default multiplier 1.0 they would run ~10,000x too small."""
    pytest.importorskip(ADAPTIVE[name])
    optimizer = plan_of({"optimizer": {"type": name}}).optimizer(groups(host_lrs), host_lr=host_lr)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0, 0.0]  # the frozen group stays frozen


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_an_adaptive_optimizers_preset_lr_is_every_trained_groups_lr(name):
    pytest.importorskip(ADAPTIVE[name])
    optimizer = plan_of({"optimizer": {"type": name, "lr": 0.5}}).optimizer(groups([1e-4, 0.0]), host_lr=1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.0]


def test_an_ordinary_optimizer_keeps_the_hosts_lr_when_the_preset_names_none():
    optimizer = plan_of({"optimizer": {"type": "adamw"}}).optimizer([torch.nn.Parameter(torch.ones(2))], host_lr=3e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-4]


def test_whether_an_optimizer_adapts_its_step_size_is_one_declared_attribute():
    from sdplug.strategies import optimizer_adapts_step_size
    from sdplug.strategies.base import OptimizerStrategy

    names = registry("optimizer").names()
    adapting = {n for n in names if registry("optimizer").get(n).cls.adapts_step_size}
    assert adapting == set(ADAPTIVE)
    assert all(optimizer_adapts_step_size(n) == (n in adapting) for n in names)
    assert OptimizerStrategy.adapts_step_size is False


def test_plan_optimizer_reads_the_attribute_not_the_class_it_comes_from():
    """Any strategy that declares it adapts its step size gets its lr on every trained group."""
    from sdplug.strategies.base import OptimizerStrategy

    built: list = []

    class SelfTuning(OptimizerStrategy):
        adapts_step_size = True
        lr = 1.0

        def build(self, params):
            built.append(params)
            return torch.optim.SGD(params, lr=self.lr)

    plan = plan_of({"optimizer": {"type": "adamw"}})
    plan.optimizer_choice.strategy = SelfTuning()
    optimizer = plan.optimizer(groups([1e-4, 0.0]), host_lr=1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.0]


# -- 2. snr_floor where the weight needs no floor ---------------------------------------------
FLOORED = ["max_snr", "debiased", "v_pred_like_loss"]


@pytest.mark.parametrize("weighting", FLOORED)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_an_snr_floor_that_would_change_nothing_is_refused_naming_file_and_key(weighting, prediction_type):
    with pytest.raises(PresetError) as caught:
        plan_of({"loss_weighting": {"type": weighting, "snr_floor": 0.01}}, prediction_type)
    assert caught.value.path == "fix.toml" and caught.value.key == "loss_weighting.snr_floor"
    assert prediction_type in str(caught.value) and "epsilon" in str(caught.value)
    plan_of({"loss_weighting": {"type": weighting}}, prediction_type)  # the default is no request: builds


@pytest.mark.parametrize("weighting", FLOORED)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_weights_without_a_floor_are_finite_at_snr_zero(weighting, prediction_type, zero_terminal_alphas):
    """Why the floor is refused there: the v and x0 weights are finite at SNR 0 by their formula."""
    t = torch.arange(len(zero_terminal_alphas))
    weights = sdplug.create("loss_weighting", weighting).weights(t, zero_terminal_alphas, prediction_type)
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("weighting", FLOORED)
def test_the_snr_floor_bounds_the_epsilon_weight_at_a_zero_terminal_step(weighting):
    alphas = rescale_zero_terminal_snr(scaled_linear_alphas_cumprod())
    last = torch.tensor([len(alphas) - 1])
    low, high = (
        plan_of(
            {
                "loss_weighting": {"type": weighting, "snr_floor": floor},
                "schedule": {"zero_terminal_snr": True, "epsilon_ok": True},
            },
            "epsilon",
        ).loss_weighting.weights(last, alphas, "epsilon")
        for floor in (1e-3, 1e-1)
    )
    assert torch.isfinite(low) and torch.isfinite(high) and float(low) > float(high)  # a larger floor, a smaller weight


# -- 3. heavy_tail is OneTrainer's HEAVY_TAIL ---------------------------------------------------
def test_heavy_tail_defaults_to_onetrainers_noising_weight_zero_which_is_uniform():
    strategy = sdplug.create("timesteps", "heavy_tail")
    assert strategy.scale == 0.0
    t = strategy(200_000, 1000, generator=torch.Generator().manual_seed(0)).double()
    share = torch.histc(t, bins=10, min=0, max=1000) / len(t)
    assert torch.allclose(share, torch.full_like(share, 0.1), atol=0.005)  # uniform, not the middle-heavy 1.29
    assert sdplug.create("timesteps", "mode").scale == 1.29  # diffusers' mode_scale default stays with "mode"


# -- 4. debiased at t = 0 ---------------------------------------------------------------------
def test_debiased_epsilon_weight_at_t0_is_its_formula_without_kohyas_cap(sd_alphas):
    weight = sdplug.create("loss_weighting", "debiased").weights(torch.tensor([0]), sd_alphas, "epsilon")
    a0 = float(sd_alphas[0])
    formula = 1.0 / math.sqrt(a0 / (1.0 - a0))  # 1 / sqrt(SNR(0)), SNR(0) about 1175 on SD's schedule
    assert float(weight) == pytest.approx(formula, rel=1e-5)
    kohya = 1.0 / math.sqrt(1000.0)  # sd-scripts' apply_debiased_estimation caps SNR at 1000
    assert abs(float(weight) - kohya) / kohya > 0.05
    doc = type(sdplug.create("loss_weighting", "debiased")).__doc__
    assert "1000" in doc and "t = 0" in doc


# -- 5. [ema] with a schedule-free optimizer ----------------------------------------------------
def schedule_free_run(ema: dict | None, steps: int = 12, width: int = 6):
    pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    x, y = torch.randn(64, width), torch.randn(64, width)
    table: dict = {"optimizer": {"type": "adamw_schedulefree", "lr": 5e-2}}
    if ema:
        table["ema"] = ema
    plan = plan_of(table)
    optimizer = plan.optimizer(model.parameters())
    tracker = plan.ema(list(model.parameters())) if ema else None
    evaluated = []
    for _ in range(steps):
        optimizer.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
        plan.step()
        optimizer.eval()  # schedule-free's evaluation weights x, the ones sampled and saved
        evaluated.append([p.detach().clone() for p in model.parameters()])
        optimizer.train()
    return model, tracker, evaluated


def test_ema_of_a_schedule_free_optimizer_averages_its_evaluation_weights():
    decay = 0.5
    model, tracker, evaluated = schedule_free_run({"decay": decay})
    expected = [p.detach().clone() for p in schedule_free_run(None, steps=0)[0].parameters()]  # the initial weights
    for x in evaluated:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, x, strict=True)]
    for shadow, want, y in zip(tracker.shadows, expected, model.parameters(), strict=True):
        assert torch.allclose(shadow, want, atol=1e-5)
        assert not torch.allclose(shadow, y.detach(), atol=1e-3)  # not the training weights y
    assert tracker.record()["averages"] == "evaluation weights (schedule-free x)"


def test_ema_never_changes_what_a_schedule_free_optimizer_trains():
    """Switching to eval mode and back returns the training point only up to rounding, which
    training then amplifies: the average must restore it exactly."""
    with_ema = schedule_free_run({"decay": 0.9}, steps=60, width=32)[0]
    without = schedule_free_run(None, steps=60, width=32)[0]
    for a, b in zip(with_ema.parameters(), without.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_ema_of_an_optimizer_without_modes_averages_its_weights():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    plan = plan_of({"optimizer": {"type": "adamw", "lr": 0.1}, "ema": {"decay": 0.5}})
    optimizer = plan.optimizer([weight])
    tracker = plan.ema([weight])
    expected = weight.detach().clone()
    for _ in range(3):
        (weight**2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        expected = 0.5 * expected + 0.5 * weight.detach()
    assert torch.allclose(tracker.shadows[0], expected)
    assert tracker.record()["averages"] == "the trained weights"


# -- 6. Perlin octaves that land on the lattice -------------------------------------------------
def test_a_lattice_as_fine_as_the_latent_gives_a_zero_field():
    """Why such an octave is left out: every pixel on a lattice point, where gradient noise is 0."""
    from sdplug.strategies.fields import perlin_field

    assert float(perlin_field(64, 16, 16, 16, torch.Generator().manual_seed(0), "cpu", torch.float32).std()) == 0.0
    assert float(perlin_field(64, 16, 16, 8, torch.Generator().manual_seed(0), "cpu", torch.float32).std()) > 0.1


@pytest.mark.parametrize(
    "size,cells,octaves,expected", [(16, 4, 3, [4, 8]), (64, 4, 3, [4, 8, 16]), (16, 1, 8, [1, 2, 4, 8]), (12, 4, 3, [4, 8])]
)
def test_perlin_uses_only_octaves_finer_than_none_of_the_latent(size, cells, octaves, expected):
    from sdplug.strategies.fields import perlin_field

    strategy = sdplug.create("noise", "perlin", cells=cells, octaves=octaves)
    used = strategy.octave_cells(size, size)
    assert used == expected
    for n in used:  # each octave used adds something
        assert float(perlin_field(8, size, size, n, torch.Generator().manual_seed(1), "cpu", torch.float32).std()) > 0.01


def test_perlin_refuses_a_first_octave_as_fine_as_the_latent():
    strategy = sdplug.create("noise", "perlin", cells=16)
    with pytest.raises(PresetError, match=r"16x16.*Allowed for this latent: cells below 16") as caught:
        strategy(torch.zeros(1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    assert caught.value.key == "cells"


def test_perlin_refused_in_a_plan_names_the_preset_file_and_its_table(tmp_path):
    from sdplug.preset import load_preset
    from sdplug.schedule import scaled_linear_alphas_cumprod

    (tmp_path / "p.toml").write_text('[[noise]]\ntype = "offset"\n[[noise]]\ntype = "perlin"\ncells = 16\n')
    plan = load_preset(tmp_path / "p.toml").build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    with pytest.raises(PresetError) as caught:
        plan.noise(torch.zeros(1, 4, 16, 16))
    assert caught.value.path == str(tmp_path / "p.toml") and caught.value.key == "noise[1].cells"
    assert str(caught.value).startswith(f"{tmp_path / 'p.toml'}: noise[1].cells: perlin noise: 16 reaches")


def test_the_audit_reports_the_perlin_octaves_really_used():
    plan = plan_of({"noise": [{"type": "perlin", "octaves": 3}]})
    plan.noise(torch.zeros(2, 4, 16, 16))
    plan.noise(torch.zeros(2, 4, 64, 64))
    plan.step()
    (entry,) = plan.audit.records()["noise"]["applied"]
    assert entry["type"] == "perlin" and entry["calls"] == 2
    assert entry["per_latent_size"] == {
        "16x16": {"octaves_used": 2, "octave_cells": [4, 8]},
        "64x64": {"octaves_used": 3, "octave_cells": [4, 8, 16]},
    }
    restored = plan_of({"noise": [{"type": "perlin", "octaves": 3}]})
    restored.audit.load_state_dict(plan.audit.state_dict())  # a resumed run keeps the record
    assert restored.audit.records()["noise"]["applied"][0]["per_latent_size"] == entry["per_latent_size"]


# -- 7. the configured caption-dropout rate ------------------------------------------------------
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7])
def test_the_configured_dropout_rate_is_reported_as_configured(rate):
    plan = plan_of({"caption": [{"type": "dropout", "rate": rate}]})
    rng = random.Random(0)
    for _ in range(3000):
        plan.caption("a photo", rng=rng)
    assert plan.audit.records()["caption"]["dropout_rate_configured"] == rate


def test_dropout_every_n_epochs_reports_the_expected_rate_of_the_epochs_drawn():
    plan = plan_of({"caption": [{"type": "dropout", "rate": 0.1, "every_n_epochs": 2}]})
    rng = random.Random(0)
    for epoch in range(4):  # epochs 1 and 3 drop every caption
        for _ in range(100):
            plan.caption("a photo", epoch=epoch, rng=rng)
    assert plan.audit.records()["caption"]["dropout_rate_configured"] == pytest.approx(0.55, abs=1e-12)


def test_an_older_checkpoint_without_the_configured_counts_still_reports_a_rate():
    plan = plan_of({"caption": [{"type": "dropout", "rate": 0.2}]})
    state = plan.audit.state_dict()
    state["caption"].pop("drop_probabilities")
    state["caption"].update(samples=10, dropped=2, expected_drops=2.0)
    plan.audit.load_state_dict(state)
    assert plan.audit.records()["caption"]["dropout_rate_configured"] == pytest.approx(0.2)


# -- 8. the console audit table -------------------------------------------------------------------
def test_the_audit_table_shows_the_optimizer_timesteps_and_weights_labelled():
    from sdplug.plan.audit_table import summary_table

    plan = plan_of(
        {
            "noise": [{"type": "pyramid", "discount": 0.8}],
            "loss_weighting": {"type": "min_snr", "gamma": 5.0},
            "caption": [{"type": "dropout", "rate": 0.1}],
            "optimizer": {"type": "adamw", "lr": 1e-3},
        }
    )
    model = torch.nn.Linear(4, 4)
    optimizer = plan.optimizer(model.parameters())
    rng = random.Random(0)
    for _ in range(3):
        [plan.caption("a photo", rng=rng) for _ in range(4)]
        latents = torch.randn(4, 4, 8, 8)
        t = plan.timesteps(4)
        noise = plan.noise(latents)
        loss = plan.loss(
            model(plan.noisy_input(latents, noise, t).transpose(1, 3)).transpose(1, 3), plan.target(latents, noise, t), t
        ).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        plan.step()
    table = summary_table(plan.report())
    rows = {line.split("  ", 2)[1].strip(): line.split("  ", 2)[2].strip() for line in table.splitlines()}
    assert rows["optimizer"].startswith("AdamW (adamw), lr 0.001; 8.")  # AdamW: two fp32 moments, plus its step count
    assert "bytes of state per trained parameter, 20 trained parameters" in rows["optimizer"]
    assert rows["timesteps"].startswith("uniform (host default), 12 draws; % in each tenth of t, low to high: ")
    assert len(rows["timesteps"].split(": ")[1].split()) == 10
    assert rows["loss weighting"].startswith("min_snr, 3 calls; mean weight in each tenth of t: ")
    assert "over t bins" not in table
    assert rows["caption dropout"].endswith("vs 10% configured (ok)")
    assert rows["problems"] == "none" and rows["steps"] == "3 optimizer steps"
    assert len(table.splitlines()) <= 14  # short: read at a glance


# -- 10. CAME's state per parameter ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(320, 320), (4, 320), (320, 4), (320,), (4, 320, 1, 1), (4, 32, 3, 3)])
def test_came_keeps_the_state_per_parameter_its_documentation_states(shape):
    """About 4 bytes only for large matrices: small LoRA matrices and 1-D tensors keep more."""
    pytest.importorskip("came_pytorch")
    from sdplug.strategies.optimizer import state_bytes
    from sdplug.strategies.optimizers_extra import CAME

    parameter = torch.nn.Parameter(torch.randn(shape))
    parameter.grad = torch.randn(shape)
    optimizer = sdplug.create("optimizer", "came").build([parameter])
    optimizer.step()
    assert state_bytes(optimizer) / parameter.numel() == pytest.approx(CAME.state_bytes_per_parameter(shape))


def test_came_is_documented_with_the_state_it_keeps_for_a_lora():
    from sdplug.strategies.optimizers_extra import CAME

    rank4 = CAME.state_bytes_per_parameter((4, 320))
    assert 6.0 < rank4 < 6.1 and CAME.state_bytes_per_parameter((320, 320)) == pytest.approx(4.05, abs=1e-3)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    entry = readme[readme.index("`came` (") :].split("`ademamix8bit`", 1)[0]  # the optimizer table's CAME entry
    assert "about 4 only when both sides are large" in entry  # the 4-byte figure with when it holds
    assert "rank-4 LoRAs measured 6.1 to 7.2" in entry and "1-D tensors keep 8" in entry
