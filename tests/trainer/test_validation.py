"""Validation loss: held-out images, fixed draws, a curve comparable across runs and presets."""

from __future__ import annotations

import json

import pytest

from sdplug.trainer.config import OptionError, TrainConfig
from sdplug.trainer.loop import Trainer
from sdplug.trainer.validation import GRID, hold_out


def config(tmp_path, small_data, preset_text, name="out", **options):
    preset = tmp_path / f"{name}.toml"
    preset.write_text(preset_text)
    defaults = dict(output=tmp_path / name, data=small_data, steps=4, batch_size=2, samples=False, progress=False)
    defaults.update(options)
    return TrainConfig(preset=str(preset), **defaults)


def test_a_dreambooth_run_with_ema_and_validation_writes_both(tmp_path, small_data):
    preset = '[ema]\ndecay = 0.5\n[optimizer]\ntype = "adamw"\nlr = 1e-3\n'
    run = config(tmp_path, small_data, preset, mode="dreambooth", validation_split=0.2, validate_every=2)
    trainer = Trainer(run)
    held = trainer.validator.count
    assert held >= 1 and len(trainer.examples) + held == 60  # the fixture's 60 images: held out, never trained on
    report = trainer.run()
    validation = report["validation"]
    assert validation["steps"] == [0, 2, 4] and len(validation["values"]) == 3
    assert validation["timesteps"] == [(2 * i + 1) * 1000 // (2 * GRID) for i in range(GRID)]
    assert all(v > 0 for v in validation["values"]) and validation["values"][-1] != validation["values"][0]
    out = run.output
    assert (out / "validation-loss.png").is_file() and (out / "model-ema").is_dir() and (out / "model").is_dir()
    assert "validation-loss.png" in json.loads((out / "audit.json").read_text())["files"]


@pytest.mark.slow
def test_the_curve_is_comparable_the_draws_never_depend_on_seed_or_preset(tmp_path, small_data):
    runs = {}
    for name, seed, preset in (
        ("a", 0, '[[noise]]\ntype = "pyramid"\n'),
        ("b", 0, '[[noise]]\ntype = "offset"\n'),
        ("c", 7, '[[noise]]\ntype = "offset"\n'),
    ):
        trainer = Trainer(config(tmp_path, small_data, preset, name=name, seed=seed, validation_split=0.2, steps=1))
        runs[name] = (trainer.validator.noise.clone(), trainer.validator.captions, trainer.run()["validation"]["values"][0])
    assert all((runs[n][0] == runs["a"][0]).all() and runs[n][1] == runs["a"][1] for n in "bc")  # seed and preset aside
    # the same untrained model (seed 0) under two presets: the same draws, the same starting loss
    assert runs["a"][2] == pytest.approx(runs["b"][2], rel=1e-6)


def test_hold_out_is_fixed_and_disjoint():
    examples = list(range(20))
    train_a, held_a = hold_out(examples, 0.25)
    train_b, held_b = hold_out(examples, 0.25)
    assert held_a == held_b and len(held_a) == 5 and not set(train_a) & set(held_a) and len(train_a) == 15


@pytest.mark.parametrize(
    "options,words",
    [
        (dict(validate_every=5), "needs held-out images"),
        (dict(validation_split=0.8), "allowed: a share from 0 to 0.5"),
        (dict(validate_every=-1), "must be >= 0"),
    ],
)
def test_validation_options_are_checked(tmp_path, options, words):
    with pytest.raises(OptionError, match=words):
        TrainConfig(preset="min-snr", output=tmp_path, **options).check()


@pytest.mark.slow
def test_a_resumed_run_keeps_its_validation_curve(tmp_path, small_data):
    common = dict(validation_split=0.2, validate_every=2, steps=4)
    plain = '[[noise]]\ntype = "offset"\n'
    whole = Trainer(config(tmp_path, small_data, plain, name="whole", **common)).run()["validation"]
    Trainer(config(tmp_path, small_data, plain, name="split", stop_after=2, **common)).run()
    resumed = Trainer(config(tmp_path, small_data, plain, name="split", resume="latest", **common)).run()["validation"]
    assert resumed["steps"] == whole["steps"] == [0, 2, 4]
    assert resumed["values"] == pytest.approx(whole["values"], rel=1e-5)
