"""The reference trainer on rectified flow: the embedded model with ``--prediction-type velocity``
trains through the flow plan, validates on a fixed sigma grid, resumes, saves a model folder
that loads back as flow, and samples with the flow-matching Euler sampler."""

from __future__ import annotations

import json

import pytest
import torch

from sdplug.cli import main
from sdplug.trainer.config import TrainConfig
from sdplug.trainer.loop import Trainer
from sdplug.trainer.models import load

FLOW_PRESET = (
    '[timesteps]\ntype = "logit_normal"\n[loss_weighting]\ntype = "min_snr"\n[[caption]]\ntype = "dropout"\nrate = 0.3\n'
)


def flow_config(tmp_path, name, **options):
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    preset = tmp_path / name / "flow.toml"
    preset.write_text(FLOW_PRESET)
    defaults = dict(output=tmp_path / name / "out", steps=4, batch_size=4, samples=False, progress=False)
    defaults.update({"prediction_type": "velocity", **options})
    return TrainConfig(preset=str(preset), **defaults)


def test_a_flow_run_trains_validates_and_saves_a_flow_model(tmp_path, small_data):
    config = flow_config(tmp_path, "run", data=small_data, mode="dreambooth", steps=3, validation_split=0.25, validate_every=3)
    trainer = Trainer(config)
    report = trainer.run()
    assert report["schedule"]["process"] == "flow" and report["schedule"]["prediction_type"] == "velocity"
    assert report["timesteps"]["binned_by"] == "sigma" and report["problems"] == []
    audit = json.loads((config.output / "audit.json").read_text())
    grid = audit["validation"]["timesteps"]
    sigmas = trainer.plan.process.sigmas[torch.tensor(grid)]
    assert torch.allclose(sigmas, torch.arange(0.05, 1.0, 0.1), atol=1e-3)  # the centres of tenths of sigma
    assert all(v == v for v in audit["validation"]["values"])  # finite losses
    reloaded = load(config.output / "model")
    assert reloaded.flow and reloaded.prediction_type == "velocity"


def test_the_flow_model_takes_sigma_times_1000_as_its_time(tmp_path, small_data, monkeypatch):
    seen = []
    config = flow_config(tmp_path, "time", data=small_data, steps=1, record_draws=True)
    trainer = Trainer(config)
    forward = trainer.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(timestep.detach().clone())
        return forward(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(trainer.unet, "forward", spy)
    trainer.run()
    drawn = torch.tensor(trainer.draw_log[0]["timesteps"])
    assert seen and seen[0].dtype.is_floating_point and bool(((seen[0] > 0) & (seen[0] <= 1000)).all())
    assert torch.allclose(seen[0].cpu(), trainer.plan.process.sigmas[drawn] * 1000)


def test_a_flow_run_resumes_with_the_same_draws(tmp_path):
    def run(name, **options):
        trainer = Trainer(flow_config(tmp_path, name, record_draws=True, **options))
        trainer.run()
        return trainer

    whole = run("whole", steps=4)
    first = run("first", steps=4, stop_after=2)
    resumed = run("resumed", steps=4, resume=first.config.output / "checkpoint-2")
    for a, b in zip(whole.draw_log, resumed.draw_log, strict=True):
        assert a["timesteps"] == b["timesteps"] and a["dropped"] == b["dropped"] and a["noise_sum"] == b["noise_sum"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_ddpm_only_preset_on_the_flow_model_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "p.toml").write_text('[[noise]]\ntype = "generalized_offset"\n')
    out = tmp_path / "out"
    code = main(["train", str(tmp_path / "p.toml"), "--prediction-type", "velocity", "--output", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "p.toml: noise[0].type" in err and "written for ddpm" in err and "Allowed on flow:" in err
    assert "Traceback" not in err and not (out / "lora.safetensors").exists()


def test_sdplug_sample_reproduces_a_flow_loras_after_grid(tmp_path):
    """The LoRA's metadata says the embedded model was a flow: ``sdplug sample`` rebuilds it and
    samples with the flow-matching Euler sampler, reproducing the run's own after-grid."""
    from sdplug.trainer.generate import SampleRequest, generate

    prompts = ("a red circle on a black background", "a blue square on a white background")
    config = flow_config(
        tmp_path,
        "lora",
        steps=2,
        seed=3,
        samples=True,
        train_text_encoder=True,
        sample_prompts=prompts,
        sample_seeds=(0, 1),
        guidance_scales=(3.0,),
        sample_steps=3,
    )
    trainer = Trainer(config)
    trainer.run()
    after = trainer.samples_after[3.0]
    assert not torch.allclose(after, trainer.samples_before[3.0], atol=1e-3)
    request = SampleRequest(
        prompts=list(prompts),
        output=tmp_path / "grid.png",
        guidance_scales=[3.0],
        seeds=[0, 1],
        steps=3,
        lora=config.output / "lora.safetensors",
    )
    images, _ = generate(request)
    assert torch.allclose(images[3.0], after, atol=1e-4)


def test_the_trainer_names_its_one_text_encoder_clip(tmp_path, small_data):
    (tmp_path / "p.toml").write_text('[[caption]]\ntype = "dropout"\nrate = 1.0\nencoders = ["clip"]\n')
    config = flow_config(tmp_path, "clip", data=small_data, steps=1, record_draws=True, prediction_type=None)
    config.preset = str(tmp_path / "p.toml")
    trainer = Trainer(config)
    report = trainer.run()
    assert trainer.draw_log[0]["dropped"] == [True] * 4
    assert report["caption"]["encoders"]["clip"]["dropped"] == 4
    (tmp_path / "q.toml").write_text('[[caption]]\ntype = "dropout"\nencoders = ["t5"]\n')
    with pytest.raises(Exception, match=r"caption\[0\].encoders.*clip"):
        Trainer(TrainConfig(preset=str(tmp_path / "q.toml"), output=tmp_path / "out2", data=small_data, steps=1))
