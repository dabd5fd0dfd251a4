"""diffusers' example training scripts as a host: the patch (exact, reversible, refusing what it
does not know), the launcher on a stand-in script, the script's own trick flags refused as
conflicts, and -- with ``SDPLUG_DIFFUSERS_EXAMPLES_DIR`` and ``SDPLUG_DIFFUSERS_PYTHON`` set --
the real scripts (``SDPLUG_DIFFUSERS_ARGS``: model and data arguments; ``SDPLUG_DIFFUSERS_PYTHONPATH``
for the script's process only)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdplug.hosts.diffusers_scripts import edits
from tests.hosts.diffusers_standin import STANDIN, make_standin

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "train_text_to_image_lora.py"
PRESET = """
[[noise]]
type = "pyramid"

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.5

[optimizer]
type = "adamw"
lr = 1e-3
"""


def _run(tmp_path, *script_args, preset=PRESET):
    script = make_standin(tmp_path / "tree")
    (tmp_path / "p.toml").write_text(preset)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "diffusers", "--preset", str(tmp_path / "p.toml"), "--", str(script)]
    result = subprocess.run(
        [*command, "--output_dir", str(out), "--seed", "0", *script_args], capture_output=True, text=True, env=env, timeout=300
    )
    audit = json.loads((out / "audit.json").read_text()) if (out / "audit.json").is_file() else None
    return result, audit, out


def test_patch_is_exact_and_reversible():
    patched = edits.patch_source(STANDIN, SCRIPT)
    assert patched.splitlines()[0] == "#!/usr/bin/env python"  # the shebang stays first
    assert edits.is_patched(patched) and edits.unpatch_source(patched, SCRIPT) == STANDIN
    compile(patched, SCRIPT, "exec")
    inserted = [line for line in patched.splitlines() if line.endswith(edits.MARK)]
    assert len(inserted) == len(edits.EDITS[SCRIPT]) + 1  # one line per edit, plus the header


def test_unknown_or_changed_scripts_are_refused():
    with pytest.raises(edits.DiffusersScriptError, match="occurs 0 times"):
        edits.patch_source(STANDIN.replace("timesteps = timesteps.long()", "timesteps = timesteps.int()"), SCRIPT)
    with pytest.raises(edits.DiffusersScriptError, match="CRLF"):
        edits.patch_source(STANDIN.replace("\n", "\r\n"), SCRIPT)
    patched = edits.patch_source(STANDIN, SCRIPT)
    with pytest.raises(edits.DiffusersScriptError, match="changed since"):
        edits.unpatch_source(patched.replace("import os\n", "import os, sys\n"), SCRIPT)
    with pytest.raises(edits.DiffusersScriptError, match="supports"):
        edits.edits_for("train_controlnet.py")


def test_patch_and_unpatch_a_tree_byte_for_byte(tmp_path):
    path = make_standin(tmp_path)
    before = path.read_bytes()
    assert edits.apply(tmp_path)[0].startswith("patched:")
    assert edits.apply(tmp_path)[0].startswith("already patched:")  # idempotent
    assert b"--sdplug_preset" in path.read_bytes()
    assert edits.revert(tmp_path)[0].startswith("restored:")
    assert path.read_bytes() == before


@pytest.mark.slow
def test_standin_trains_with_every_part_applied(tmp_path):
    result, audit, out = _run(tmp_path, "--max_train_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert audit["completed"] and audit["steps"] == 3 and audit["problems"] == []
    assert audit["noise"]["applied"] == [{"type": "pyramid", "calls": 3}]
    assert audit["loss_weighting"]["calls"] == 3 and audit["optimizer"]["learning_rates"] == [1e-3]
    caption = audit["caption"]
    assert caption["samples"] == 12 and caption["empty_caption_embeddings_substituted"] == caption["dropped"]
    seen = torch.load(out / "standin.pt")
    rows = torch.cat(seen["seen_ids"])
    assert int((rows == torch.tensor([1, 0, 0, 0])).all(1).sum()) == caption["dropped"]  # the empty caption's tokens
    assert seen["optimizer"] == "AdamW"
    flags = audit["host"]["script_flags"]
    assert flags["snr_gamma"]["state"].startswith("off") and flags["use_8bit_adam"]["state"].startswith("off")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "section"),
    [(["--snr_gamma", "5"], "loss_weighting"), (["--noise_offset", "0.1"], "noise"), (["--use_8bit_adam"], "optimizer")],
)
def test_script_trick_flags_are_refused(tmp_path, flag, section):
    result, audit, _ = _run(tmp_path, *flag)
    assert result.returncode == 1 and f"[{section}]" in result.stderr
    assert audit["completed"] is False and audit["steps"] == 0 and flag[0] in audit["problems"][0]


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("SDPLUG_DIFFUSERS_EXAMPLES_DIR") and os.environ.get("SDPLUG_DIFFUSERS_PYTHON")),
    reason="needs a diffusers checkout and its python",
)
def test_real_text_to_image_lora(tmp_path):
    tree, python = Path(os.environ["SDPLUG_DIFFUSERS_EXAMPLES_DIR"]), os.environ["SDPLUG_DIFFUSERS_PYTHON"]
    (script,) = [path for name, path in edits.find_scripts(tree) if name == SCRIPT]
    (tmp_path / "p.toml").write_text(PRESET.replace('"adamw"', '"adamw8bit"'))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.environ.get("SDPLUG_DIFFUSERS_PYTHONPATH", ""),
    }
    args = shlex.split(os.environ.get("SDPLUG_DIFFUSERS_ARGS", ""))
    command = [python, "-m", "sdplug", "diffusers", "--preset", str(tmp_path / "p.toml"), "--", str(script), *args]
    result = subprocess.run(
        [*command, "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=script.parent,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["steps"] == 2 and audit["problems"] == [] and audit["optimizer"]["class"].endswith("AdamW8bit")
    assert audit["caption"]["samples"] > 0 and audit["host"]["script_flags"]["snr_gamma"]["state"].startswith("off")


NAN_IN_SECOND_BACKWARD = """
import torch

_backward, _calls = torch.Tensor.backward, [0]


def _overflowing(self, *args, **kwargs):  # the second step's backward overflows, as a diverging run's does
    _calls[0] += 1
    return _backward(self * float("nan") if _calls[0] == 2 else self, *args, **kwargs)


torch.Tensor.backward = _overflowing
"""


def test_a_run_gone_non_finite_is_in_the_audit_and_fails(tmp_path, monkeypatch):
    """The second step's gradients turn NaN: the plan watches the weights the optimizer it
    built steps, and the audit says the run went non-finite at step 2."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(NAN_IN_SECOND_BACKWARD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'inject'}{os.pathsep}{ROOT}")
    preset = '[optimizer]\ntype = "adamw"\nlr = 1e-3\n'
    script = make_standin(tmp_path / "tree")
    (tmp_path / "p.toml").write_text(preset)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "diffusers", "--preset", str(tmp_path / "p.toml"), "--", str(script)]
    result = subprocess.run(
        [*command, "--output_dir", str(out), "--seed", "0", "--max_train_steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode != 0, result.stderr[-3000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["completed"] is False and audit["divergence"]["first_step"] == 2
    assert any("non-finite at step 2" in p for p in audit["problems"])
