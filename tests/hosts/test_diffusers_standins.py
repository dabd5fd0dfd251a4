"""The patched diffusers stand-ins really use the plan: each records what its step trained on,
and a plan built from the same preset and seed, replayed in the script's order, must give the
same noise, timesteps, noisy input, caption dropout decisions, target and weighted loss; the
optimizer and attention processor must be the preset's. The host's own values (``randint``
timesteps, plain MSE) would not match, so each comparison can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from sdplug.hosts.diffusers_scripts import edits
from sdplug.preset import load_preset
from tests.hosts.diffusers_standin import DREAMBOOTH_STANDIN, make_dreambooth_standin, make_standin

ROOT = Path(__file__).resolve().parents[2]
BATCH = 4
PRESET = """
[[noise]]
type = "pyramid"
discount = 0.8

[[noise]]
type = "input_perturbation"
gamma = 0.1

[timesteps]
type = "logit_normal"

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.5

[optimizer]
type = "adamw"
lr = 1e-3

[attention]
type = "sdpa"
"""


def _run(tmp_path, make, *script_args) -> tuple[dict, dict, Path]:
    script = make(tmp_path / "tree")
    preset = tmp_path / "p.toml"
    preset.write_text(PRESET)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "diffusers", "--preset", str(preset), "--", str(script)]
    command += ["--output_dir", str(out), "--seed", "0", "--max_train_steps", "3", "--train_batch_size", str(BATCH), *script_args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "standin.pt"), json.loads((out / "audit.json").read_text()), preset


def empty_rows(ids: torch.Tensor) -> list[bool]:
    """Rows holding the stand-ins' empty caption: tokens ``[1, 0, 0, 0]`` (or their embeddings),
    where every caption the stand-ins train on has different tokens at positions 1 and 3."""
    return (ids[:, 1] == ids[:, 3]).reshape(len(ids), -1).all(1).tolist()


def replay(preset: Path, record: dict, *, prior_weight: float | None = None) -> int:
    """Check every recorded step against the plan's own draws; returns the rows dropped."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
    )
    plan = load_preset(preset).build(scheduler, seed=0, rank=0, prediction_type="v_prediction")
    dropped_total = 0
    for step in record["steps"]:
        latents = step["latents"]
        draw = plan.noise(latents)
        timesteps = plan.timesteps(len(latents))
        torch.testing.assert_close(step["noise"], draw.target)
        assert step["timesteps"].tolist() == timesteps.tolist()
        noisy = plan.noisy_input(latents, draw, timesteps)
        assert not torch.allclose(noisy, scheduler.add_noise(latents, draw.target, timesteps))  # input perturbation is in it
        torch.testing.assert_close(step["noisy"], noisy)
        dropped = [plan.caption_dropped(epoch=0) for _ in range(len(step["ids"]))]
        assert empty_rows(step["ids"]) == dropped
        if step.get("masks") is not None:  # the attention mask of a dropped row is the empty caption's
            assert [bool((m == torch.tensor([1, 0, 0, 0])).all()) for m in step["masks"]] == dropped
        dropped_total += sum(dropped)
        target = plan.target(latents, draw, timesteps)
        torch.testing.assert_close(step["target"], target)
        pred = step["pred"]
        if prior_weight is None:
            loss = plan.loss(pred, target, timesteps).mean()
        else:
            half = len(pred) // 2
            loss = plan.loss(pred[:half], target[:half], timesteps[:half]).mean()
            loss = loss + prior_weight * plan.loss(pred[half:], target[half:], timesteps[half:]).mean()
        torch.testing.assert_close(step["loss"], loss)
        assert not torch.allclose(step["loss"], torch.nn.functional.mse_loss(pred, target))  # the weighting is in it
        plan.step()
    return dropped_total


def _check_run(record: dict, audit: dict, dropped: int, samples: int) -> None:
    assert audit["problems"] == [] and audit["steps"] == 3
    assert record["optimizer"] == "AdamW" and record["lr"] == 1e-3  # the script's lr is 1e-4
    assert record["processor"] == "AttnProcessor2_0" and audit["attention"]["processor_before"] == "AttnProcessor"
    caption = audit["caption"]
    assert caption["samples"] == samples and caption["dropped"] == dropped and 0 < dropped < samples
    assert caption["empty_caption_embeddings_substituted"] == dropped


def test_dreambooth_standin_takes_the_real_scripts_patch_exactly():
    name = "train_dreambooth_lora.py"
    patched = edits.patch_source(DREAMBOOTH_STANDIN, name)
    compile(patched, name, "exec")
    assert edits.unpatch_source(patched, name) == DREAMBOOTH_STANDIN
    assert sum(line.endswith(edits.MARK) for line in patched.splitlines()) == len(edits.EDITS[name]) + 1


@pytest.mark.slow
def test_text_to_image_standin_trains_on_the_plans_draws(tmp_path):
    record, audit, preset = _run(tmp_path, make_standin)
    _check_run(record, audit, replay(preset, record), 3 * BATCH)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script_args", [["--with_prior_preservation", "--prior_loss_weight", "0.5"], ["--pre_compute_text_embeddings"]]
)
def test_dreambooth_standin_trains_on_the_plans_draws(tmp_path, script_args):
    record, audit, preset = _run(tmp_path, make_dreambooth_standin, *script_args)
    prior = "--with_prior_preservation" in script_args
    dropped = replay(preset, record, prior_weight=0.5 if prior else None)
    _check_run(record, audit, dropped, 3 * BATCH * (2 if prior else 1))
    assert record["steps"][0]["ids"].dim() == (2 if prior else 3)  # tokens, or precomputed embeddings


def _session(tmp_path, script="train_dreambooth_lora_sdxl.py", **args):
    import argparse

    from sdplug.hosts.diffusers_scripts.session import ScriptRun

    (tmp_path / "p.toml").write_text(PRESET)
    namespace = argparse.Namespace(seed=0, output_dir=str(tmp_path / "out"), learning_rate=1e-4, **args)
    return ScriptRun(load_preset(tmp_path / "p.toml"), script, namespace, {}), namespace


def _sd_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_sdxl_dreambooth_embeddings_are_dropped_per_sample(tmp_path):
    """The script's one shared prompt row, repeated per sample: the dropped rows (the plan's draws)
    get the empty prompt's embedding and pooled embedding, the others keep the instance prompt's."""
    from sdplug.hosts.diffusers_scripts import session

    current, args = _session(tmp_path)
    current.bind(_sd_scheduler(), args)
    reference = load_preset(tmp_path / "p.toml").build(_sd_scheduler(), seed=0, rank=0, prediction_type="epsilon")
    embeds, pooled = torch.ones(1, 3, 2), torch.ones(1, 5)
    calls = []

    def empty():
        calls.append(1)
        return torch.zeros(1, 3, 2), torch.zeros(1, 5)

    session._current = current
    try:
        rows = []
        for _ in range(3):
            out_embeds, out_pooled, repeat = session.drop_embeddings(0, embeds, pooled, 4, empty)
            assert repeat == 1 and out_embeds.shape == (4, 3, 2) and out_pooled.shape == (4, 5)
            rows += [bool((e == 0).all()) for e in out_embeds]
            assert [bool((p == 0).all()) for p in out_pooled] == rows[-4:]
            assert all(bool((e == 1).all()) for e, d in zip(out_embeds, rows[-4:], strict=True) if not d)
    finally:
        session._current = None
    assert rows == [reference.caption_dropped(epoch=0) for _ in range(12)] and any(rows) and not all(rows)
    assert len(calls) == 1  # the empty prompt is encoded once
    assert embeds.shape == (1, 3, 2)  # the script's shared row itself is left alone


def test_sdxl_dreambooth_without_a_session_is_unchanged():
    from sdplug.hosts.diffusers_scripts import session

    embeds, pooled = torch.ones(1, 3, 2), torch.ones(1, 5)
    assert session.drop_embeddings(0, embeds, pooled, 4, lambda: None) == (embeds, pooled, 4)


def test_sdxl_dreambooth_refuses_edm_and_caption_with_text_encoder_training(tmp_path):
    import argparse

    from sdplug.hosts.diffusers_scripts import flags

    current, args = _session(tmp_path, do_edm_style_training=True)
    with pytest.raises(flags.DiffusersConflictError, match="EDM-style"):
        current.bind(_sd_scheduler(), args)
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_text_encoder", action="store_true")
    with pytest.raises(flags.DiffusersConflictError, match="--train_text_encoder"):
        flags.check(current.preset, "train_dreambooth_lora_sdxl.py", parser.parse_args(["--train_text_encoder"]), parser)
    flags.check(current.preset, "train_dreambooth_lora_sdxl.py", parser.parse_args([]), parser)  # without it: accepted
