"""The reference trainer on tiny configs: exports, resume, caching, optimizers, audit, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdplug.errors import SdplugError
from sdplug.trainer.config import OptionError, TrainConfig
from sdplug.trainer.data import DataError, find_examples
from sdplug.trainer.loop import Trainer
from sdplug.trainer.models import ModelError, load
from sdplug.trainer.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[2]


def preset_file(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def quick(tmp_path, preset_text, **options):
    defaults = dict(output=tmp_path / "out", steps=4, batch_size=4, samples=False, progress=False)
    defaults.update(options)
    return TrainConfig(preset=preset_file(tmp_path, preset_text), **defaults)


def test_lora_file_is_kohya_format_and_loads_with_diffusers(tmp_path, tiny_sd, small_data):
    from diffusers import StableDiffusionPipeline

    preset = '[[noise]]\ntype = "offset"\n[loss_weighting]\ntype = "min_snr"\n[optimizer]\ntype = "adamw"\nlr = 1e-2\n[memory]\ncache_latents = true\n'
    config = quick(tmp_path, preset, model=tiny_sd, data=small_data, train_text_encoder=True, lora_rank=4, steps=3)
    report = Trainer(config).run()
    assert report["memory"]["cache_latents"] is True
    path = config.output / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert 'type = "min_snr"' in metadata["sdplug_preset"]
    assert (config.output / "preset.toml").read_text() == metadata["sdplug_preset"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)

    def render():
        return pipe(
            "a red circle on a black background",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    before = render()
    pipe.load_lora_weights(str(path))
    unet_layers = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    te_layers = sum(1 for _, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert unet_layers == sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)
    assert te_layers == sum(k.startswith("lora_te_") and k.endswith(".alpha") for k in keys)
    assert not np.allclose(render(), before)


def test_dreambooth_writes_a_model_folder_that_loads_back(tmp_path, small_data):
    class_data = write_dataset(tmp_path / "class", per_combination=1, seed=1)
    config = quick(
        tmp_path,
        '[loss_weighting]\ntype = "snr"\n',
        data=small_data,
        mode="dreambooth",
        class_data=class_data,
        prior_loss_weight=0.5,
        steps=2,
    )
    report = Trainer(config).run()
    # the weighting applied to the instance AND the prior loss: two calls a step
    assert report["loss_weighting"]["calls"] == 4
    reloaded = load(config.output / "model")
    assert reloaded.pixel_space and reloaded.resolution == 32


def run_draws(tmp_path, name, **options):
    preset = '[[noise]]\ntype = "pyramid"\n[[caption]]\ntype = "dropout"\nrate = 0.3\n[timesteps]\ntype = "logit_normal"\n'
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    config = quick(tmp_path / name, preset, record_draws=True, **options)
    trainer = Trainer(config)
    trainer.run()
    return trainer


def test_resume_continues_the_same_random_streams(tmp_path):
    whole = run_draws(tmp_path, "whole", steps=6)
    first = run_draws(tmp_path, "first", steps=6, stop_after=3)
    checkpoint = first.config.output / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed = run_draws(tmp_path, "resumed", steps=6, resume=checkpoint)
    assert [d["step"] for d in resumed.draw_log] == list(range(1, 7))
    for a, b in zip(whole.draw_log, resumed.draw_log, strict=True):
        assert a["indices"] == b["indices"] and a["timesteps"] == b["timesteps"] and a["dropped"] == b["dropped"]
        assert a["noise_sum"] == b["noise_sum"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, p), (_, q) in zip(whole.unet.named_parameters(), resumed.unet.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-6), name
    assert resumed.plan.report()["steps"] == 6


def test_dropout_with_cached_text_embeddings_substitutes_the_empty_caption(tmp_path, small_data):
    preset = '[[caption]]\ntype = "dropout"\nrate = 0.5\n[memory]\ncache_text_encoder_outputs = true\n'
    trainer = Trainer(quick(tmp_path, preset, data=small_data, steps=3))
    captions = [e.caption for e in trainer.examples[:16]]
    cache = trainer.inputs.text_cache
    hidden, dropped = trainer.inputs.text(None, captions, [0] * len(captions), train_text_encoder=False)
    assert any(dropped) and not all(dropped)
    for h, d, c in zip(hidden, dropped, captions, strict=True):
        assert torch.equal(h.cpu(), cache[""] if d else cache[c])
    report = trainer.run()
    caption = report["caption"]
    assert caption["empty_caption_embeddings_substituted"] == caption["dropped"] > 0
    assert report["memory"]["cache_text_encoder_outputs"] is True


@pytest.mark.parametrize("optimizer,low,high", [("adamw", 7.9, 8.1), ("adamw8bit", 1.9, 2.4)])
def test_optimizer_state_bytes_in_the_audit(tmp_path, small_data, optimizer, low, high):
    preset = f'[optimizer]\ntype = "{optimizer}"\n' + ("min_8bit_size = 64\n" if optimizer == "adamw8bit" else "")
    report = Trainer(quick(tmp_path, preset, data=small_data, steps=2, lora_rank=16)).run()
    assert low <= report["optimizer"]["state_bytes_per_trainable_parameter"] <= high


def test_audit_realises_the_configured_dropout_rate(tmp_path, small_data):
    preset = '[[noise]]\ntype = "pyramid"\n[[caption]]\ntype = "dropout"\nrate = 0.3\n[attention]\ntype = "sliced"\n'
    config = quick(tmp_path, preset, data=small_data, steps=6, batch_size=16)
    Trainer(config).run()
    audit = json.loads((config.output / "audit.json").read_text())
    caption = audit["caption"]
    assert caption["samples"] == 6 * 16
    assert caption["dropout_rate_configured"] == pytest.approx(0.3)
    assert caption["dropout_rate_within_interval"]
    assert audit["noise"]["applied"] == [{"type": "pyramid", "calls": 6}]
    assert audit["noise"]["channel_mean_variance_mean"] > 10 * audit["noise"]["gaussian_channel_mean_variance"]
    assert (
        audit["attention"]["processor"] == "SlicedAttnProcessor"
        and audit["attention"]["processor_before"] == "AttnProcessor2_0"  # diffusers' default: SDPA
        and audit["attention"]["changed"] == audit["attention"]["modules"] > 0
    )
    assert sum(audit["timesteps"]["histogram"]) == 6 * 16
    assert (config.output / "loss-per-timestep.png").is_file()


# -- bad input -------------------------------------------------------------------------------
def test_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        find_examples(tmp_path)


def test_missing_caption_and_unreadable_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"1 image\(s\) have no caption file.*a.png"):
        find_examples(tmp_path)
    (tmp_path / "a.txt").write_text("a cat")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("a dog")
    with pytest.raises(DataError, match=r"cannot be read.*b.png"):
        find_examples(tmp_path)


def test_kohya_repeat_folders(tmp_path):
    sub = tmp_path / "3_sks"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "x.png")
    (sub / "x.txt").write_text("sks")
    assert [e.caption for e in find_examples(tmp_path)] == ["sks"] * 3


def test_model_path_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        load(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model file"):
        load(tmp_path / "w.bin")


@pytest.mark.parametrize(
    "preset,options,error,words",
    [
        ("[memory]\nmixed_precision = 'fp16'\n", {}, SdplugError, "needs a CUDA GPU"),
        (
            "[memory]\ncache_text_encoder_outputs = true\n",
            {"train_text_encoder": True},
            OptionError,
            "conflicts with --train-text-encoder",
        ),
        ("", {"class_data": Path(".")}, OptionError, "needs --mode dreambooth"),
        ("", {"stop_after": 9}, OptionError, "--stop-after"),
        ('[attention]\ntype = "xformers"\n', {}, SdplugError, "xformers"),
        ("", {"log_with": "tensorboard"}, SdplugError, "pip install tensorboard"),
    ],
)
def test_conflicting_or_impossible_options_fail_before_training(tmp_path, preset, options, error, words):
    with pytest.raises(error, match=words):
        Trainer(quick(tmp_path, preset, **options)).run()


def test_cli_reports_bad_data_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdplug", "train", "min-snr", "--data", str(tmp_path), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr and "no images found" in result.stderr


def _launch_two_ranks(tmp_path, preset, name, *options):
    out = tmp_path / name
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29400 + len(name))]
    command += ["-m", "sdplug", "train", preset, "--batch-size", "4", "--no-samples", "--no-progress", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *options], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_process_resume_through_save_state_continues_each_ranks_streams(tmp_path):
    """accelerate writes registered objects from the main process only: every rank's plan and
    sampler state must still come back to its own rank."""
    preset = preset_file(tmp_path, '[[noise]]\ntype = "pyramid"\n[[caption]]\ntype = "dropout"\nrate = 0.5\n')
    whole = _launch_two_ranks(tmp_path, preset, "w", "--steps", "4")
    saved = _launch_two_ranks(tmp_path, preset, "saved", "--steps", "4", "--save-every", "2")
    resumed = _launch_two_ranks(tmp_path, preset, "resumed", "--steps", "4", "--resume", str(saved / "checkpoint-2"))
    a, b = (json.loads((out / "audit.json").read_text()) for out in (whole, resumed))
    assert b["steps"] == 4 and b["run"]["processes"] == 2
    # first_draws hold steps 1-3 of each rank: step 3 is drawn after the resume
    assert a["per_rank"] == b["per_rank"]
    assert a["caption"] == b["caption"] and a["timesteps"] == b["timesteps"]


@pytest.mark.slow
@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_two_process_gloo_run_draws_differently_per_rank_and_repeats(tmp_path, process):
    preset = preset_file(tmp_path, '[[noise]]\ntype = "pyramid"\n[[caption]]\ntype = "dropout"\nrate = 0.5\n')
    model = ["--prediction-type", "velocity"] if process == "flow" else []  # the embedded model as a rectified flow
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name):
        out = tmp_path / name
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + len(name)),
            "-m",
            "sdplug",
            "train",
            preset,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--no-samples",
            "--no-progress",
            "--output",
            str(out),
            *model,
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "audit.json").read_text())

    first, again = launch("a"), launch("bb")
    assert first["run"]["processes"] == 2 and first["schedule"]["process"] == process
    ranks = {r["rank"]: r for r in first["per_rank"]}
    assert set(ranks) == {0, 1}
    a, b = ranks[0]["first_draws"], ranks[1]["first_draws"]
    assert [d["noise_sum"] for d in a] != [d["noise_sum"] for d in b]
    assert [d["dropped"] for d in a] != [d["dropped"] for d in b] or [d["indices"] for d in a] != [d["indices"] for d in b]
    assert first["per_rank"] == again["per_rank"]  # a fixed seed repeats exactly


def test_trainer_names_its_own_requirements(monkeypatch):
    import importlib.metadata

    from sdplug.errors import MissingDependencyError
    from sdplug.trainer.requirements import check_trainer_requirements

    real = importlib.metadata.version

    def without_peft(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_peft)
    with pytest.raises(MissingDependencyError, match=r"needs peft>=0.10 \(found none\).*sdplug\[train\]"):
        check_trainer_requirements()


def test_zero_terminal_snr_trains_and_samples_on_the_rescaled_schedule(tmp_path, small_data, monkeypatch):
    from diffusers import DDIMScheduler

    from sdplug.trainer import sampling

    preset = '[schedule]\nzero_terminal_snr = true\n[loss_weighting]\ntype = "min_snr"\n'
    config = quick(tmp_path, preset, data=small_data, steps=2, prediction_type="v_prediction")
    trainer = Trainer(config)
    scheduler = trainer.bundle.scheduler
    assert scheduler.config["rescale_betas_zero_snr"] and float(scheduler.alphas_cumprod[-1]) < 1e-6
    assert trainer.plan.alphas_cumprod[-1] == 0 and trainer.plan.matches_schedule(scheduler.alphas_cumprod)
    seen, real = [], DDIMScheduler.step

    def step(self, prediction, t, x, *args, **kwargs):
        seen.append(int(t))
        return real(self, prediction, t, x, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", step)
    resolution = trainer.bundle.resolution
    with torch.no_grad():
        sampling.sample(
            trainer.bundle, trainer.bundle.unet, torch.randn(1, 3, resolution, resolution), ["a red circle"], 1.0, 4, "cpu"
        )
    assert seen[0] == scheduler.config.num_train_timesteps - 1  # trailing: the first step is pure noise
    monkeypatch.undo()
    report = trainer.run()
    assert report["schedule"]["zero_terminal_snr"] is True and report["schedule"]["alpha_cumprod_last"] == 0.0
    assert report["problems"] == []

    with pytest.raises(SdplugError, match="schedule.zero_terminal_snr"):  # the embedded model predicts epsilon
        Trainer(quick(tmp_path, preset, data=small_data, steps=2, output=tmp_path / "eps"))


def test_a_schedule_free_optimizer_samples_and_saves_its_evaluation_weights(tmp_path, small_data, monkeypatch):
    pytest.importorskip("schedulefree", reason="the schedulefree extra (CI installs it)")
    from PIL import Image

    from sdplug.strategies.optimizer_modes import in_train_mode
    from sdplug.trainer import outputs

    modes = []

    def sample_grid(*args, **kwargs):  # what mode the optimizer is in while the grid is drawn
        modes.append(in_train_mode(trainer.optimizer))
        return {}, Image.new("RGB", (4, 4))

    monkeypatch.setattr(outputs, "sample_grid", sample_grid)
    saved = []
    real_weights = outputs._write_weights
    monkeypatch.setattr(
        outputs, "_write_weights", lambda t, toml: (saved.append(in_train_mode(t.optimizer)), real_weights(t, toml))
    )
    preset = '[optimizer]\ntype = "adamw_schedulefree"\nlr = 1e-3\n'
    trainer = Trainer(quick(tmp_path, preset, data=small_data, steps=2, samples=True, save_every=1))
    trainer.run()
    # before, after: eval mode while sampling; the training steps ran in train mode in between
    assert modes == [False, False] and saved == [False]
    assert trainer.plan.report()["steps"] == 2 and (tmp_path / "out" / "checkpoint-1").is_dir()
