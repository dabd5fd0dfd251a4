"""diffusers' flow-matching DreamBooth LoRA scripts through ``sdplug diffusers``: each stand-in
(``diffusers_flow_standin``) trains on the plan's sigma, noise, noisy input, weights and loss, and
its caption rows follow the plan's dropout decisions; a plan replayed from the same preset and
seed must give every recorded value. The scripts' own draws (``u`` from their density on a
descending table, inline ``randn_like``, a plain MSE) would not match, so each comparison can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdplug.hosts.diffusers_scripts import edits, flow_edits
from sdplug.hosts.diffusers_scripts.flow_session import MODEL_PATCH, TEXT_ENCODERS
from sdplug.plan import bind
from sdplug.preset import load_preset
from sdplug.process import Flow, flow_sigmas
from tests.hosts.diffusers_flow_standin import make_flow_standin, standin_source

ROOT = Path(__file__).resolve().parents[2]
BATCH = 4
STEPS = 3
FLOW_PRESET = """
[[noise]]
type = "pyramid"
discount = 0.8

[timesteps]
type = "logit_normal"
mean = 0.0
std = 1.0

[schedule]
dynamic_shift = true
base_seq_len = 4
max_seq_len = 64

[loss]
type = "pseudo_huber"
c = 0.1
schedule = "snr"

[loss_weighting]
type = "min_snr"
gamma = 5.0

[optimizer]
type = "adamw"
lr = 1e-3
"""
TWO_ENCODERS = """
[[caption]]
type = "dropout"
rate = 0.4
encoders = ["clip_l"]

[[caption]]
type = "dropout"
rate = 0.4
encoders = ["t5xxl"]
"""
WHOLE = """
[[caption]]
type = "dropout"
rate = 0.4
"""
CAPTIONS = {script: WHOLE for script in flow_edits.FLOW_SCRIPTS} | {flow_edits.FLUX: TWO_ENCODERS, flow_edits.SD3: TWO_ENCODERS}


def run_standin(tmp_path: Path, script: str, preset_text: str, *script_args: str, expect: int = 0) -> subprocess.CompletedProcess:
    path = make_flow_standin(tmp_path / "tree", script)
    preset = tmp_path / "p.toml"
    preset.write_text(preset_text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "diffusers", "--preset", str(preset), "--", str(path)]
    command += ["--output_dir", str(tmp_path / "out"), "--seed", "0", "--max_train_steps", str(STEPS)]
    command += ["--train_batch_size", str(BATCH), *script_args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def replay_plan(preset_path: Path, script: str, *, precondition: bool = True):
    reversed_ = script == flow_edits.LUMINA2
    output = "sigma_scaled" if script == flow_edits.SD3 and precondition else "raw"
    # the dynamic shift counts the model's own tokens: FLUX.2's packed latents are 1x1 patches
    process = Flow(
        flow_sigmas(1000), "velocity_reversed" if reversed_ else "velocity", output=output, patch_size=MODEL_PATCH[script]
    )
    return bind(load_preset(preset_path), process=process, seed=0, rank=0, text_encoders=TEXT_ENCODERS[script])


def check_steps(record: dict, plan, script: str, *, prior_weight: float | None = None) -> list:
    """Every recorded step against the plan's draws; returns the caption decisions."""
    decisions = []
    for step in record["steps"]:
        latents = step["latents"]
        frames = latents.squeeze(2) if latents.dim() == 5 else latents
        timesteps = plan.timesteps(len(latents), latent_size=tuple(frames.shape[-2:]))
        draw = plan.noise(frames, timesteps=timesteps)
        torch.testing.assert_close(step["noise"], draw.target.view_as(latents))
        model_time = plan.model_time(timesteps)
        recorded_time = step["timesteps"] * (1000 if script == flow_edits.LUMINA2 else 1)  # Lumina 2 divides in place
        torch.testing.assert_close(recorded_time, model_time)
        torch.testing.assert_close(step["sigmas"].flatten(), model_time / 1000)
        torch.testing.assert_close(step["noisy"], plan.noisy_input(frames, draw, timesteps).view_as(latents))
        torch.testing.assert_close(step["target"], plan.target(frames, draw, timesteps).view_as(latents))
        if step["text"] is not None and plan.preset.caption:
            decisions.append(check_caption_rows(plan, script, step["text"], len(latents)))
        pred, target = step["pred"], step["target"]
        weights = plan.sample_weights(timesteps)
        if prior_weight is None:
            loss = (plan.unweighted_loss(pred, target, timesteps=timesteps) * weights).mean()
        else:
            half = len(pred) // 2
            loss = (plan.unweighted_loss(pred[:half], target[:half], timesteps=timesteps[:half]) * weights[:half]).mean()
            prior = plan.unweighted_loss(pred[half:], target[half:], timesteps=timesteps[half:]) * weights[half:]
            loss = loss + prior_weight * prior.mean()
        torch.testing.assert_close(step["loss"], loss)
        assert not torch.allclose(step["loss"], torch.nn.functional.mse_loss(pred, target))  # weighted Huber, not MSE
        plan.step()
    return decisions


def check_caption_rows(plan, script: str, text, samples: int) -> list:
    """The rows of a dropped encoder are its encoding of "" (the stand-ins' -1 rows), the others the caption's."""
    draws = [plan.dropped_encoders(TEXT_ENCODERS[script], epoch=0) for _ in range(samples)]
    empty = lambda tensor: bool((tensor == -1).all())  # noqa: E731
    if script == flow_edits.FLUX:
        for name in ("t5xxl", "clip_l"):
            assert [empty(row) for row in text[name]] == [name in draw for draw in draws], name
    elif script == flow_edits.SD3:  # CLIP-L | CLIP-G columns of the 3 CLIP tokens, T5's 5 tokens; pooled 4 | 6
        embeds, pooled = text["embeds"], text["pooled"]
        assert [empty(e[:3, :4]) and empty(p[:4]) for e, p in zip(embeds, pooled, strict=False)] == ["clip_l" in d for d in draws]
        assert [empty(e[:3, 4:]) or empty(p[4:]) for e, p in zip(embeds, pooled, strict=False)] == ["clip_g" in d for d in draws]
        assert [empty(e[3:]) for e in embeds] == ["t5xxl" in d for d in draws]
    elif script in (flow_edits.LUMINA2, flow_edits.QWEN_IMAGE):
        assert [empty(row) for row in text["embeds"]] == [bool(draw) for draw in draws]
        masks = [row.tolist() for row in text["mask"]]
        assert masks == [[1, 0, 0, 0, 0] if drop else [1] * 5 for drop in draws]
    else:  # FLUX.2's rows, Z-Image's list (the empty caption's entry is shorter)
        assert [empty(row) for row in text] == [bool(draw) for draw in draws]
    return draws


@pytest.mark.parametrize("script", flow_edits.FLOW_SCRIPTS)
def test_every_flow_standin_takes_the_real_scripts_patch_exactly(script):
    source = standin_source(script)
    patched = edits.patch_source(source, script)
    compile(patched, script, "exec")
    assert edits.unpatch_source(patched, script) == source
    assert sum(line.endswith(edits.MARK) for line in patched.splitlines()) >= len(edits.EDITS[script]) + 1


@pytest.mark.parametrize(
    "script",
    [flow_edits.FLUX, flow_edits.LUMINA2]
    + [
        pytest.param(s, marks=pytest.mark.slow) for s in flow_edits.FLOW_SCRIPTS if s not in (flow_edits.FLUX, flow_edits.LUMINA2)
    ],
)
def test_flow_script_trains_on_the_plans_draws_weights_and_loss(tmp_path, script):
    preset_text = FLOW_PRESET + CAPTIONS.get(script, "")
    run_standin(tmp_path, script, preset_text)
    record = torch.load(tmp_path / "out" / "standin.pt")
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    plan = replay_plan(tmp_path / "p.toml", script)
    decisions = check_steps(record, plan, script)
    assert audit["problems"] == [] and audit["steps"] == STEPS
    assert record["optimizer"] == "AdamW" and record["lr"] == 1e-3  # the script's lr is 1e-4
    assert audit["schedule"]["process"] == "flow" and audit["schedule"]["shift"] == "dynamic"
    assert audit["schedule"]["dynamic_shift"]["patch_size"] == MODEL_PATCH[script]
    assert audit["schedule"]["prediction_type"] == ("velocity_reversed" if script == flow_edits.LUMINA2 else "velocity")
    assert audit["caption"]["samples"] == STEPS * BATCH
    flat = [name in draw for step in decisions for draw in step for name in TEXT_ENCODERS[script]]
    assert len(decisions) == STEPS and any(flat) and not all(flat)  # some rows swapped, some kept


@pytest.mark.slow
def test_flow_script_with_prior_preservation_weights_each_half(tmp_path):
    run_standin(tmp_path, flow_edits.FLUX, FLOW_PRESET, "--with_prior_preservation", "--prior_loss_weight", "0.5")
    record = torch.load(tmp_path / "out" / "standin.pt")
    check_steps(record, replay_plan(tmp_path / "p.toml", flow_edits.FLUX), flow_edits.FLUX, prior_weight=0.5)


@pytest.mark.slow
def test_sd3_without_preconditioning_trains_on_the_velocity(tmp_path):
    run_standin(tmp_path, flow_edits.SD3, FLOW_PRESET, "--precondition_outputs", "0")
    record = torch.load(tmp_path / "out" / "standin.pt")
    plan = replay_plan(tmp_path / "p.toml", flow_edits.SD3, precondition=False)
    check_steps(record, plan, flow_edits.SD3)
    assert not torch.allclose(record["steps"][0]["target"], record["steps"][0]["latents"])


@pytest.mark.slow
def test_patched_flow_script_without_a_preset_is_the_original(tmp_path):
    """The inserted lines return the script's own values when it runs without --sdplug_preset."""
    script = flow_edits.LUMINA2
    original = make_flow_standin(tmp_path / "a", script)
    patched = make_flow_standin(tmp_path / "b", script)
    patched.write_text(edits.patch_source(patched.read_text(), script))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    records = []
    for path, out in ((original, tmp_path / "oa"), (patched, tmp_path / "ob")):
        command = [sys.executable, str(path), "--output_dir", str(out), "--seed", "0", "--weighting_scheme", "logit_normal"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        records.append(torch.load(out / "standin.pt"))
    for mine, theirs in zip(records[0]["steps"], records[1]["steps"], strict=True):
        for key in ("noise", "timesteps", "noisy", "loss"):
            torch.testing.assert_close(mine[key], theirs[key])


def test_without_timesteps_the_plan_draws_the_scripts_own_density(tmp_path):
    """--weighting_scheme logit_normal --logit_mean 1 on FLUX's descending table is sigma = 1 - u:
    the plan draws it as logit_normal(-1, 1); the realised sigmas sit low, as the script's would."""
    preset = FLOW_PRESET.split("[timesteps]")[0] + "[loss_weighting]" + FLOW_PRESET.split("[loss_weighting]")[1]
    preset = preset.replace("[schedule]\ndynamic_shift = true\nbase_seq_len = 4\nmax_seq_len = 64\n", "")
    run_standin(tmp_path, flow_edits.FLUX, preset, "--weighting_scheme", "logit_normal", "--logit_mean", "1.0")
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["timesteps"]["type"] == "logit_normal (host default)"
    rules = " ".join(audit["host"]["rules"])
    assert "'mean': -1.0" in rules and "shift 1" in rules  # FLUX's dynamic-shifting scheduler trains unshifted
    sigmas = torch.cat([step["sigmas"].flatten() for step in torch.load(tmp_path / "out" / "standin.pt")["steps"]])
    assert sigmas.mean() < 0.45


@pytest.mark.parametrize(
    ("script", "preset_extra", "script_args", "says"),
    [
        (flow_edits.FLUX, "", ["--weighting_scheme", "logit_normal"], "--weighting_scheme 'logit_normal'"),
        pytest.param(flow_edits.FLUX, "", ["--logit_std", "2.0"], "--logit_std", marks=pytest.mark.slow),
        (flow_edits.QWEN_IMAGE, WHOLE, ["--caption_dropout", "0.1"], "--caption_dropout"),
        pytest.param(flow_edits.FLUX2, WHOLE, ["--remote_text_encoder"], "--remote_text_encoder", marks=pytest.mark.slow),
        pytest.param(
            flow_edits.FLUX, CAPTIONS[flow_edits.FLUX], ["--train_text_encoder"], "--train_text_encoder", marks=pytest.mark.slow
        ),
        (flow_edits.LUMINA2, "", ["--with_prior_preservation"], "IndexError"),
        pytest.param(flow_edits.FLUX, '[attention]\ntype = "xformers"\n', [], "no attention switch", marks=pytest.mark.slow),
    ],
)
def test_flow_script_flags_and_sections_it_cannot_apply_are_refused(tmp_path, script, preset_extra, script_args, says):
    done = run_standin(tmp_path, script, FLOW_PRESET + preset_extra, *script_args, expect=1)
    assert says in done.stderr
    assert not (tmp_path / "out" / "standin.pt").exists()


@pytest.mark.slow
def test_flow_weighting_scheme_is_independent_of_a_preset_without_its_section(tmp_path):
    """--weighting_scheme cosmap weights the loss: with a preset naming no [loss_weighting] it
    stands, and the loss is the preset's loss type times the script's cosmap weights."""
    preset = FLOW_PRESET.replace('[loss_weighting]\ntype = "min_snr"\ngamma = 5.0\n', "")
    run_standin(tmp_path, flow_edits.Z_IMAGE, preset, "--weighting_scheme", "cosmap")
    record = torch.load(tmp_path / "out" / "standin.pt")
    plan = replay_plan(tmp_path / "p.toml", flow_edits.Z_IMAGE)
    step = record["steps"][0]
    timesteps = plan.timesteps(BATCH, latent_size=(8, 8))
    sigmas = step["sigmas"].flatten()
    cosmap = 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    loss = (plan.unweighted_loss(step["pred"], step["target"], timesteps=timesteps) * cosmap).mean()
    torch.testing.assert_close(step["loss"], loss)


@pytest.mark.parametrize(
    "script", ["train_dreambooth_lora_sana.py", "train_dreambooth_lora_flux_kontext.py", "train_dreambooth_flux.py"]
)
def test_any_other_flow_script_is_refused_by_name_with_the_supported_list(tmp_path, script):
    from sdplug.hosts.diffusers_scripts import launcher

    path = tmp_path / script
    path.write_text("raise SystemExit('should not run')\n")
    with pytest.raises(edits.DiffusersScriptError) as refused:
        launcher.resolve_script(str(path))
    message = str(refused.value)
    assert message.startswith(f"{script}: the sdplug diffusers host supports")
    assert all(name in message for name in flow_edits.FLOW_SCRIPTS)
