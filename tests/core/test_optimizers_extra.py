"""Optimizers from their own packages: they really train, keep their conventions, refuse loudly.

Prodigy and D-Adaptation: one lr for every trained group; schedule-free AdamW: train mode for
steps, eval mode around sampling and saving (sdplug.strategies.optimizer_modes); a missing package names
sdplug's extra; presets validate their parameters by key.
"""

import logging
import types

import pytest
import torch

import sdplug
from sdplug import optional
from sdplug.errors import MissingDependencyError, PresetError, SdplugError
from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod
from sdplug.strategies.optimizer import state_bytes
from sdplug.strategies.optimizer_modes import eval_mode, evaluating, has_modes, in_train_mode, train_mode

# name -> (import name, sdplug extra, an lr that fits a 50-step regression)
EXTRA = {
    "prodigy": ("prodigyopt", "prodigy", 1.0),
    "dadapt_adam": ("dadaptation", "dadapt", 1.0),
    "adamw_schedulefree": ("schedulefree", "schedulefree", 5e-2),
    "came": ("came_pytorch", "came", 1e-2),
    "ademamix8bit": ("bitsandbytes", "bnb", 1e-2),
}
NAMES = list(EXTRA)
ONE_LR = ["prodigy", "dadapt_adam"]


def needs(name):
    package = EXTRA[name][0]
    if not optional.is_available(package):
        pytest.skip(f'{package} is not installed (pip install "sdplug[{EXTRA[name][1]}]")')


def regression(in_features=16, out_features=4):
    """A noiseless linear regression: its loss can go to 0."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, in_features, generator=generator)
    y = x @ torch.randn(in_features, out_features, generator=generator)
    torch.manual_seed(0)
    return torch.nn.Linear(in_features, out_features), x, y


def train(optimizer, model, x, y, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def plan_for(table):
    return bind(
        parse_preset({"optimizer": table}, path="p.toml"),
        alphas_cumprod=scaled_linear_alphas_cumprod(),
        prediction_type="epsilon",
    )


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_steps_on_cpu_and_fits_a_regression(name):
    needs(name)
    # 64 x 128 = 8192 weights: above bitsandbytes' min_8bit_size, so AdEMAMix keeps 8-bit states
    model, x, y = regression(64, 128) if name == "ademamix8bit" else regression()
    optimizer = sdplug.create("optimizer", name, lr=EXTRA[name][2]).build(model.parameters())
    losses = train(optimizer, model, x, y, 50)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert type(optimizer).__module__.split(".")[0] == EXTRA[name][0]


def test_ademamix8bit_keeps_8bit_states_and_passes_the_real_step_check():
    needs("ademamix8bit")
    model, x, y = regression(64, 128)
    optimizer = sdplug.create("optimizer", "ademamix8bit").build(model.parameters())
    train(optimizer, model, x, y, 2)
    state = optimizer.state[model.weight]
    # two 8-bit EMAs (fast and slow) and an 8-bit second moment: 3 bytes per weight
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert state["state1"].nbytes + state["state2"].nbytes == 3 * model.weight.numel()
    n = sum(p.numel() for p in model.parameters())
    assert state_bytes(optimizer) / n < 3.6  # with block scales, maps and the fp32 bias state (AdamW: 8)
    sdplug.create("optimizer", "ademamix8bit").check_available()  # bitsandbytes 0.50.2 steps on this CPU


def test_ademamix8bit_names_the_version_it_needs(monkeypatch):
    needs("ademamix8bit")
    import bitsandbytes

    monkeypatch.delattr(bitsandbytes.optim, "AdEMAMix8bit")  # bitsandbytes 0.43: no AdEMAMix
    with pytest.raises(MissingDependencyError, match=r"needs bitsandbytes 0\.44 or newer.*fallback"):
        sdplug.create("optimizer", "ademamix8bit").check_available()


# -- one lr for every group ---------------------------------------------------------------------
def three_groups(lrs):
    return [{"params": [torch.nn.Parameter(torch.full((8,), float(i + 1)))], "lr": lr} for i, lr in enumerate(lrs)]


@pytest.mark.parametrize("name", ONE_LR)
def test_different_group_lrs_are_refused_with_the_reason(name):
    needs(name)
    with pytest.raises(SdplugError) as caught:
        sdplug.create("optimizer", name).build(three_groups([1e-4, 5e-5, 0.0]))
    message = str(caught.value)
    assert "different learning rates (5e-05, 0.0001)" in message
    assert "estimates one step size" in message and "break that estimate" in message
    assert "[optimizer] table" in message  # the fix


@pytest.mark.parametrize("name", ONE_LR)
def test_a_group_without_its_own_lr_takes_the_strategy_lr_and_must_match(name):
    needs(name)
    groups = three_groups([0.5])
    groups.append({"params": [torch.nn.Parameter(torch.zeros(4))]})  # lr 1.0, the strategy's
    with pytest.raises(SdplugError, match=r"different learning rates \(0\.5, 1\)"):
        sdplug.create("optimizer", name).build(groups)


@pytest.mark.parametrize("name", ONE_LR)
def test_equal_group_lrs_and_frozen_groups_train(name):
    needs(name)
    groups = three_groups([1.0, 1.0, 0.0])
    frozen = groups[2]["params"][0].detach().clone()
    optimizer = sdplug.create("optimizer", name).build(groups)
    for _ in range(5):
        optimizer.zero_grad()
        sum(g["params"][0].pow(2).sum() for g in groups).backward()
        optimizer.step()
    assert groups[0]["params"][0].abs().sum() < 8.0  # trained: moved towards 0 from all ones
    assert torch.equal(groups[2]["params"][0].detach(), frozen)  # lr 0: untouched


@pytest.mark.parametrize("name", ONE_LR)
def test_the_preset_lr_makes_a_host_with_group_lrs_work(name):
    """kohya's groups (--unet_lr, --text_encoder_lr): the preset's lr becomes every trained group's."""
    needs(name)
    optimizer = plan_for({"type": name, "lr": 1.0}).optimizer(three_groups([1e-4, 5e-5, 0.0]))
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0, 0.0]
    # no lr in the preset: the strategy's default multiplier, never the host's AdamW-sized lrs
    optimizer = plan_for({"type": name}).optimizer(three_groups([1e-4, 5e-5, 0.0]), host_lr=1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0, 0.0]


def test_an_adamw_sized_lr_is_warned_about(caplog):
    needs("prodigy")
    with caplog.at_level(logging.WARNING, logger="sdplug"):
        sdplug.create("optimizer", "prodigy", lr=1e-4).build([torch.nn.Parameter(torch.zeros(3))])
    assert "lr 0.0001 is far below 1.0" in caplog.text and "10000x smaller" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdplug"):
        sdplug.create("optimizer", "prodigy").build([torch.nn.Parameter(torch.zeros(3))])
    assert caplog.text == ""


# -- schedule-free modes ----------------------------------------------------------------------------
def trained_schedule_free(steps=10):
    model, x, y = regression()
    optimizer = sdplug.create("optimizer", "adamw_schedulefree", lr=5e-2).build(model.parameters())
    train(optimizer, model, x, y, steps)
    return optimizer, model


def test_schedule_free_is_built_in_train_mode():
    needs("adamw_schedulefree")
    assert sdplug.create("optimizer", "adamw_schedulefree").schedule_free
    assert not sdplug.create("optimizer", "adamw").schedule_free
    model, x, y = regression()
    optimizer = sdplug.create("optimizer", "adamw_schedulefree").build(model.parameters())
    assert has_modes(optimizer) and in_train_mode(optimizer) is True
    train(optimizer, model, x, y, 1)  # the package refuses a step unless train() was called


def test_evaluating_switches_to_the_averaged_weights_and_back():
    needs("adamw_schedulefree")
    optimizer, model = trained_schedule_free()
    training = [p.detach().clone() for p in model.parameters()]
    with evaluating(optimizer):
        assert in_train_mode(optimizer) is False
        evaluated = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(Exception, match="not in train mode"):
            optimizer.step()  # why hosts must switch back before stepping
    assert in_train_mode(optimizer) is True
    assert max((a - b).abs().max().item() for a, b in zip(training, evaluated, strict=True)) > 1e-3
    for before, after in zip(training, model.parameters(), strict=True):
        torch.testing.assert_close(after.detach(), before, rtol=0, atol=1e-5)


def test_evaluating_nests_and_keeps_an_optimizer_already_in_eval_mode():
    needs("adamw_schedulefree")
    optimizer, _ = trained_schedule_free()
    with evaluating(optimizer):
        with evaluating(optimizer):
            pass
        assert in_train_mode(optimizer) is False  # the inner block restored eval, not train
    assert in_train_mode(optimizer) is True
    eval_mode(optimizer)
    with evaluating(optimizer):
        pass
    assert in_train_mode(optimizer) is False
    train_mode(optimizer)
    assert in_train_mode(optimizer) is True


def test_modes_look_through_a_wrapper_without_them():
    """accelerate before 0.29: AcceleratedOptimizer has no train()/eval(), only .optimizer."""
    needs("adamw_schedulefree")
    optimizer, model = trained_schedule_free()
    wrapper = types.SimpleNamespace(optimizer=optimizer)
    before = model.weight.detach().clone()
    with evaluating(wrapper):
        assert in_train_mode(wrapper) is False
        assert not torch.equal(model.weight.detach(), before)
    assert in_train_mode(optimizer) is True


def test_modes_do_nothing_for_other_optimizers_and_refuse_a_model():
    model, x, y = regression()
    optimizer = sdplug.create("optimizer", "adamw", lr=1e-2).build(model.parameters())
    train(optimizer, model, x, y, 3)
    before = model.weight.detach().clone()
    assert not has_modes(optimizer) and in_train_mode(optimizer) is None
    with evaluating(optimizer), evaluating(None):
        assert torch.equal(model.weight.detach(), before)
    train_mode(optimizer)
    assert torch.equal(model.weight.detach(), before)
    model.train()
    with pytest.raises(SdplugError, match="got a model"):
        eval_mode(model)
    assert model.training  # untouched


# -- missing packages -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_missing_package_names_the_extra_and_the_plan_refuses_the_preset(monkeypatch, name):
    package, extra, _ = EXTRA[name]
    monkeypatch.setattr("sdplug.optional.is_available", lambda candidate: candidate != package)
    strategy = sdplug.create("optimizer", name)  # choosing it imports nothing
    command = rf'pip install "sdplug\[{extra}\]"'
    with pytest.raises(MissingDependencyError, match=command):
        strategy.check_available()
    with pytest.raises(MissingDependencyError, match=command):
        strategy.build([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(MissingDependencyError, match=rf"^p\.toml: optimizer\.type: optimizer \w+ needs .*{command}"):
        plan_for({"type": name})


def test_an_installed_package_without_the_class_says_upgrade(monkeypatch):
    needs("prodigy")
    import prodigyopt

    monkeypatch.delattr(prodigyopt, "Prodigy")
    with pytest.raises(
        MissingDependencyError,
        match=r'installed prodigyopt [\d.]+ has no Prodigy\. Upgrade it with: pip install -U "sdplug\[prodigy\]"',
    ):
        sdplug.create("optimizer", "prodigy").check_available()


# -- presets ----------------------------------------------------------------------------------------
DEFAULTS = {
    "prodigy": {"lr": 1.0, "weight_decay": 0.0, "decouple": True, "d_coef": 1.0, "safeguard_warmup": False},
    "dadapt_adam": {"lr": 1.0, "decouple": False, "use_bias_correction": False},
    "adamw_schedulefree": {"lr": 2.5e-3, "warmup_steps": 0},
    "came": {"lr": 2e-4, "betas": [0.9, 0.999, 0.9999], "eps": [1e-30, 1e-16]},
    "ademamix8bit": {"lr": 1e-4, "betas": [0.9, 0.999, 0.9999], "alpha": 5.0, "t_alpha": None},
}


@pytest.mark.parametrize("name", NAMES)
def test_a_preset_naming_each_validates_with_the_documented_defaults(name):
    preset = parse_preset({"optimizer": {"type": name}}, path="p.toml")
    strategy = preset.optimizer.create()
    for key, value in DEFAULTS[name].items():
        assert getattr(strategy, key) == value, key


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"type": "prodigy", "lr": 0.0}, "optimizer.lr"),
        ({"type": "prodigy", "lr": 20.0}, "optimizer.lr"),
        ({"type": "prodigy", "d_coef": -1.0}, "optimizer.d_coef"),
        ({"type": "dadapt_adam", "d_coef": 1.0}, "optimizer.d_coef"),  # Prodigy's, not D-Adaptation's
        ({"type": "adamw_schedulefree", "warmup_steps": -5}, "optimizer.warmup_steps"),
        ({"type": "came", "betas": [0.9, 0.999]}, "optimizer.betas"),
        ({"type": "ademamix8bit", "t_alpha": 0}, "optimizer.t_alpha"),
        ({"type": "ademamix8bit", "betas": [0.9, 0.999, 1.5]}, "optimizer.betas[2]"),
    ],
)
def test_bad_parameters_name_the_key(table, key):
    with pytest.raises(PresetError) as caught:
        parse_preset({"optimizer": table}, path="p.toml")
    assert caught.value.key == key and caught.value.path == "p.toml"


def test_import_sdplug_imports_none_of_these_packages():
    import subprocess
    import sys

    packages = sorted({package for package, _, _ in EXTRA.values()})
    code = f"import sys, sdplug; print(*[p in sys.modules for p in {packages!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"] * len(packages)


def test_a_hosts_learning_rate_never_replaces_prodigys_multiplier():
    pytest.importorskip("prodigyopt")
    from sdplug.preset import parse_preset
    from sdplug.schedule import scaled_linear_alphas_cumprod

    plan = parse_preset({"optimizer": {"type": "prodigy"}}, path="p.toml").build(
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon"
    )
    optimizer = plan.optimizer([torch.nn.Parameter(torch.ones(2))], host_lr=1e-4)  # kohya's --learning_rate
    assert [g["lr"] for g in optimizer.param_groups] == [1.0]


def test_a_fallback_never_inherits_prodigys_lr_multiplier():
    from sdplug.preset import parse_preset

    preset = parse_preset({"optimizer": {"type": "prodigy", "lr": 1.0, "weight_decay": 0.01, "fallback": "adamw"}}, path="p.toml")
    fallback = preset.optimizer_fallback.create()
    assert fallback.lr != 1.0 and fallback.weight_decay == 0.01  # AdamW's own default lr, the shared decay kept
    kept = parse_preset({"optimizer": {"type": "adamw8bit", "lr": 3e-4, "fallback": "adamw"}}, path="p.toml")
    assert kept.optimizer_fallback.create().lr == 3e-4  # between two ordinary optimizers the lr carries over
