"""The reference trainer's own state: a run repeats from its seed, trained modules train."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdplug.trainer.config import TrainConfig
from sdplug.trainer.loop import Trainer


def config_for(tmp_path, name, preset_text='[preset]\nname = "plain"\n', **options):
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    preset = tmp_path / name / "p.toml"
    preset.write_text(preset_text)
    defaults = dict(output=tmp_path / name / "out", steps=2, batch_size=2, samples=False, progress=False)
    defaults.update(options)
    return TrainConfig(preset=str(preset), **defaults)


def test_lora_on_a_loaded_model_repeats_from_its_seed(tmp_path, tiny_sd, small_data):
    def lora_weights(name, seed):
        config = config_for(tmp_path, name, model=tiny_sd, data=small_data, seed=seed, train_text_encoder=True)
        torch.manual_seed(1000 + len(name))  # whatever ran before must not matter
        Trainer(config).run()
        return load_file(config.output / "lora.safetensors")

    first, again, other = lora_weights("a", 0), lora_weights("bb", 0), lora_weights("ccc", 1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    downs = [k for k in first if k.endswith("lora_down.weight")]
    assert any(k.startswith("lora_te_") for k in downs)
    assert not any(torch.equal(first[k], other[k]) for k in downs)


def test_gradient_checkpointing_really_runs_in_a_loaded_text_encoder(tmp_path, tiny_sd, small_data):
    preset = "[memory]\ngradient_checkpointing = true\n"
    config = config_for(tmp_path, "gc", preset, model=tiny_sd, data=small_data, mode="dreambooth", train_text_encoder=True)
    trainer = Trainer(config)
    assert trainer.bundle.text_encoder.training and trainer.bundle.unet.training
    report = trainer.run()
    calls = report["memory"]["gradient_checkpointing"]["checkpointed_calls_in_step_1"]
    assert calls["unet"] > 0 and calls["text_encoder"] > 0


def test_a_frozen_text_encoder_stays_in_eval_mode(tmp_path, tiny_sd, small_data):
    trainer = Trainer(config_for(tmp_path, "frozen", model=tiny_sd, data=small_data))
    assert trainer.bundle.unet.training and not trainer.bundle.text_encoder.training


# -- checkpoints and resume -----------------------------------------------------------------------
RESUME_PRESET = '[[noise]]\ntype = "pyramid"\n[[caption]]\ntype = "dropout"\nrate = 0.3\n'


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 4-step run stopped after step 2, with its checkpoint."""
    tmp_path = tmp_path_factory.mktemp("saved")
    config = config_for(tmp_path, "run", RESUME_PRESET, steps=4, stop_after=2, lora_rank=4)
    Trainer(config).run()
    return config.output / "checkpoint-2"


@pytest.mark.parametrize(
    "change,words",
    [
        (dict(lora_rank=8), "--lora-rank = 4, this run has 8"),
        (dict(mode="dreambooth"), "--mode = 'lora', this run has 'dreambooth'"),
        (dict(train_text_encoder=True), "--train-text-encoder = False, this run has True"),
        (dict(seed=1), "--seed = 0, this run has 1"),
        (dict(batch_size=4), "--batch-size = 2, this run has 4"),
        (dict(prediction_type="v_prediction"), "--prediction-type = 'epsilon', this run has 'v_prediction'"),
        (dict(preset_text='[[noise]]\ntype = "offset"\n'), "the resolved preset differs"),
        (dict(preset_text=RESUME_PRESET + '[optimizer]\ntype = "adafactor"\n'), "the resolved preset differs"),
        (dict(steps=2), "at step 2 and --steps is 2: nothing to train"),
    ],
)
def test_resume_refuses_another_runs_checkpoint_naming_the_option(tmp_path, saved_run, change, words):
    from sdplug.trainer.checkpoint import CheckpointError

    options = dict(steps=4, lora_rank=4, preset_text=RESUME_PRESET, resume=saved_run)
    options.update(change)
    trainer = Trainer(config_for(tmp_path, "again", **options))
    with pytest.raises(CheckpointError) as caught:
        trainer.run()
    assert words in str(caught.value)


def test_resume_from_a_missing_folder_says_so(tmp_path, saved_run):
    from sdplug.trainer.checkpoint import CheckpointError

    missing = saved_run.parent / "checkpoint-9"
    trainer = Trainer(config_for(tmp_path, "missing", RESUME_PRESET, steps=4, lora_rank=4, resume=missing))
    with pytest.raises(CheckpointError, match="no such checkpoint folder.*newest complete checkpoint there is .*checkpoint-2"):
        trainer.run()


def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path, saved_run):
    """A checkpoint someone else made, with a pickle that would run code and a manifest that
    vouches for it: loading refuses it, and the code did not run."""
    import json
    import pickle
    import shutil

    from sdplug.trainer.checkpoint import MANIFEST, MANIFEST_CHECKSUM, CheckpointError, _manifest_checksum, _sha256

    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "out-crafted" / "checkpoint-2"
    shutil.copytree(saved_run, crafted)
    # a registered object's state: accelerate itself would unpickle it with weights_only=False
    with (crafted / "custom_checkpoint_0.pkl").open("wb") as handle:
        pickle.dump({"ranks": [Exploit()]}, handle)
    manifest = json.loads((crafted / MANIFEST).read_text())
    manifest["files"]["custom_checkpoint_0.pkl"] = _sha256(crafted / "custom_checkpoint_0.pkl")
    manifest[MANIFEST_CHECKSUM] = _manifest_checksum(manifest)  # a checksum guards against damage, not a forger
    (crafted / MANIFEST).write_text(json.dumps(manifest))
    trainer = Trainer(config_for(tmp_path, "crafted", RESUME_PRESET, steps=4, lora_rank=4, resume=crafted))
    with pytest.raises(CheckpointError, match="could run code"):
        trainer.run()
    assert not marker.exists()


KILL_DURING_SAVE = """
import os, signal, sys
import torch

real_save = torch.save

def save_then_die(obj, path, *args, **kwargs):
    # the process is killed in the middle of writing checkpoint-4's optimizer state
    real_save(obj, path, *args, **kwargs)
    if str(path).endswith("checkpoint-4.partial/optimizer.bin"):
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die  # accelerate's save_state writes through torch.save
from sdplug.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_killed_while_saving_leaves_no_checkpoint_that_looks_complete(tmp_path):
    import os
    import subprocess
    import sys

    preset = tmp_path / "p.toml"
    preset.write_text(RESUME_PRESET)
    out = tmp_path / "out"
    common = [
        str(preset),
        "--output",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--no-samples",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, "train", *common, "--save-every", "2"], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoint-2" / "checkpoint.json").is_file()
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-4.partial").is_dir()

    sdplug = [sys.executable, "-m", "sdplug", "train", *common]
    partial = subprocess.run([*sdplug, "--resume", str(out / "checkpoint-4.partial")], env=env, capture_output=True, text=True)
    assert partial.returncode == 1 and "Traceback" not in partial.stderr
    assert "incomplete checkpoint" in partial.stderr and "checkpoint-2" in partial.stderr

    latest = subprocess.run([*sdplug, "--resume", "latest"], env=env, capture_output=True, text=True)
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in latest.stdout  # the banner names what 'latest' is
    assert (out / "lora.safetensors").is_file()
    import json

    assert json.loads((out / "audit.json").read_text())["steps"] == 6


def test_a_truncated_file_in_a_complete_looking_checkpoint_is_named_corrupt(tmp_path, saved_run):
    import shutil

    from sdplug.trainer.checkpoint import CheckpointError

    copy = tmp_path / "out-copy" / "checkpoint-2"
    shutil.copytree(saved_run, copy)
    data = (copy / "optimizer.bin").read_bytes()
    (copy / "optimizer.bin").write_bytes(data[: len(data) // 2])
    trainer = Trainer(config_for(tmp_path, "corrupt", RESUME_PRESET, steps=4, lora_rank=4, resume=copy))
    with pytest.raises(CheckpointError, match="corrupt checkpoint: optimizer.bin"):
        trainer.run()


def test_a_checkpoint_is_accelerates_state_with_only_the_trainable_weights(saved_run):
    """save_state wrote the optimizer, each rank's random states and the registered objects; the
    model files are replaced by the trainable weights alone, and the manifest vouches for all."""
    import json

    from sdplug.trainer.checkpoint import MANIFEST, _sha256

    names = {p.name for p in saved_run.iterdir()}
    registered = {f"custom_checkpoint_{i}.pkl" for i in range(3)}  # plan, sampler, records
    assert names == {"optimizer.bin", "random_states_0.pkl", "trainable.safetensors", MANIFEST} | registered
    weights = load_file(saved_run / "trainable.safetensors")
    assert weights and all("lora" in name for name in weights)  # no frozen base weight
    state = torch.load(saved_run / "custom_checkpoint_0.pkl", weights_only=True)
    assert state["name"] == "plan" and state["ranks"][0]["steps"] == 2
    files = json.loads((saved_run / MANIFEST).read_text())["files"]
    assert files == {name: _sha256(saved_run / name) for name in names - {MANIFEST}}
