"""Optimizers: built for real (bitsandbytes steps on CPU here), state bytes, loud missing deps."""

import pytest
import torch

import sdplug
from sdplug.errors import MissingDependencyError
from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod
from sdplug.strategies.optimizer import state_bytes


def train_a_few_steps(optimizer_name, **params):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    optimizer = sdplug.create("optimizer", optimizer_name, **params).build(model.parameters())
    x = torch.randn(64, 128)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    n_params = sum(p.numel() for p in model.parameters())
    return optimizer, losses, n_params


@pytest.mark.parametrize("name", sdplug.available("optimizer"))
def test_every_optimizer_builds_and_reduces_the_loss(name):
    params = {"lr": 1e-3} if name != "lion8bit" else {"lr": 3e-4}
    optimizer, losses, _ = train_a_few_steps(name, **params)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert losses[-1] < losses[0]


def test_8bit_adamw_state_is_about_a_quarter_of_adamw():
    adamw, _, n = train_a_few_steps("adamw")
    adamw8, _, _ = train_a_few_steps("adamw8bit")
    full, quantised = state_bytes(adamw) / n, state_bytes(adamw8) / n
    assert full == pytest.approx(8.0, abs=0.1)
    assert 1.9 < quantised < 2.3  # 2 bytes of moments + block-wise scales (and small tensors kept in fp32)
    assert type(adamw8).__module__.startswith("bitsandbytes")


def test_lion8bit_keeps_one_moment():
    lion, _, n = train_a_few_steps("lion8bit")
    assert 0.9 < state_bytes(lion) / n < 1.3


def test_missing_bitsandbytes_is_a_clear_error_with_the_install_command(monkeypatch):
    monkeypatch.setattr("sdplug.optional.is_available", lambda package: package != "bitsandbytes")
    strategy = sdplug.create("optimizer", "adamw8bit")  # choosing it does not import anything
    with pytest.raises(MissingDependencyError, match=r'pip install "sdplug\[bnb\]"'):
        strategy.check_available()
    with pytest.raises(MissingDependencyError, match="bitsandbytes"):
        strategy.build([torch.nn.Parameter(torch.zeros(2))])


def preset_with_optimizer(**table):
    return parse_preset({"optimizer": table}, path="test.toml")


def test_plan_refuses_a_missing_optimizer_without_fallback(monkeypatch):
    monkeypatch.setattr("sdplug.optional.is_available", lambda package: package != "bitsandbytes")
    preset = preset_with_optimizer(type="adamw8bit", lr=1e-4)
    with pytest.raises(MissingDependencyError):
        bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")


def test_plan_uses_the_named_fallback_loudly(monkeypatch):
    monkeypatch.setattr("sdplug.optional.is_available", lambda package: package != "bitsandbytes")
    preset = preset_with_optimizer(type="adamw8bit", lr=2e-4, fallback="adamw")
    with pytest.warns(UserWarning, match="fallback 'adamw'"):
        plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    optimizer = plan.optimizer([torch.nn.Parameter(torch.zeros(3))])
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 2e-4
    assert plan.optimizer_choice.fell_back


def test_fallback_must_accept_the_same_parameters():
    with pytest.raises(sdplug.PresetError) as info:
        preset_with_optimizer(type="adamw8bit", lr=1e-4, betas=[0.9, 0.99], fallback="adafactor")
    assert info.value.key == "optimizer.fallback.betas"


@pytest.fixture
def bitsandbytes_that_cannot_step(monkeypatch):
    """bitsandbytes 0.43 on a CPU: it imports, builds the optimizer, then fails inside step()."""
    import bitsandbytes

    def step(self, closure=None):
        raise AssertionError("Torch not compiled with CUDA enabled")

    for name in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit"):
        monkeypatch.setattr(getattr(bitsandbytes.optim, name), "step", step)


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "lion8bit"])
def test_8bit_availability_is_a_real_step(bitsandbytes_that_cannot_step, name):
    import importlib.metadata

    with pytest.raises(MissingDependencyError) as caught:
        sdplug.create("optimizer", name).check_available()
    message = str(caught.value)
    assert f"bitsandbytes {importlib.metadata.version('bitsandbytes')}" in message
    assert "Torch not compiled with CUDA enabled" in message and "0.50.2" in message


def test_an_8bit_optimizer_that_cannot_step_fails_the_plan_or_takes_the_named_fallback(bitsandbytes_that_cannot_step):
    preset = {"optimizer": {"type": "adamw8bit"}}
    with pytest.raises(MissingDependencyError, match=r"^p\.toml: optimizer\.type: optimizer AdamW8bit cannot step on cpu"):
        bind(parse_preset(preset, path="p.toml"), alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    preset["optimizer"]["fallback"] = "adamw"
    with pytest.warns(UserWarning, match="fallback 'adamw'"):
        plan = bind(parse_preset(preset, path="p.toml"), alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    assert plan.optimizer_choice.fell_back


def test_8bit_availability_passes_where_bitsandbytes_steps():
    sdplug.create("optimizer", "adamw8bit").check_available()  # 0.50.2 steps on this CPU
