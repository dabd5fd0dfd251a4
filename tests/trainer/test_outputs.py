"""What a run shows and writes: banner, progress bar, closing list, plots, atomic outputs, file
modes, help text, and what a failed run leaves behind."""

import contextlib
import io
import json
import logging
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdplug.cli import build_parser, main
from sdplug.log import show_messages
from sdplug.trainer import files, outputs
from sdplug.trainer.config import OptionError, TrainConfig
from sdplug.trainer.loop import train
from sdplug.trainer.plot import loss_curve_plot, loss_per_timestep_plot

PRESET = '[[noise]]\ntype = "pyramid"\n[optimizer]\ntype = "adamw"\nlr = 1e-3\n'


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short LoRA run through train(), with its stdout and stderr, under umask 022."""
    root = tmp_path_factory.mktemp("run")
    (root / "p.toml").write_text(PRESET)
    config = TrainConfig(
        preset=str(root / "p.toml"),
        output=root / "out",
        steps=2,
        batch_size=2,
        sample_prompts=("a red circle on a black background",),
        sample_seeds=(0,),
        guidance_scales=(1.0,),
        sample_steps=2,
        progress=True,
    )
    out, err = io.StringIO(), io.StringIO()
    old = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            report = train(config)
    finally:
        os.umask(old)
    return config, report, out.getvalue(), err.getvalue()


def test_banner_names_preset_model_data_output_device_steps_and_mode(finished):
    config, _, stdout, _ = finished
    banner = stdout.split("\n\n")[0]
    assert banner.startswith("sdplug train: LoRA rank 8, alpha 8, text encoder frozen")
    for words in ("preset   p (", "model    embedded tiny pixel-space model (32x32, epsilon)", "device   cpu"):
        assert words in banner, banner
    assert f"built-in synthetic shapes: 120 images written to {config.output / 'embedded-data'}/" in banner
    assert f"output   {config.output.resolve()}" in banner and "steps    2 x batch 2, seed 0" in banner
    # LoRA on the random-weight embedded model: said at the start (it learns next to nothing)
    assert banner.count("WARNING") == 1 and "WARNING: LoRA on the embedded tiny model, whose weights are random" in banner


def test_progress_bar_shows_one_rate_and_the_loss(finished):
    stderr = finished[3]
    assert "loss=" in stderr and "step/s" in stderr
    assert "steps_per_s" not in stderr


def test_closing_list_names_every_file_written(finished):
    config, report, stdout, _ = finished
    names = ["embedded-data/", "samples-before.png", "preset.toml", "lora.safetensors"]
    names += ["loss-per-timestep.png", "loss-curve.png", "samples-after.png", "audit.json"]
    closing = stdout.split(f"sdplug wrote to {config.output}/:\n")[1].split("\n\nsdplug audit")[0]
    assert [line.split()[0] for line in closing.splitlines()] == names
    assert report["files"] == names and json.loads((config.output / "audit.json").read_text())["files"] == names
    assert sorted(p.name + ("/" if p.is_dir() else "") for p in config.output.iterdir()) == sorted(names)
    assert "embedded-data/         the built-in synthetic shapes trained on (no --data given)" in closing


def test_outputs_follow_the_umask(finished):
    out = finished[0].output
    for name in ("lora.safetensors", "audit.json", "loss-curve.png", "samples-after.png", "preset.toml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_loss_plots_label_their_axes(tmp_path):
    curve = loss_curve_plot(tmp_path / "c.png", [1.0, 0.8, 0.9, 0.5, 0.4], "t")
    bars = loss_per_timestep_plot(tmp_path / "b.png", [0, 500, 1000], [1.0, None], [0.5, None], "t")
    assert curve["ylabel"] == "training loss" and curve["xlabel"] == "step"
    assert bars["ylabel"] == "mean loss per sample" and bars["xlabel"] == "timestep"
    for name in ("c.png", "b.png"):
        pixels = np.asarray(Image.open(tmp_path / name).convert("L"))
        # the y label is the only thing drawn in the leftmost 20 columns
        assert (pixels[:, :20] < 128).sum() > 30, name
    curve_pixels = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    blue = (curve_pixels[..., 2] > 150) & (curve_pixels[..., 0] < 100)
    assert blue.sum() > 100  # the moving-average line


def test_atomic_output_is_whole_or_absent(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), files.atomic(target) as tmp:
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with files.atomic(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_bytes(b"new")
        assert tmp.name == f"model.tmp-{os.getpid()}" and not (target / "new.bin").exists()
    assert [p.name for p in target.iterdir()] == ["new.bin"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_refusal_on_the_command_line_creates_nothing(tmp_path):
    (tmp_path / "p.toml").write_text("[memory]\ncache_text_encoder_outputs = true\n")
    config = TrainConfig(preset=str(tmp_path / "p.toml"), output=tmp_path / "out", train_text_encoder=True, progress=False)
    with pytest.raises(OptionError, match="conflicts with --train-text-encoder"):
        train(config)
    assert not config.output.exists()


def test_failed_run_into_a_new_folder_removes_what_it_made(tmp_path, monkeypatch):
    from sdplug.errors import SdplugError
    from sdplug.trainer.loop import Trainer

    def refuse(self):
        raise SdplugError("the optimizer cannot run here")

    monkeypatch.setattr(Trainer, "_prepare_optimizer", refuse)
    (tmp_path / "p.toml").write_text(PRESET)
    config = TrainConfig(preset=str(tmp_path / "p.toml"), output=tmp_path / "out", progress=False)
    with pytest.raises(SdplugError, match="cannot run here"):
        train(config)
    # it had written embedded-data/ before the refusal: gone; the refusal is in the audit
    assert [p.name for p in config.output.iterdir()] == ["audit.json"]
    audit = json.loads((config.output / "audit.json").read_text())
    assert audit["completed"] is False and audit["steps"] == 0
    assert audit["problems"][0] == "refused before training: the optimizer cannot run here"
    (config.output / "audit.json").unlink()
    # a folder that held something before the run is left as it was
    (config.output / "mine.txt").write_text("keep")
    with pytest.raises(SdplugError):
        train(config)
    assert (config.output / "mine.txt").read_text() == "keep"


def test_failed_run_keeps_checkpoints_and_says_so(tmp_path, capsys):
    from sdplug.trainer.run_folder import RunFolder

    out = tmp_path / "out"
    folder = RunFolder(out).open()
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "embedded-data").mkdir()
    (out / "samples-before.png").write_bytes(b"png")
    (out / "lora.safetensors.tmp-1234").write_bytes(b"half")
    show_messages()  # what train() does: sdplug's messages on stderr
    folder.clean_after_failure()
    # a resume needs the data and keeps the 'before' grid: only the unfinished temporary goes
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "embedded-data", "samples-before.png"]
    assert "the failed run kept in" in capsys.readouterr().err


def test_negative_save_every_is_refused(tmp_path, capsys):
    with pytest.raises(OptionError, match=r"--save-every must be >= 0 .*got -5"):
        TrainConfig(preset="tiny-default", save_every=-5).check()
    assert main(["train", "tiny-default", "--save-every", "-5", "--output", str(tmp_path / "o")]) == 1
    assert "--save-every must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a refusal on the command line creates nothing


def test_sample_prompts_file_and_data_captions(tmp_path):
    from types import SimpleNamespace

    from sdplug.trainer.data import Example

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\nsks dog\n\nsks dog on a beach\n")
    captions = [Example(tmp_path / f"{i}.png", f"caption {i % 6}") for i in range(12)]

    def chosen(**options):
        config = TrainConfig(preset="tiny-default", **options)
        config.check()
        return outputs.sample_prompts(SimpleNamespace(config=config, examples=captions))

    assert chosen(sample_prompts_file=prompts) == (("sks dog", "sks dog on a beach"), str(prompts))
    assert chosen(data=tmp_path)[0] == ("caption 0", "caption 1", "caption 3", "caption 4")
    assert chosen()[1] == "built-in shape prompts"
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(OptionError, match=r"--sample-prompts .*empty.txt: no prompts"):
        chosen(sample_prompts_file=tmp_path / "empty.txt")


def test_train_help_has_help_and_defaults_for_every_option():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    undocumented = [a.option_strings for a in train_parser._actions if not a.help]
    assert undocumented == []
    text = train_parser.format_help()
    for shown in ("(default: 400)", "(default: 16)", "(default: lora)", "(default: output)", "(default: 0)", "(default: 25)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_import_notices_of_unused_parts_are_quieted(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "x")
        logger.warning("a different warning")
    assert [r.getMessage() for r in caplog.records] == ["a different warning"]
    pytest.importorskip("bitsandbytes")
    result = subprocess.run(
        [sys.executable, "-c", "import sdplug, diffusers.pipelines.stable_diffusion, bitsandbytes"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "gemm_4bit" not in result.stderr and "requires torchvision" not in result.stderr


def test_audit_problems_keep_the_trained_weights_and_fail_the_run(tmp_path, monkeypatch):
    """The one problems policy: save everything, list the problems in audit.json, exit non-zero."""
    from sdplug.plan import problems

    monkeypatch.setattr(problems, "strategy_problems", lambda report: ["noise 'offset' ran 1 times in 2 steps"])
    (tmp_path / "p.toml").write_text('[[noise]]\ntype = "offset"\n')
    out = tmp_path / "out"
    code = main(
        [
            "train",
            str(tmp_path / "p.toml"),
            "--output",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--no-samples",
            "--no-progress",
        ]
    )
    assert code == 1
    assert (out / "lora.safetensors").is_file()
    audit = json.loads((out / "audit.json").read_text())
    assert audit["completed"] is True and audit["problems"] == ["noise 'offset' ran 1 times in 2 steps"]
