"""One preset, one seed: the same draws in every host.

The reference trainer, the kohya adapter (stand-in trees of both layouts), EveryDream2 and
diffusers' text-to-image script (stand-ins) train the same
preset -- noise, timesteps, loss weighting and caption families all at once -- from the same
seed on latents of one shape, and must draw identical noise (checksums), timesteps, caption
dropout decisions and per-timestep weights for every step. The plan owns the random streams
(``sdplug.plan.streams``), so nothing else can make them agree.

diffusers' scripts tokenize captions in their data pipeline, so the host refuses caption
transforms other than dropout: its case runs the preset with the dropout alone (``DROPOUT_ONLY``),
as does the trainer it is compared with.

Not in the preset: immiscible noise, whose assignment depends on the latents' values, which
two hosts with different data pipelines never share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdplug.trainer.config import TrainConfig
from sdplug.trainer.loop import Trainer
from tests.hosts.diffusers_standin import make_standin as make_diffusers_standin
from tests.hosts.everydream_standin import make_standin as make_everydream_standin
from tests.hosts.kohya_standin import make_standin

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 3, 4
PRESET = """
[[noise]]
type = "offset"
strength = 0.1

[[noise]]
type = "pyramid"
discount = 0.8

[[noise]]
type = "generalized_offset"
strength = 0.1

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
rate = 0.4

[[caption]]
type = "shuffle"
keep_tokens = 1

[[caption]]
type = "tag_dropout"
rate = 0.3
keep_tokens = 1

[optimizer]
type = "adamw"
lr = 1e-3
"""
DROPOUT_ONLY = PRESET[: PRESET.index('[[caption]]\ntype = "shuffle"')] + PRESET[PRESET.index("[optimizer]") :]


def trainer_draws(tmp_path, tiny_sd, preset) -> tuple[list[dict], dict]:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):  # captions of four tags, as the stand-in's: caption transforms draw per tag
        Image.new("RGB", (16, 16), (30 * i, 100, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"sks cat, picture {i}, sofa, evening")
    config = TrainConfig(
        preset=str(preset),
        model=tiny_sd,
        data=data,
        resolution=16,  # the tiny VAE halves it: 4 x 8 x 8 latents, the stand-in's shape
        output=tmp_path / "trainer",
        steps=STEPS,
        batch_size=BATCH,
        seed=0,
        samples=False,
        progress=False,
        record_draws=True,
    )
    trainer = Trainer(config)
    report = trainer.run()
    return trainer.draw_log, report


def kohya_draws(tmp_path, version, preset) -> tuple[dict, dict]:
    root = make_standin(tmp_path / f"sd-{version}", version)
    out = tmp_path / f"kohya-{version}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "kohya", "--preset", str(preset), "--sd-scripts", str(root), "--"]
    command += ["train_network.py", "--output_dir", str(out), "--max_train_steps", str(STEPS)]
    command += ["--train_batch_size", str(BATCH), "--seed", "0"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "standin-record.json").read_text()), json.loads((out / "audit.json").read_text())


@pytest.mark.parametrize("version", ["main", "v0.8.7"])
def test_trainer_and_kohya_draw_the_same_for_one_preset_and_seed(tmp_path, tiny_sd, version):
    preset = tmp_path / "every-family.toml"
    preset.write_text(PRESET)
    draws, trainer_report = trainer_draws(tmp_path, tiny_sd, preset)
    record, kohya_report = kohya_draws(tmp_path, version, preset)

    assert [d["noise_sum"] for d in draws] == pytest.approx(record["noise_sums"], rel=1e-6, abs=1e-6)
    assert [d["timesteps"] for d in draws] == record["timesteps"]
    dropped = [c == "" for c in record["captions"]]
    assert [flag for d in draws for flag in d["dropped"]] == dropped
    assert any(dropped) and not all(dropped)  # the comparison can fail both ways
    for report in (trainer_report, kohya_report):
        assert report["steps"] == STEPS and report["caption"]["samples"] == STEPS * BATCH
    weights = [r["loss_weighting"]["mean_weight_per_timestep_bin"] for r in (trainer_report, kohya_report)]
    assert [w is None for w in weights[0]] == [w is None for w in weights[1]]
    assert [w for w in weights[0] if w is not None] == pytest.approx([w for w in weights[1] if w is not None], rel=1e-6)
    tags = [r["caption"]["tag_dropout"][0] for r in (trainer_report, kohya_report)]
    assert tags[0]["tags_droppable"] == tags[1]["tags_droppable"] and tags[0]["tags_dropped"] == tags[1]["tags_dropped"]


def everydream_draws(tmp_path, preset) -> tuple[dict, dict]:
    root = make_everydream_standin(tmp_path / "everydream2")
    config = {"plugins": ["sdplug.hosts.everydream.Plugin"], "sdplug_preset": str(preset), "seed": 0}
    (root / "train.json").write_text(json.dumps({**config, "batch_size": BATCH, "standin_max_steps": STEPS}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train.py", "--config", "train.json"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = root / "logs" / "myproj-standin"
    return json.loads((folder / "standin-record.json").read_text()), json.loads((folder / "audit.json").read_text())


def test_trainer_and_everydream_draw_the_same_for_one_preset_and_seed(tmp_path, tiny_sd):
    preset = tmp_path / "every-family.toml"
    preset.write_text(PRESET)
    draws, trainer_report = trainer_draws(tmp_path, tiny_sd, preset)
    record, everydream_report = everydream_draws(tmp_path, preset)

    assert [d["noise_sum"] for d in draws] == pytest.approx(record["noise_sums"], rel=1e-6, abs=1e-6)
    assert [d["timesteps"] for d in draws] == record["timesteps"]
    assert [flag for d in draws for flag in d["dropped"]] == record["dropped"]
    assert any(record["dropped"]) and not all(record["dropped"])
    assert everydream_report["steps"] == STEPS and everydream_report["caption"]["samples"] == STEPS * BATCH
    weights = [r["loss_weighting"]["mean_weight_per_timestep_bin"] for r in (trainer_report, everydream_report)]
    assert [w is None for w in weights[0]] == [w is None for w in weights[1]]
    assert [w for w in weights[0] if w is not None] == pytest.approx([w for w in weights[1] if w is not None], rel=1e-6)
    tags = [r["caption"]["tag_dropout"][0] for r in (trainer_report, everydream_report)]
    assert tags[0]["tags_droppable"] == tags[1]["tags_droppable"] and tags[0]["tags_dropped"] == tags[1]["tags_dropped"]


def diffusers_draws(tmp_path, preset) -> tuple[dict, dict]:
    script = make_diffusers_standin(tmp_path / "diffusers")
    out = tmp_path / "diffusers-out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "diffusers", "--preset", str(preset), "--", str(script), "--output_dir", str(out)]
    command += ["--max_train_steps", str(STEPS), "--train_batch_size", str(BATCH), "--seed", "0", "--prediction_type", "epsilon"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out / "standin.pt")
    record = {
        "noise_sums": [float(s["noise"].double().sum()) for s in saved["steps"]],
        "timesteps": [s["timesteps"].tolist() for s in saved["steps"]],
        "dropped": [
            bool((row == torch.tensor([1, 0, 0, 0])).all()) for s in saved["steps"] for row in s["ids"]
        ],  # the empty caption's tokens
    }
    return record, json.loads((out / "audit.json").read_text())


def test_trainer_and_diffusers_draw_the_same_for_one_preset_and_seed(tmp_path, tiny_sd):
    preset = tmp_path / "dropout-only.toml"
    preset.write_text(DROPOUT_ONLY)
    assert "shuffle" not in DROPOUT_ONLY and "[optimizer]" in DROPOUT_ONLY and 'type = "dropout"' in DROPOUT_ONLY
    draws, trainer_report = trainer_draws(tmp_path, tiny_sd, preset)
    record, diffusers_report = diffusers_draws(tmp_path, preset)

    assert [d["noise_sum"] for d in draws] == pytest.approx(record["noise_sums"], rel=1e-6, abs=1e-6)
    assert [d["timesteps"] for d in draws] == record["timesteps"]
    assert [flag for d in draws for flag in d["dropped"]] == record["dropped"]
    assert any(record["dropped"]) and not all(record["dropped"])
    assert diffusers_report["problems"] == [] and diffusers_report["steps"] == STEPS
    assert diffusers_report["caption"]["samples"] == STEPS * BATCH
    weights = [r["loss_weighting"]["mean_weight_per_timestep_bin"] for r in (trainer_report, diffusers_report)]
    assert [w is None for w in weights[0]] == [w is None for w in weights[1]]
    assert [w for w in weights[0] if w is not None] == pytest.approx([w for w in weights[1] if w is not None], rel=1e-6)


# the same preset on a flow model, less generalized offset (DDPM's alphas_cumprod scales it)
_GENERALIZED = '[[noise]]\ntype = "generalized_offset"\nstrength = 0.1\n\n'
FLOW_PRESET = DROPOUT_ONLY.replace(_GENERALIZED, "")


def test_the_trainer_and_your_own_loop_draw_the_same_on_a_flow_model(tmp_path):
    """One flow preset and seed: the reference trainer (the embedded model as a rectified flow)
    and a loop of one's own over the same plan calls draw the same sigmas, noise and dropout."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import sdplug

    preset = tmp_path / "flow.toml"
    preset.write_text(FLOW_PRESET)
    options = dict(output=tmp_path / "trainer", steps=STEPS, batch_size=BATCH, seed=0, record_draws=True)
    trainer = Trainer(TrainConfig(preset=str(preset), samples=False, progress=False, prediction_type="velocity", **options))
    trainer.run()
    captions = [example.caption for example in trainer.examples]

    plan = sdplug.load_preset(preset).build(FlowMatchEulerDiscreteScheduler(shift=1.0), seed=0, rank=0)
    assert plan.process.same_as(trainer.plan.process)
    for draw in trainer.draw_log:
        dropped = [plan.caption(captions[i]).dropped for i in draw["indices"]]
        t = plan.timesteps(BATCH)
        noise = plan.noise(torch.zeros(BATCH, 3, 32, 32), timesteps=t)
        plan.step()
        assert t.tolist() == draw["timesteps"]
        assert dropped == draw["dropped"]
        assert float(noise.target.double().sum()) == pytest.approx(draw["noise_sum"], rel=1e-9)
    assert trainer.plan.report()["schedule"] == plan.report()["schedule"]


# every flow host at once: FLUX's resolution-dependent shift, logit-normal positions, min-SNR in
# its velocity form, pyramid noise with input perturbation, and one dropout per text encoder.
# Hosts with one text encoder (the trainer, Lumina 2) take the same two dropouts unnamed: the same
# two decisions per sample, drawn from the same stream, then dropping the caption when either
# drops (so a sample there is dropped exactly when CLIP-L or T5-XXL is dropped elsewhere).
FLOW_HOSTS_PRESET = """
[[noise]]
type = "pyramid"
discount = 0.8

[[noise]]
type = "input_perturbation"
gamma = 0.1

[timesteps]
type = "logit_normal"

[schedule]
dynamic_shift = true

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.3
encoders = ["clip_l"]

[[caption]]
type = "dropout"
rate = 0.3
encoders = ["t5xxl"]

[optimizer]
type = "adamw"
lr = 1e-3
"""
LATENTS = (3, 32, 32)  # the trainer's embedded model's: every stand-in draws on this shape


def _flow_host_run(tmp_path, command, name, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"


def test_every_flow_host_draws_the_same_for_one_preset_and_seed(tmp_path):
    """The reference trainer on its embedded flow model, kohya's FLUX and SD3 scripts (cached
    text-encoder outputs) and diffusers' FLUX and Lumina 2 scripts (stand-ins): for every step, the
    same sigma, noise checksum, per-encoder dropout decisions and per-sample weights; Lumina 2's
    reversed convention gives its data fraction, 1 - sigma."""
    from tests.hosts.diffusers_flow_standin import make_flow_standin
    from tests.hosts.kohya_flow_standin import make_flow_scripts

    named = tmp_path / "named.toml"
    named.write_text(FLOW_HOSTS_PRESET)
    unnamed = tmp_path / "unnamed.toml"
    unnamed.write_text(FLOW_HOSTS_PRESET.replace('encoders = ["clip_l"]\n', "").replace('encoders = ["t5xxl"]\n', ""))

    # the trainer
    options = dict(output=tmp_path / "trainer", steps=STEPS, batch_size=BATCH, seed=0, record_draws=True)
    trainer = Trainer(TrainConfig(preset=str(unnamed), samples=False, progress=False, prediction_type="velocity", **options))
    trainer_report = trainer.run()
    sigmas_table = trainer.plan.process.sigmas
    hosts: dict[str, dict] = {
        "trainer": {
            "sigma": [[float(sigmas_table[t]) for t in d["timesteps"]] for d in trainer.draw_log],
            "noise": [d["noise_sum"] for d in trainer.draw_log],
            "dropped": [flag for d in trainer.draw_log for flag in d["dropped"]],
            "report": trainer_report,
        }
    }

    # kohya's FLUX and SD3 scripts, cached text-encoder outputs
    tree = make_flow_scripts(make_standin(tmp_path / "sd", "main"))
    for script in ("flux_train_network.py", "sd3_train_network.py"):
        out = tmp_path / script
        command = [sys.executable, "-m", "sdplug", "kohya", "--preset", str(named), "--sd-scripts", str(tree), "--"]
        command += [script, "--output_dir", str(out), "--max_train_steps", str(STEPS), "--train_batch_size", str(BATCH)]
        command += ["--seed", "0", "--cache_text_encoder_outputs"]
        _flow_host_run(tmp_path, command, script, {"SDPLUG_STANDIN_LATENTS": ",".join(map(str, LATENTS))})
        record = json.loads((out / "standin-record.json").read_text())
        seen = [json.loads(line) for line in (out / "flow-encoders.jsonl").read_text().splitlines()]
        hosts[f"kohya {script}"] = {
            "sigma": [[t / 1000 for t in step] for step in record["timesteps"]],
            "noise": record["noise_sums"],
            "encoders": {name: [f for step in seen for f in step[name]] for name in ("clip_l", "t5xxl")},
            "report": json.loads((out / "audit.json").read_text()),
        }

    # diffusers' FLUX and Lumina 2 scripts
    for script, preset in (("train_dreambooth_lora_flux.py", named), ("train_dreambooth_lora_lumina2.py", unnamed)):
        path = make_flow_standin(tmp_path / "diffusers", script)
        out = tmp_path / script
        command = [sys.executable, "-m", "sdplug", "diffusers", "--preset", str(preset), "--", str(path)]
        command += ["--output_dir", str(out), "--seed", "0", "--max_train_steps", str(STEPS), "--train_batch_size", str(BATCH)]
        command += ["--latent_channels", str(LATENTS[0]), "--height", str(LATENTS[1]), "--width", str(LATENTS[2])]
        _flow_host_run(tmp_path, command, script)
        steps = torch.load(out / "standin.pt")["steps"]
        reversed_ = script.endswith("lumina2.py")
        host = {
            "sigma": [((1 - s["sigmas"]) if reversed_ else s["sigmas"]).flatten().tolist() for s in steps],
            "noise": [float(s["noise"].double().sum()) for s in steps],
            "report": json.loads((out / "audit.json").read_text()),
        }
        if reversed_:
            host["dropped"] = [bool((row == -1).all()) for s in steps for row in s["text"]["embeds"]]
        else:
            host["encoders"] = {
                name: [bool((row == -1).all()) for s in steps for row in s["text"][name]] for name in ("clip_l", "t5xxl")
            }
        hosts[f"diffusers {script}"] = host

    reference = hosts["trainer"]
    assert any(reference["dropped"]) and not all(reference["dropped"])
    weights = reference["report"]["loss_weighting"]["mean_weight_per_timestep_bin"]
    for name, host in hosts.items():
        assert len(host["sigma"]) == STEPS, name
        flat = [s for step in host["sigma"] for s in step]
        assert flat == pytest.approx([s for step in reference["sigma"] for s in step], abs=1e-6), name
        assert host["noise"] == pytest.approx(reference["noise"], rel=1e-6, abs=1e-6), name
        if "encoders" in host:  # two encoders: the caption is dropped elsewhere when either is
            either = [a or b for a, b in zip(host["encoders"]["clip_l"], host["encoders"]["t5xxl"], strict=True)]
            assert either == reference["dropped"], name
            assert host["encoders"]["clip_l"] != host["encoders"]["t5xxl"], name
        else:
            assert host["dropped"] == reference["dropped"], name
        report = host["report"]
        assert report["problems"] == [] and report["steps"] == STEPS, name
        theirs = report["loss_weighting"]["mean_weight_per_timestep_bin"]
        expected = weights
        if "sd3" in name:  # SD3's loss is on its preconditioned x0: the same weighting, in x0 space
            expected = _x0_weights(named, LATENTS[1:])
            assert expected != weights
        assert [w is None for w in theirs] == [w is None for w in expected], name
        assert [w for w in theirs if w is not None] == pytest.approx([w for w in expected if w is not None], rel=1e-6), name


def _x0_weights(preset, latent_size) -> list:
    """The preset's weights per timestep bin, drawn as every host draws, in x0 space (SD3's
    sigma_scaled output)."""
    from sdplug import load_preset
    from sdplug.process import Flow, flow_sigmas

    process = Flow(flow_sigmas(1000), output="sigma_scaled")  # the preset's [schedule] shifts it
    plan = load_preset(preset).build(process=process, seed=0, rank=0, text_encoders=("clip_l", "clip_g", "t5xxl"))
    for _ in range(STEPS):
        plan.step()
        plan.sample_weights(plan.timesteps(BATCH, latent_size=tuple(latent_size)))
    return plan.report()["loss_weighting"]["mean_weight_per_timestep_bin"]
