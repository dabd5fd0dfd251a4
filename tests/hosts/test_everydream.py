"""The EveryDream2 plugin against a stand-in EveryDream2 tree (``tests/hosts/everydream_standin.py``).

The stand-in runs in this process (``runpy``, as ``__main__``), so the plugin finds train.py's
``main()`` exactly as in EveryDream2; every run's session is undone afterwards. Set
``SDPLUG_ED2_DIR`` (an EveryDream2 checkout prepared as the README's "Inside EveryDream2" says)
and ``SDPLUG_ED2_PYTHON`` (its venv's python) to also train 2 steps of the real tree.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdplug.hosts.everydream import runtime
from sdplug.hosts.everydream.reconcile import EverydreamConflictError, reconcile
from sdplug.hosts.everydream.version import EverydreamVersionError, detect
from sdplug.preset import load_preset
from tests.hosts.everydream_standin import make_standin

ROOT = Path(__file__).resolve().parents[2]
TREE_MODULES = ("plugins", "data", "optimizer", "standin_models")
EVERY_FAMILY = """
[[noise]]
type = "pyramid"
discount = 0.8

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.4

[optimizer]
type = "adamw"
lr = 1e-3

[attention]
type = "sdpa"
"""


def _purge_tree_modules() -> None:
    # the plugin module too: its Plugin subclasses the BasePlugin of the tree it was imported in
    for name in list(sys.modules):
        if name.split(".")[0] in TREE_MODULES or name == "sdplug.hosts.everydream.plugin":
            del sys.modules[name]


def run_standin(root: Path, monkeypatch, preset_text: str, **train_json) -> tuple[dict, dict]:
    """Train the stand-in with the plugin; (what the closure saw, audit.json)."""
    (root / "preset.toml").write_text(preset_text)
    config = {"plugins": ["sdplug.hosts.everydream.Plugin"], "sdplug_preset": "preset.toml", **train_json}
    (root / "train.json").write_text(json.dumps(config))
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "train.json"])
    _purge_tree_modules()
    try:
        runpy.run_path(str(root / "train.py"), run_name="__main__")
    finally:
        for host in list(runtime.ACTIVE):
            host.session.undo()
        _purge_tree_modules()
    folder = root / "logs" / "myproj-standin"
    record = json.loads((folder / "standin-record.json").read_text()) if (folder / "standin-record.json").exists() else {}
    return record, json.loads((folder / "audit.json").read_text())


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_standin(tmp_path / "ed2")


def snr_of(timesteps: list[int], prediction_type: str = "epsilon") -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)[torch.tensor(timesteps)]
    return alphas / (1 - alphas)


def test_every_family_applies_and_everydream_defaults_are_switched_off(tree, monkeypatch):
    record, audit = run_standin(tree, monkeypatch, EVERY_FAMILY, standin_prediction_type="v_prediction", standin_validate=True)
    assert audit["problems"] == [] and audit["completed"] and audit["steps"] == 3
    # EveryDream2's own versions never ran next to the preset's
    assert record["settings"]["cond_dropout"] == 0.0 and record["settings"]["dataset_cond_dropout"] == 0.0
    assert record["zero_frequency_noise_ratio"] == [0.0, 0.0, 0.0]
    assert record["settings"]["min_snr_gamma"] is None and record["settings"]["pyramid_noise_discount"] is None
    keys = audit["host"]["everydream_keys"]
    assert keys["cond_dropout"] == "switched off" and keys["zero_frequency_noise_ratio"] == "switched off"
    assert any("cond_dropout = 0.04" in rule for rule in audit["host"]["rules"])
    # noise: the plan's pyramid, written into EveryDream2's own noise tensor
    assert audit["noise"]["applied"] == [{"type": "pyramid", "calls": 3}]
    assert audit["noise"]["channel_mean_variance_mean"] > 5 * audit["noise"]["gaussian_channel_mean_variance"]
    # min-SNR in the v-prediction form min(snr, 5) / (snr + 1), through loss_scale
    timesteps = [t for step in record["timesteps"] for t in step]
    snr = snr_of(timesteps)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    seen = torch.tensor([w for step in record["loss_scales"] for w in step], dtype=torch.float64)
    assert torch.allclose(seen, expected, rtol=1e-4)
    assert audit["loss_weighting"]["calls"] == 3 and audit["host"]["prediction_type"] == "v_prediction"
    # caption dropout decided in the training process: the rows that trained are the audit's
    assert audit["caption"]["samples"] == 12 and audit["caption"]["dropped"] == sum(record["dropped"])
    assert 0 < sum(record["dropped"]) < 12
    # optimizer and attention
    assert audit["optimizer"]["strategy"] == "adamw" and audit["optimizer"]["learning_rates"] == [1e-3]
    assert record["optimizer"] == ["torch.optim.adamw.AdamW"] and record["textenc_lr"] == 1e-3
    assert audit["host"]["optimizer_groups"]["groups"] == ["unet", "text_encoder"]
    assert audit["attention"]["changed"] == 8 and record["attn_processors"] == ["AttnProcessor2_0"]
    # validation: fixed draws every pass (1 before training, 1 after each step), never a step
    assert len(record["validation_noise_sums"]) == 4 and len(set(record["validation_noise_sums"])) == 1
    assert len({tuple(t) for t in record["validation_timesteps"]}) == 1
    assert audit["host"]["validation_calls"] == 4 and audit["timesteps"]["draws"] == 12


def test_a_preset_without_a_family_leaves_everydream_its_own(tree, monkeypatch):
    record, audit = run_standin(tree, monkeypatch, '[optimizer]\ntype = "adamw"\n', min_snr_gamma=5)
    assert audit["problems"] == [] and audit["strategies"]["optimizer"] == ["adamw"]
    assert record["settings"]["cond_dropout"] == 0.04 and record["zero_frequency_noise_ratio"] == [0.02] * 3
    # EveryDream2's own min-SNR (the epsilon form) stays, as without sdplug
    snr = snr_of([t for step in record["timesteps"] for t in step])
    seen = torch.tensor([w for step in record["loss_scales"] for w in step], dtype=torch.float64)
    assert torch.allclose(seen, torch.minimum(snr, torch.full_like(snr, 5.0)) / snr, rtol=1e-4)
    # no lr in the preset: each group keeps EveryDream2's lr (optimizer.json: unet 1e-6, text encoder 5e-7)
    assert record["learning_rates"] == [[1e-6, 5e-7]] and record["textenc_lr"] == 5e-7


@pytest.mark.parametrize(
    ("train_json", "preset", "named"),
    [
        ({"pyramid_noise_discount": 0.5}, '[[noise]]\ntype = "offset"\nstrength = 0.1\n', "pyramid_noise_discount = 0.5"),
        ({"cond_dropout": 0.1}, '[[caption]]\ntype = "dropout"\nrate = 0.1\n', "cond_dropout = 0.1"),
        ({"min_snr_gamma": 5}, '[loss_weighting]\ntype = "min_snr"\n', "min_snr_gamma = 5"),
        ({"timestep_start": 100}, '[timesteps]\ntype = "logit_normal"\n', "timestep_start = 100"),
        ({}, '[loss]\ntype = "huber"\n', "[loss] 'huber'"),
        ({}, "[schedule]\nzero_terminal_snr = true\n", "enable_zero_terminal_snr"),
    ],
)
def test_a_trick_set_in_both_or_out_of_reach_is_refused_before_training(tree, monkeypatch, train_json, preset, named):
    with pytest.raises(EverydreamConflictError, match="refus|never applies") as refused:
        run_standin(tree, monkeypatch, preset, **train_json)
    assert named in str(refused.value)
    audit = json.loads((tree / "logs" / "myproj-standin" / "audit.json").read_text())
    assert audit["completed"] is False and audit["steps"] == 0 and named in audit["problems"][0]
    assert audit["host"]["name"] == "EveryDream2"


def test_reconcile_switches_defaults_off_and_carries_the_timestep_range(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[noise]]\ntype = "pyramid"\n\n[[caption]]\ntype = "dropout"\nrate = 0.1\n')
    values = {"cond_dropout": 0.04, "zero_frequency_noise_ratio": 0.02, "timestep_start": 200, "loss_type": "mse_huber"}
    result = reconcile(load_preset(path), values, {})
    assert result.changes == {"cond_dropout": 0.0, "zero_frequency_noise_ratio": 0.0}
    assert result.keys["timestep_start"].startswith("carried") and "loss_type" in result.keys
    with pytest.raises(EverydreamConflictError, match="zero_frequency_noise_ratio = 0.1"):
        reconcile(load_preset(path), {**values, "zero_frequency_noise_ratio": 0.1}, {})
    assert reconcile(load_preset(path), {**values, "cond_dropout": 0.0}, {}).keys["cond_dropout"] == "off"


def test_an_unknown_tree_is_refused_naming_what_is_missing(tree):
    train = tree / "train.py"
    train.write_text(
        train.read_text().replace("noise_scheduler.add_noise(latents, noise, timesteps)", "add(latents, noise, timesteps)")
    )
    with pytest.raises(EverydreamVersionError, match="add_noise") as refused:
        detect(tree)
    assert "train.py" in str(refused.value) and "Nothing was changed" in str(refused.value)
    with pytest.raises(EverydreamVersionError, match="not an EveryDream2 tree"):
        detect(tree / "data")


def test_the_plugin_outside_everydream2_is_refused(monkeypatch):
    from sdplug.hosts.everydream.version import check_runtime

    with pytest.raises(EverydreamVersionError, match="must be built by EveryDream2"):
        check_runtime(None, {}, detect_main())
    with pytest.raises(EverydreamVersionError, match="main\\(\\): noise_scheduler"):
        check_runtime({"args": 1}, {}, detect_main())


def detect_main():
    from sdplug.hosts.everydream.version import KNOWN

    return KNOWN[0]


def test_the_session_undo_restores_everydream(tree, monkeypatch):
    run_standin(tree, monkeypatch, EVERY_FAMILY)
    assert runtime.ACTIVE == []
    monkeypatch.syspath_prepend(str(tree))
    _purge_tree_modules()
    try:
        import optimizer.optimizers as optimizers  # a fresh import: the class as EveryDream2 wrote it

        assert optimizers.EveryDreamOptimizer.create_optimizers.__module__ == "optimizer.optimizers"
    finally:
        _purge_tree_modules()


@pytest.mark.slow
def test_a_crash_writes_an_audit_that_says_so(tree):
    (tree / "preset.toml").write_text(EVERY_FAMILY)
    config = {"plugins": ["sdplug.hosts.everydream.Plugin"], "sdplug_preset": "preset.toml", "standin_crash_at_step": 1}
    (tree / "train.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "train.py", "--config", "train.json"], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    audit = json.loads((tree / "logs" / "myproj-standin" / "audit.json").read_text())
    assert audit["completed"] is False and audit["steps"] == 1
    assert any("stopped at step 1 by RuntimeError" in p for p in audit["problems"])


@pytest.mark.skipif(not os.environ.get("SDPLUG_ED2_DIR"), reason="SDPLUG_ED2_DIR (a prepared EveryDream2 checkout) not set")
def test_real_everydream2_trains_with_the_preset():
    directory = Path(os.environ["SDPLUG_ED2_DIR"])
    python = os.environ.get("SDPLUG_ED2_PYTHON", sys.executable)
    config = os.environ.get("SDPLUG_ED2_CONFIG", "train.json")
    # SDPLUG_ED2_PYTHONPATH: e.g. the folder of a torchvision stub, for the EveryDream2 process only
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.environ.get("SDPLUG_ED2_PYTHONPATH", ""),
    }
    done = subprocess.run(
        [python, "train.py", "--config", config], cwd=directory, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logdir = directory / json.loads((directory / config).read_text()).get("logdir", "logs")  # an absolute logdir wins
    audit = json.loads(max(logdir.glob("*/audit.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert audit["problems"] == [] and audit["steps"] >= 2 and audit["host"]["name"] == "EveryDream2"
    # EveryDream2's own versions of the preset's tricks did not run beside them
    from sdplug.hosts.everydream.flags import KEYS

    keys = audit["host"]["everydream_keys"]
    for key in KEYS:
        if key.off != "keep" and key.sections[0] != "loss" and audit["strategies"].get(key.sections[0]):
            assert keys[key.name] in ("off", "switched off"), (key.name, keys[key.name])


# -- the bridge: sdplug from-everydream / to-everydream ---------------------------------------------
def test_from_everydream_carries_everydream2s_effective_defaults():
    from sdplug.hosts.everydream.bridge import from_everydream
    from sdplug.preset import parse_preset

    bridged = from_everydream({})  # EveryDream2 still drops 4% of captions and adds 0.02 offset noise
    preset = parse_preset(bridged.data, path="train.json")
    assert [s.type for s in preset.noise] == ["offset"] and preset.noise[0].create().strength == 0.02
    assert preset.caption[0].create().rate == 0.04
    assert any("mse_huber" in note for note in bridged.notes)  # its default loss blend: said, not dropped


def test_everydream_keys_round_trip_through_a_preset():
    from sdplug.hosts.everydream.bridge import from_everydream, to_everydream
    from sdplug.preset import parse_preset

    train = {
        "cond_dropout": 0.1,
        "zero_frequency_noise_ratio": 0.05,
        "pyramid_noise_discount": 0.7,
        "timestep_start": 100,
        "timestep_end": 900,
        "min_snr_gamma": 5,
        "loss_type": "mse",
        "attn_type": "xformers",
        "shuffle_tags": True,
        "keep_tags": 1,
        "enable_zero_terminal_snr": True,
        "ema_decay_rate": 0.999,
        "ema_update_interval": 10,
    }
    optimizer = {"base": {"optimizer": "adamw8bit", "lr": 2e-6}}
    preset = parse_preset(from_everydream(train, optimizer=optimizer).data, path="train.json")
    assert preset.noise[1].create().variant == "seed-exact"  # EveryDream2 runs the article's loop as published
    assert preset.optimizer.type == "adamw8bit" and preset.optimizer.create().lr == 2e-6
    back = to_everydream(preset)
    assert {k: back.data[k] for k in train} == {**train, "min_snr_gamma": 5.0}
    assert any("optimizer.json" in note for note in back.notes)


def test_to_everydream_switches_its_defaults_off_when_the_preset_does_not_ask_for_them(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "p.toml").write_text('[loss_weighting]\ntype = "min_snr"\n[[noise]]\ntype = "perlin"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sdplug", "to-everydream", str(tmp_path / "p.toml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    keys = json.loads(result.stdout)
    assert keys["cond_dropout"] == 0.0 and keys["zero_frequency_noise_ratio"] == 0.0 and keys["min_snr_gamma"] == 5.0
    assert "noise 'perlin': EveryDream2 has no equivalent" in result.stderr
    (tmp_path / "train.json").write_text(json.dumps({"cond_dropout": 0.2, "optimizer_config": "opt.json"}))
    (tmp_path / "opt.json").write_text(json.dumps({"base": {"optimizer": "lion8bit", "lr": 1e-5}}))
    back = subprocess.run(
        [sys.executable, "-m", "sdplug", "from-everydream", str(tmp_path / "train.json")], capture_output=True, text=True
    )
    assert back.returncode == 0, back.stderr
    assert 'type = "lion8bit"' in back.stdout and "rate = 0.2" in back.stdout
