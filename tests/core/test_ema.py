"""[ema]: the average's formula, its schedule, resume, and the trainer's EMA weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdplug.errors import PresetError, SdplugError
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod


def plan_with(ema, optimizer=None):
    preset = parse_preset({"ema": ema, "optimizer": optimizer or {"type": "adamw", "lr": 0.1}}, path="e.toml")
    return preset.build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")


def train(plan, steps, weight):
    optimizer = plan.optimizer([weight])
    ema = plan.ema([weight])
    history = []
    for _ in range(steps):
        (weight**2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        plan.step()
        history.append(weight.detach().clone())
    return ema, history


def test_the_average_follows_its_formula_schedule_and_start():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    initial = weight.detach().clone()
    ema, history = train(plan_with({"decay": 0.9, "update_every": 2, "start_step": 3}), 6, weight)
    expected = initial.clone()
    for n, w in enumerate(history, start=1):
        if n < 3:
            expected = w.clone()  # before start_step: the weights themselves
        elif n % 2 == 0:
            expected = 0.9 * expected + 0.1 * w
    assert torch.allclose(ema.shadows[0], expected, atol=1e-6)
    assert ema.record()["updates"] == 2 and ema.record()["optimizer_steps"] == 6  # steps 4 and 6
    assert not torch.allclose(ema.shadows[0], weight.detach())  # an average, not the last weights


def test_applied_swaps_the_average_in_and_back_and_cpu_keeps_it_off_the_weights_device():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    ema, _ = train(plan_with({"decay": 0.5, "device": "cpu"}), 3, weight)
    trained = weight.detach().clone()
    with ema.applied():
        assert torch.equal(weight.detach(), ema.shadows[0].to(weight.dtype))
    assert torch.equal(weight.detach(), trained)
    assert ema.record()["device"] == "cpu"


def test_the_average_resumes_from_the_plans_state():
    def run(steps, state=None):
        weight = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
        plan = plan_with({"decay": 0.8})
        optimizer = plan.optimizer([weight])
        ema = plan.ema([weight])
        if state is not None:
            plan.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
            with torch.no_grad():
                weight.copy_(state[2])
        for _ in range(steps):
            (weight**2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            plan.step()
        return plan, optimizer, weight, ema

    whole = run(4)[3]
    plan, optimizer, weight, _ = run(2)
    resumed = run(2, (plan.state_dict(), optimizer.state_dict(), weight.detach().clone()))[3]
    assert torch.allclose(whole.shadows[0], resumed.shadows[0]) and resumed.optimizer_steps == 4


def test_ema_needs_the_plans_optimizer_and_the_audit_names_an_ema_never_kept():
    plan = plan_with({"decay": 0.99})
    with pytest.raises(SdplugError, match="call plan.optimizer first"):
        plan.ema([torch.nn.Parameter(torch.ones(1))])
    plan.optimizer([torch.nn.Parameter(torch.ones(1))])
    plan.step()
    assert "ema was never kept (the host did not call plan.ema)" in plan.report()["problems"]
    assert plan_with({}).ema([torch.nn.Parameter(torch.ones(1))]) is None  # no decay: no [ema]


@pytest.mark.parametrize(
    "table,key",
    [({"decay": 1.0}, "ema.decay"), ({"decay": 0.9, "device": "gpu"}, "ema.device"), ({"update_every": 0}, "ema.update_every")],
)
def test_bad_ema_settings_name_the_key(table, key):
    with pytest.raises(PresetError, match=key.replace(".", r"\.")):
        parse_preset({"ema": table}, path="e.toml")


@pytest.mark.parametrize("mode,weights", [("lora", "lora-ema.safetensors"), ("dreambooth", "model-ema")])
def test_the_trainer_saves_and_samples_the_ema_weights_beside_the_plain_ones(tmp_path, small_data, mode, weights):
    from sdplug.trainer.config import TrainConfig
    from sdplug.trainer.loop import Trainer

    preset = tmp_path / "p.toml"
    preset.write_text('[ema]\ndecay = 0.5\n[optimizer]\ntype = "adamw"\nlr = 1e-2\n')
    out = tmp_path / "out"
    config = TrainConfig(
        preset=str(preset),
        output=out,
        data=small_data,
        steps=3,
        batch_size=2,
        mode=mode,
        samples=True,
        sample_seeds=(0,),
        guidance_scales=(1.0,),
        sample_steps=2,
        progress=False,
    )
    trainer = Trainer(config)
    report = trainer.run()
    assert report["ema"]["updates"] == 3 and report["problems"] == []
    assert (out / weights).exists() and (out / "samples-after-ema.png").is_file()
    if mode == "lora":
        plain, averaged = load_file(out / "lora.safetensors"), load_file(out / "lora-ema.safetensors")
        assert plain.keys() == averaged.keys()
        ups = [k for k in plain if k.endswith("lora_up.weight")]
        assert any(not torch.equal(plain[k], averaged[k]) for k in ups)  # different weights, same layout


@pytest.mark.parametrize(
    "name,options",
    [
        ("huber-snr", {}),
        ("ztsnr-vpred", {"prediction_type": "v_prediction"}),
        ("prodigy-lora", {}),
        ("ema-dreambooth", {"mode": "dreambooth"}),
    ],
)
def test_the_new_shipped_presets_train_and_their_audit_proves_them(tmp_path, small_data, name, options):
    from sdplug.trainer.config import TrainConfig
    from sdplug.trainer.loop import Trainer

    config = TrainConfig(
        preset=name, output=tmp_path / "out", data=small_data, steps=2, batch_size=2, samples=False, progress=False, **options
    )
    report = Trainer(config).run()
    assert report["problems"] == [] and report["steps"] == 2
    if name == "huber-snr":
        assert report["loss"] == {"type": "pseudo_huber", "calls": 2}
    if name == "ztsnr-vpred":
        assert report["schedule"]["alpha_cumprod_last"] == 0.0
    if name == "prodigy-lora":
        assert report["optimizer"]["class"].endswith("Prodigy") and report["optimizer"]["learning_rates"] == [1.0]
    if name == "ema-dreambooth":
        assert report["ema"]["decay"] == 0.999 and (tmp_path / "out" / "model-ema").is_dir()
