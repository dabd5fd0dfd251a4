"""The EveryDream2 plugin as EveryDream2 runs it (train.py as its own process, stand-in tree):
a refusal is its message, not a traceback through EveryDream2's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.hosts.everydream_standin import make_standin

ROOT = Path(__file__).resolve().parents[2]


def run_train(root: Path, preset: str, **train_json) -> subprocess.CompletedProcess:
    (root / "preset.toml").write_text(preset)
    config = {"plugins": ["sdplug.hosts.everydream.Plugin"], "sdplug_preset": "preset.toml", **train_json}
    (root / "train.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "train.py", "--config", "train.json"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_refused_conflict_prints_its_message_and_no_traceback(tmp_path):
    root = make_standin(tmp_path / "ed2")
    done = run_train(root, '[[caption]]\ntype = "dropout"\nrate = 0.1\n', cond_dropout=0.1)
    assert done.returncode != 0
    assert "sdplug: error:" in done.stderr and "EveryDream2 sets cond_dropout = 0.1" in done.stderr
    assert "Traceback" not in done.stderr and "EverydreamConflictError" not in done.stderr
    audit = json.loads((root / "logs" / "myproj-standin" / "audit.json").read_text())
    assert audit["steps"] == 0 and "cond_dropout = 0.1" in audit["problems"][0]


def test_only_the_reported_refusal_loses_its_traceback(monkeypatch):
    from sdplug.errors import SdplugError
    from sdplug.hosts.everydream.runtime import leave_out_traceback

    shown = []

    def previous(kind, value, traceback):
        shown.append(value)

    monkeypatch.setattr(sys, "excepthook", previous)
    refused, crash = SdplugError("refused"), RuntimeError("crash")
    leave_out_traceback(refused)
    leave_out_traceback(SdplugError("another refusal"))
    assert sys.excepthook.previous is previous  # one hook, however many refusals
    sys.excepthook(type(refused), refused, None)
    sys.excepthook(type(crash), crash, None)
    assert shown == [crash]  # anything else still gets the previous hook (its traceback)


def test_a_run_gone_non_finite_is_in_the_audit_and_fails(tmp_path):
    """No [optimizer]: EveryDream2's own optimizers train, and the plan watches what they step;
    the loss turns NaN in the second step, and the audit says the run went non-finite there."""
    root = make_standin(tmp_path / "ed2")
    (root / "preset.toml").write_text('[[noise]]\ntype = "pyramid"\ndiscount = 0.8\n')
    config = {"plugins": ["sdplug.hosts.everydream.Plugin"], "sdplug_preset": "preset.toml", "standin_nan_loss_at_step": 1}
    (root / "train.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "train.py", "--config", "train.json"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0, done.stderr[-3000:]
    audit = json.loads((root / "logs" / "myproj-standin" / "audit.json").read_text())
    assert audit["completed"] is False and audit["divergence"]["first_step"] == 2
    assert any("non-finite at step 2" in p for p in audit["problems"])
