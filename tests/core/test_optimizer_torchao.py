"""torchao's 8-bit AdamW (torchao_adamw8bit): torchao's defaults, a loud missing package, states
that are really 8-bit, an audit that records floats, and the compiled step equal to the eager one.
"""

import inspect
import json
import subprocess
import sys
import types

import pytest
import torch

import sdplug
from sdplug import optional
from sdplug.errors import MissingDependencyError, PresetError
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod
from sdplug.strategies.optimizer import state_bytes

NAME = "torchao_adamw8bit"
COMMAND = r'pip install "sdplug\[torchao\]"'
DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2, "block_size": 256, "compile_step": True}


def needs_torchao():
    if not optional.is_available("torchao"):
        pytest.skip('torchao is not installed (pip install "sdplug[torchao]")')


def plan_for(table, path="t.toml"):
    return parse_preset({"optimizer": {"type": NAME, **table}}, path=path).build(
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon"
    )


def quadratic():
    """A 64 x 64 weight (4096 values: quantised) and a bias of 8 (fp32 states), pulled to a target."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64, generator=generator))
    bias = torch.nn.Parameter(torch.randn(8, generator=generator))
    target = torch.randn(64, 64, generator=generator)

    def loss():
        return (weight - target).pow(2).mean() + bias.pow(2).mean()

    return weight, bias, loss


def steps(optimizer, loss, n):
    losses = []
    for _ in range(n):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


# -- contract: no package, old package, parameters --------------------------------------------------
def test_a_missing_torchao_names_the_extra_and_the_plan_refuses_the_preset(monkeypatch):
    monkeypatch.setattr("sdplug.optional.is_available", lambda candidate: candidate != "torchao")
    strategy = sdplug.create("optimizer", NAME)  # choosing it imports nothing
    with pytest.raises(MissingDependencyError, match=rf"optimizer torchao_adamw8bit needs the package 'torchao'.*{COMMAND}"):
        strategy.check_available()
    with pytest.raises(MissingDependencyError, match=COMMAND):
        strategy.build([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(
        MissingDependencyError, match=rf"^t\.toml: optimizer\.type: optimizer torchao_adamw8bit needs .*{COMMAND}"
    ):
        plan_for({})


def test_a_torchao_without_torchao_optim_says_upgrade(monkeypatch):
    """torchao 0.9 had the 8-bit optimizers only under torchao.prototype."""
    monkeypatch.setattr("sdplug.optional.is_available", lambda candidate: True)
    monkeypatch.setattr("sdplug.optional.require", lambda package, feature: types.ModuleType(package))
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # import_module raises ModuleNotFoundError
    monkeypatch.setattr("importlib.metadata.version", lambda distribution: "0.9.0")
    with pytest.raises(
        MissingDependencyError,
        match=r"installed torchao 0\.9\.0 has no torchao\.optim\.AdamW8bit \(0\.10 and newer have it\)\. "
        r'Upgrade it with: pip install -U "sdplug\[torchao\]"',
    ):
        sdplug.create("optimizer", NAME).check_available()


def test_a_preset_gets_torchaos_defaults():
    strategy = parse_preset({"optimizer": {"type": NAME}}, path="t.toml").optimizer.create()
    assert {key: getattr(strategy, key) for key in DEFAULTS} == DEFAULTS


def test_the_defaults_are_the_installed_torchaos():
    needs_torchao()
    from torchao.optim import AdamW8bit

    signature = inspect.signature(AdamW8bit).parameters
    for key in ("lr", "eps", "weight_decay", "block_size"):
        assert signature[key].default == DEFAULTS[key], key
    assert list(signature["betas"].default) == DEFAULTS["betas"]


@pytest.mark.parametrize(
    ("table", "key", "allowed"),
    [
        ({"lr": 0.0}, "optimizer.lr", "> 0.0 and <= 1.0"),
        ({"lr": 3.0}, "optimizer.lr", "> 0.0 and <= 1.0"),
        ({"betas": [0.9, 1.0]}, "optimizer.betas[1]", "< 1.0"),
        ({"betas": [0.9]}, "optimizer.betas", "2 items"),
        ({"eps": 0.0}, "optimizer.eps", "> 0.0"),
        ({"weight_decay": -0.1}, "optimizer.weight_decay", ">= 0.0"),
        ({"block_size": 100}, "optimizer.block_size", "one of 32, 64, 128, 256, 512, 1024, 2048, 4096"),
        ({"block_size": 8192}, "optimizer.block_size", "one of 32"),
        ({"compile_step": "no"}, "optimizer.compile_step", "true or false"),
        ({"min_8bit_size": 16}, "optimizer.min_8bit_size", "block_size"),  # bitsandbytes' knob, not torchao's
    ],
)
def test_bad_parameters_name_the_key_and_what_is_allowed(table, key, allowed):
    with pytest.raises(PresetError) as caught:
        parse_preset({"optimizer": {"type": NAME, **table}}, path="t.toml")
    assert caught.value.key == key and caught.value.path == "t.toml"
    assert allowed in str(caught.value)


def test_choosing_it_imports_no_torchao():
    code = "import sys, sdplug; sdplug.create('optimizer', 'torchao_adamw8bit'); print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]


# -- real steps on the CPU (eager: no torch.compile cost) ----------------------------------------------
def test_eager_steps_reduce_a_quadratic_with_8bit_states():
    needs_torchao()
    from torchao.optim.subclass_8bit import OptimState8bit

    weight, bias, loss = quadratic()
    optimizer = sdplug.create("optimizer", NAME, lr=5e-2, weight_decay=0.0, compile_step=False).build([weight, bias])
    losses = steps(optimizer, loss, 10)
    assert losses[-1] < 0.7 * losses[0], losses
    state = optimizer.state[weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert isinstance(state[key], OptimState8bit), key
        assert state[key].codes.dtype == torch.uint8 and state[key].codes.shape == weight.shape
        assert state[key].scale.numel() == weight.numel() // 256  # one fp32 scale per block of 256
    # under 4096 values: torchao keeps full-precision states (as bitsandbytes' min_8bit_size does)
    assert type(optimizer.state[bias]["exp_avg"]) is torch.Tensor and optimizer.state[bias]["exp_avg"].dtype == torch.float32
    # 8-bit codes (2 bytes), 2 x 16 block scales and 2 x 256-entry maps for the weight; 8 fp32 for the bias
    expected = 2 * 4096 + 2 * 16 * 4 + 2 * 256 * 4 + 2 * 8 * 4 + 2 * 4
    assert state_bytes(optimizer) == expected
    assert expected / (4096 + 8) < 2.6  # AdamW: 8


def test_the_audit_records_float_learning_rates_and_frozen_groups_stay_put():
    needs_torchao()
    weight, bias, loss = quadratic()
    frozen = torch.nn.Parameter(torch.ones(4096))
    plan = plan_for({"lr": 5e-2, "compile_step": False})
    optimizer = plan.optimizer([{"params": [weight, bias], "lr": 1e-4}, {"params": [frozen], "lr": 0.0}])
    assert all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)  # torchao's convention
    steps(optimizer, lambda: loss() + frozen.pow(2).sum(), 3)
    assert torch.equal(frozen.detach(), torch.ones(4096))  # lr 0: not even weight decay
    record = json.loads(json.dumps(plan.report()))["optimizer"]
    assert record["strategy"] == NAME and record["class"].endswith("AdamW8bit")
    assert record["learning_rates"] == [0.0, 0.05]  # the preset's lr, read back as 0.05, not 0.0500000007
    assert 2.0 < record["state_bytes_per_trainable_parameter"] < 3.0


def test_a_pytorch_lr_schedule_moves_the_tensor_lr():
    needs_torchao()
    weight, bias, loss = quadratic()
    optimizer = sdplug.create("optimizer", NAME, lr=1e-2, compile_step=False).build([weight, bias])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(3):
        steps(optimizer, loss, 1)
        schedule.step()
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(1e-2 / 8)


def test_a_tiny_unet_lora_trains():
    needs_torchao()
    pytest.importorskip("peft")
    from peft import LoraConfig

    from sdplug.trainer import tiny
    from tests.tiny_sd import build_unet

    torch.manual_seed(0)
    unet = build_unet()
    unet.requires_grad_(False)
    # rank 64: the A matrices of the 64-wide layers have 4096 values (8-bit), the 32-wide ones 2048 (fp32)
    unet.add_adapter(
        LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = sdplug.create("optimizer", NAME, lr=1e-3, compile_step=False).build(params)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, tiny.TEXT_WIDTH, generator=generator)
    target = torch.randn(2, 4, 16, 16, generator=generator)
    losses = steps(optimizer, lambda: (unet(latents, torch.tensor([10, 500]), context).sample - target).pow(2).mean(), 8)
    assert all(torch.isfinite(p).all() for p in params)
    assert losses[-1] < losses[0], losses
    kinds = {type(optimizer.state[p]["exp_avg"]).__name__ for p in params}
    assert kinds == {"OptimState8bit", "Tensor"}


@pytest.mark.slow
def test_the_compiled_step_equals_the_eager_one():
    """torchao's own path (torch.compile of every update); on this CPU about 10 s per parameter shape."""
    needs_torchao()
    results = []
    for compile_step in (True, False):
        weight, bias, loss = quadratic()
        optimizer = sdplug.create("optimizer", NAME, lr=5e-2, compile_step=compile_step).build([weight, bias])
        losses = steps(optimizer, loss, 3)
        results.append((losses, weight.detach().clone(), optimizer))
    (compiled_losses, compiled, optimizer), (eager_losses, eager, _) = results
    assert type(optimizer).__module__ == "torchao.optim.adam"
    assert compiled_losses[-1] < compiled_losses[0]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-6)
