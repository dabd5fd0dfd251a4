"""``sdplug patch everydream``: the preset's ``[loss]`` inside EveryDream2's closure, on the stand-in.

The patch is written from the stand-in's own train.py by the same tool that writes the shipped
patch from EveryDream2 main (``tests/hosts/make_everydream_patches.py``); the round trip on the real
tree is in the README's EveryDream2 recipe (``tests/real_hosts/everydream/rebuild.sh``).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from sdplug.hosts.everydream import patching, runtime
from sdplug.hosts.everydream.step_hooks import StepHooks
from sdplug.hosts.everydream.version import EverydreamVersionError
from sdplug.hosts.patch_files import PatchError
from tests.hosts.everydream_standin import make_standin
from tests.hosts.make_everydream_patches import make_patches
from tests.hosts.test_everydream import _purge_tree_modules, snr_of

LOSS_PRESET = """
[loss]
type = "pseudo_huber"
c = 0.1
schedule = "snr"

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.4
"""


@pytest.fixture
def patched_tree(tmp_path, monkeypatch) -> Path:
    root = make_standin(tmp_path / "ed2")
    patches = tmp_path / "patches"
    (patches / "manifest.json").parent.mkdir(parents=True, exist_ok=True)
    (patches / "manifest.json").write_text(json.dumps({"main": make_patches(root, "main", patches)}))
    monkeypatch.setattr(patching, "patches_dir", lambda: patches)
    return root


def train(root: Path, monkeypatch, *argv: str, **train_json) -> dict:
    """Run the stand-in's train.py as ``__main__`` with train.json and ``argv``; its record."""
    (root / "train.json").write_text(json.dumps(train_json))
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "train.json", *argv])
    _purge_tree_modules()
    try:
        runpy.run_path(str(root / "train.py"), run_name="__main__")
    finally:
        for host in list(runtime.ACTIVE):
            host.session.undo()
        _purge_tree_modules()
    return json.loads((root / "logs" / "myproj-standin" / "standin-record.json").read_text())


def expected_loss(model_pred, target, timesteps, loss_scale) -> torch.Tensor:
    """Pseudo-Huber with the snr schedule, min-SNR in its v-prediction form, times loss_scale."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)[timesteps]
    sigma = ((1 - alphas) / alphas).sqrt()
    c = ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).view(-1, 1, 1, 1)
    d = model_pred.double() - target.double()
    per_sample = (2 * c * ((d**2 + c**2).sqrt() - c)).mean(dim=(1, 2, 3))
    snr = snr_of(timesteps.tolist())
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    return (per_sample * weights * torch.as_tensor(loss_scale, dtype=torch.float64)).mean()


def test_the_patched_closure_returns_the_presets_loss(patched_tree, monkeypatch):
    before = (patched_tree / "train.py").read_bytes()
    assert patching.apply(patched_tree)[0] == "patched: train.py" and patching.is_patched(patched_tree)
    assert patching.apply(patched_tree)[0] == "already patched: train.py"  # idempotent
    calls = []
    original = StepHooks.loss

    def recording(self, model_pred, target, timesteps, loss_scale):
        loss = original(self, model_pred, target, timesteps, loss_scale)
        calls.append((model_pred.detach().clone(), target.clone(), timesteps.clone(), torch.as_tensor(loss_scale), loss))
        return loss

    monkeypatch.setattr(StepHooks, "loss", recording)
    (patched_tree / "preset.toml").write_text(LOSS_PRESET)
    # --sdplug_preset alone: the patched train.py loads the plugin; train.json lists none
    record = train(patched_tree, monkeypatch, "--sdplug_preset", "preset.toml", standin_prediction_type="v_prediction")
    audit = json.loads((patched_tree / "logs" / "myproj-standin" / "audit.json").read_text())
    assert audit["problems"] == [] and audit["steps"] == 3 and audit["host"]["patched"] is True
    assert audit["host"]["loss_route"] == "patched train.py (plan.loss)"
    assert audit["strategies"]["loss"] == ["pseudo_huber"]
    assert audit["host"]["everydream_keys"]["loss_type"] == "switched off"
    # EveryDream2's loss block never ran (it records its loss_scale), the preset's loss trained
    assert record["loss_scales"] == [] and len(calls) == 3
    for (model_pred, target, timesteps, loss_scale, loss), trained in zip(calls, record["losses"], strict=True):
        assert float(loss.detach()) == pytest.approx(trained, rel=1e-6)
        assert float(loss.detach()) == pytest.approx(float(expected_loss(model_pred, target, timesteps, loss_scale)), rel=1e-4)
    # the weighting came with the loss (once), not also through loss_scale
    assert all(torch.equal(scale.float(), torch.ones(4)) for *_, scale, _ in calls)
    assert audit["loss_weighting"]["calls"] == 3

    assert patching.revert(patched_tree) == ["restored: train.py"]
    assert (patched_tree / "train.py").read_bytes() == before and not patching.is_patched(patched_tree)
    assert patching.revert(patched_tree) == ["not patched: train.py"]


def test_a_patched_tree_without_a_preset_trains_as_everydream2(patched_tree, tmp_path, monkeypatch):
    plain = train(make_standin(tmp_path / "plain"), monkeypatch)
    patching.apply(patched_tree)
    patched = train(patched_tree, monkeypatch)
    assert patched["losses"] == plain["losses"] and patched["loss_scales"] == plain["loss_scales"]
    assert len(plain["losses"]) == 3


def test_a_patched_tree_keeps_everydream2s_loss_when_the_preset_sets_no_loss(patched_tree, monkeypatch):
    patching.apply(patched_tree)
    (patched_tree / "preset.toml").write_text('[loss_weighting]\ntype = "min_snr"\ngamma = 5.0\n')
    record = train(patched_tree, monkeypatch, "--sdplug_preset", "preset.toml", standin_prediction_type="v_prediction")
    audit = json.loads((patched_tree / "logs" / "myproj-standin" / "audit.json").read_text())
    assert audit["problems"] == [] and audit["host"]["loss_route"] == "EveryDream2's loss, loss_scale"
    snr = snr_of([t for step in record["timesteps"] for t in step])
    seen = torch.tensor([w for step in record["loss_scales"] for w in step], dtype=torch.float64)
    assert torch.allclose(seen, torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1), rtol=1e-4)


def test_patch_refuses_local_changes_and_unknown_trees(patched_tree, tmp_path):
    (patched_tree / "train.py").write_text((patched_tree / "train.py").read_text() + "# mine\n")
    changed = (patched_tree / "train.py").read_bytes()
    with pytest.raises(PatchError, match="local changes"):
        patching.apply(patched_tree)
    assert (patched_tree / "train.py").read_bytes() == changed
    with pytest.raises(EverydreamVersionError, match="not an EveryDream2 tree"):
        patching.apply(tmp_path)


def test_the_shipped_patch_fits_everydream2_main():
    manifest = json.loads((patching.patches_dir() / "manifest.json").read_text())
    assert set(manifest) == {"main"} and set(manifest["main"]) == {"train.py"}
    diff = (patching.patches_dir() / "main" / "train.py.patch").read_text()
    added = [line[1:] for line in diff.splitlines(keepends=True) if line.startswith("+") and not line.startswith("+++")]
    assert added == [*patching.LOAD_LINES.splitlines(True), *patching.LOSS_LINES.splitlines(True), patching.OPTION_LINE]
    assert not any(line.startswith("-") and not line.startswith("---") for line in diff.splitlines())
