"""A training run that goes wrong is never mistaken for one that went right, and never damages
what another run left: divergence, refusals beside a finished run, one run per folder, killed
writes, a full disk, a read-only folder, Ctrl-C, checkpoint files and their manifest."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdplug.cli import main
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod
from sdplug.trainer import checkpoint, outputs
from sdplug.trainer.run_folder import LOCK, OutputFolderError, RunFolder

ADAMW = '[optimizer]\ntype = "adamw"\nlr = 1e-3\n'
DIVERGING = '[optimizer]\ntype = "adamw"\nlr = 1.0\n[loss_weighting]\ntype = "max_snr"\ngamma = 10000.0\n'
QUICK = ["--batch-size", "2", "--no-samples", "--no-progress"]


def run(preset_text: str, out: Path, *options: str, tmp: Path) -> int:
    preset = tmp / f"preset-{abs(hash(preset_text))}.toml"
    preset.write_text(preset_text)
    return main(["train", str(preset), "--output", str(out), *QUICK, *options])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step LoRA run with one checkpoint: (its folder, audit.json's bytes)."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "out"
    assert run(ADAMW, out, "--steps", "2", "--save-every", "1", tmp=tmp) == 0
    return out, (out / "audit.json").read_bytes()


# -- a run that diverges ---------------------------------------------------------------------------
def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_a_diverging_run_stops_fails_and_keeps_only_finite_weights(tmp_path, capsys):
    out = tmp_path / "out"
    code = run(DIVERGING, out, "--mode", "dreambooth", "--steps", "20", "--save-every", "1", tmp=tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    audit = json.loads((out / "audit.json").read_text())
    first = audit["divergence"]["first_step"]
    assert 1 < first < 20 and audit["completed"] is False and audit["steps"] < 20
    problem = next(p for p in audit["problems"] if "non-finite" in p and "Likely cause" in p)
    assert f"step {first}" in problem and "lr 1" in problem and "'max_snr'" in problem
    assert f"step {first}" in err and "Likely cause" in err
    assert not (out / "model").exists() and not (out / "lora.safetensors").exists()  # no result written
    kept = checkpoint.complete_checkpoints(out)
    assert kept and all(checkpoint.read_step(k) < first for k in kept)
    assert all(_finite(k / "trainable.safetensors") for k in kept)
    assert f"The newest checkpoint kept is {kept[-1]}" in err


def test_the_watch_sees_weights_go_non_finite_before_the_loss_does():
    """A gradient that breaks the weights (an overflow in the backward pass) while no loss the
    plan saw was non-finite -- no weighting, no loss type: the optimizer the plan built shows it."""
    plan = parse_preset({"optimizer": {"type": "adamw", "lr": 1e-3}}, path="x.toml").build(
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon"
    )
    weight = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2))
    optimizer = plan.optimizer([{"params": [weight]}, {"params": [frozen], "lr": 0.0}])
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    plan.step()
    assert plan.first_nonfinite_step() == 1
    plan = parse_preset({"optimizer": {"type": "adamw", "lr": 1e-3}}, path="x.toml").build(
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon"
    )
    optimizer = plan.optimizer([{"params": [weight]}, {"params": [frozen], "lr": 0.0}])
    with torch.no_grad():
        weight.fill_(1.0)
        frozen.fill_(float("nan"))  # a frozen group is not the run's result: not watched
    weight.grad = torch.ones(3)
    optimizer.step()
    plan.step()
    assert plan.first_nonfinite_step() is None
    weight.grad = torch.tensor([1.0, float("inf"), 1.0])
    optimizer.step()
    plan.step()
    record = plan.report()["divergence"]
    assert record["first_step"] == 2 and record["seen_in"].startswith("the trained weights")


def test_the_watch_does_not_sync_in_the_optimizer_step():
    from tests.core.test_no_sync import syncs_raise_inside

    plan = parse_preset({"optimizer": {"type": "adamw", "lr": 1e-3}}, path="x.toml").build(
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon"
    )
    weight = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    optimizer = plan.optimizer([weight])
    hooks = list(optimizer._optimizer_step_post_hooks.values())
    assert len(hooks) == 1  # the watch (torch's CPU Adam reads its step count itself, so the hook runs alone)
    plan.step = lambda: hooks[0](optimizer, (), {})  # the guard wraps plan.step: the watch runs inside it
    with syncs_raise_inside(plan):
        plan.step()
    assert plan.first_nonfinite_step() == 1  # read outside, where a host syncs anyway


def test_a_host_loss_shown_to_the_plan_is_watched():
    plan = parse_preset({}, path="x.toml").build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    plan.step()  # a host without a watched optimizer counts its step first (kohya, EveryDream2)
    plan.watch_loss(torch.tensor([0.5, 0.7]))
    plan.step()
    plan.watch_loss(torch.tensor([float("inf"), 0.7]))
    report = plan.report()
    assert report["divergence"]["first_step"] == 2 and report["divergence"]["last_finite_loss"] == pytest.approx(0.6)
    assert report["completed"] is False and any("non-finite at step 2" in p for p in report["problems"])


# -- a refusal never replaces another run's record ---------------------------------------------------
def test_a_refused_run_leaves_a_finished_runs_audit_alone(finished, tmp_path, capsys):
    out, audit = finished
    assert main(["train", "no-such-preset", "--output", str(out), *QUICK]) == 1
    assert (out / "audit.json").read_bytes() == audit
    assert not list(out.glob("audit-refused-*.json"))  # refused on the command line: nothing written
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / checkpoint.MANIFEST).write_text("{not json")
    code = run(ADAMW, out, "--steps", "3", "--resume", str(corrupt), tmp=tmp_path)
    assert code == 1 and (out / "audit.json").read_bytes() == audit
    beside = list(out.glob("audit-refused-*.json"))
    assert len(beside) == 1 and json.loads(beside[0].read_text())["problems"][0].startswith("refused before training")
    assert "is another run's record and stays" in capsys.readouterr().err


def test_a_flipped_byte_in_checkpoint_json_is_reported_as_its_corruption(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "checkpoint-1"
    import shutil

    shutil.copytree(out / "checkpoint-1", copy)
    manifest = copy / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"prediction_type"', '"prediction_typf"'))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint.json is corrupt: it does not match its own checksum"):
        checkpoint.read_manifest(copy)


def test_checkpoint_files_follow_the_umask(finished):
    out, _ = finished
    for path in (out / "checkpoint-1").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # readable by group and others under 022


# -- one run per folder ---------------------------------------------------------------------------------
def test_a_second_run_into_a_held_folder_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "then"}))
        assert run(ADAMW, out, "--steps", "2", tmp=tmp_path) == 1
        assert f"in use by another sdplug run (pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock is stale, taken over, and released at the end
    assert run(ADAMW, out, "--steps", "1", tmp=tmp_path) == 0
    assert "a lock left by a run that is gone" in capsys.readouterr().err
    assert not (out / LOCK).exists() and (out / "lora.safetensors").is_file()


def test_what_a_killed_write_left_is_removed_when_the_next_run_takes_the_folder(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-4.partial").mkdir(parents=True)
    (out / "audit.json.partial").write_text("")
    (out / "samples-after.png.tmp-999999").write_bytes(b"")
    (out / "model.old-999999").mkdir()
    (out / "checkpoint-2").mkdir()
    folder = RunFolder(out).open()
    folder.close()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


# -- the output folder --------------------------------------------------------------------------------
def test_output_that_is_a_file_or_read_only_is_refused_before_anything(tmp_path, monkeypatch, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    assert run(ADAMW, target, "--steps", "1", tmp=tmp_path) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err and target.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert run(ADAMW, locked, "--steps", "1", tmp=tmp_path) == 1
    assert "is not writable" in capsys.readouterr().err and list(locked.iterdir()) == []
    assert run(ADAMW, locked / "sub", "--steps", "1", tmp=tmp_path) == 1
    assert f"its parent {locked} is not writable" in capsys.readouterr().err


def test_a_failure_never_removes_a_folder_the_run_did_not_create(tmp_path, monkeypatch):
    from sdplug.errors import SdplugError
    from sdplug.trainer.loop import Trainer

    def fail(self):
        raise SdplugError("stop")

    monkeypatch.setattr(Trainer, "_prepare_optimizer", fail)
    mine = tmp_path / "mine"
    mine.mkdir()
    assert run(ADAMW, mine, "--steps", "1", tmp=tmp_path) == 1
    assert mine.is_dir() and [p.name for p in mine.iterdir()] == ["audit.json"]


@pytest.mark.parametrize(
    "option,value,words", [("--lora-alpha", "-4", "--lora-alpha must be a number > 0"), ("--seed", "-1", "--seed must be")]
)
def test_negative_alpha_and_seed_are_refused(tmp_path, capsys, option, value, words):
    assert run(ADAMW, tmp_path / "out", option, value, tmp=tmp_path) == 1
    assert words in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_command_line_mistakes_are_reported_before_diffusers_loads(tmp_path):
    code = (
        "import sys; from sdplug.cli import main; "
        f"rc = main(['train', 'tiny-default', '--steps', '0', '--output', {str(tmp_path / 'o')!r}]); "
        "print('diffusers' in sys.modules, rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "1"], done.stderr
    assert "--steps must be >= 1" in done.stderr and not (tmp_path / "o").exists()


# -- a full disk -------------------------------------------------------------------------------------
def test_a_disk_too_small_for_the_final_outputs_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    assert run(ADAMW, tmp_path / "out", "--steps", "2", tmp=tmp_path) == 1
    err = capsys.readouterr().err
    assert "MiB free, and the final outputs need about" in err and "(before training)" in err
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["steps"] == 0


def test_a_final_write_that_fails_keeps_the_newest_checkpoint_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from sdplug.trainer import lora

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(lora, "save_kohya_lora", full)
    out = tmp_path / "out"
    assert run(ADAMW, out, "--steps", "3", "--save-every", "2", tmp=tmp_path) == 1
    err = capsys.readouterr().err
    assert "writing the final outputs" in err and "No space left on device" in err and "Traceback" not in err
    assert f"The newest checkpoint kept is {out / 'checkpoint-2'} (step 2)" in err
    assert (out / "checkpoint-2" / checkpoint.MANIFEST).is_file() and not list(out.glob("*.tmp-*"))


def test_a_checkpoint_write_that_fails_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from sdplug.trainer import resume

    real = resume.save_run
    calls = []

    def second_fails(trainer, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")
        real(trainer, directory)

    monkeypatch.setattr(resume, "save_run", second_fails)
    out = tmp_path / "out"
    assert run(ADAMW, out, "--steps", "4", "--save-every", "1", tmp=tmp_path) == 1
    err = capsys.readouterr().err
    assert "writing checkpoint-2 failed (RuntimeError: [enforce fail" in err and "Traceback" not in err
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "checkpoint-2.partial").exists()


# -- Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_and_keeps_what_a_resume_needs(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "p.toml").write_text(ADAMW)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a black background\n")
    script = (
        "import sys\n"
        "from sdplug.cli import main\n"
        "from sdplug.trainer import loop\n"
        "real = loop.Trainer.train_step\n"
        "def step(self):\n"
        "    if self.step == 3: raise KeyboardInterrupt\n"
        "    return real(self)\n"
        "loop.Trainer.train_step = step\n"
        f"sys.exit(main(['train', {str(tmp_path / 'p.toml')!r}, '--output', {str(out)!r}, '--steps', '6', '--save-every', '2',"
        f" '--batch-size', '2', '--sample-steps', '1', '--sample-prompts', {str(prompts)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr.replace("by KeyboardInterrupt", "")
    assert "sdplug train: interrupted." in done.stderr
    kept = next(line for line in done.stderr.splitlines() if "the failed run kept in" in line)
    assert kept.startswith("the failed run kept in") or kept.startswith("sdplug")  # a line of its own, not after the bar
    assert (out / "samples-before.png").is_file() and (out / "checkpoint-2").is_dir()
    audit = json.loads((out / "audit.json").read_text())
    assert audit["completed"] is False and "KeyboardInterrupt" in audit["problems"][0]
    assert not (out / LOCK).exists()
    started = time.monotonic()
    assert main(["train", str(tmp_path / "p.toml"), "--output", str(out), "--steps", "6", "--resume", "latest", *QUICK]) == 0
    assert time.monotonic() - started < 120


# -- the main job's preset with the extras the README names -------------------------------------------
def test_tiny_default_trains_without_bitsandbytes_on_its_named_fallback(monkeypatch):
    """`pip install sdplug[train]` alone has no bitsandbytes: the main job's preset still builds,
    on plain AdamW, with a warning that says so and names what does not carry over."""
    from sdplug.errors import MissingDependencyError
    from sdplug.preset import load_preset
    from sdplug.strategies.optimizer import AdamW8bit

    def missing(self):
        raise MissingDependencyError("optimizer 'adamw8bit' needs the package 'bitsandbytes'.")

    monkeypatch.setattr(AdamW8bit, "check_available", missing)
    with pytest.warns(UserWarning, match=r"fallback 'adamw' .*without min_8bit_size, which only 'adamw8bit' takes"):
        plan = load_preset("tiny-default").build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    optimizer = plan.optimizer([torch.nn.Parameter(torch.ones(2))])
    assert type(optimizer).__name__ == "AdamW" and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert plan.report()["optimizer"]["fell_back"] is True


def test_help_and_readme_say_the_same_of_a_single_file_model():
    """One truth: a single-file checkpoint loads only where diffusers finds its configs offline."""
    from sdplug.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    (model,) = [a for a in train._actions if "--model" in a.option_strings]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for text in (model.help, readme[readme.index("- `--model`") :][:600]):
        assert "single-file" in text and "offline" in text and "convert" in text, text


def test_a_lock_being_written_by_a_run_starting_now_is_not_taken_as_stale(tmp_path):
    """Between creating the lock and writing its pid, another run sees an empty lock: a young one
    is held, never removed; an old unreadable one is stale."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("")
    with pytest.raises(OutputFolderError, match="in use by another sdplug run"):
        RunFolder(out).open()
    assert (out / LOCK).exists()
    os.utime(out / LOCK, (time.time() - 3600, time.time() - 3600))
    RunFolder(out).open().close()
    assert not (out / LOCK).exists()
