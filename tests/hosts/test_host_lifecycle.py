"""Every host runs the one lifecycle (``sdplug.hosts.lifecycle``): a refused, a crashed and a
completed run each write ``audit.json`` through the one writer (``sdplug.plan.audit_file.write``,
atomic), with the keys every audit has.

Each run is its own process (the audit of a crash is written at exit). A ``sitecustomize`` put
first on its ``PYTHONPATH`` logs every call of the writer and, when asked, crashes the host at
its second backward pass (a host failure the host's code knows nothing of).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdplug.hosts.lifecycle import launcher_rank
from sdplug.plan.audit_file import AUDIT_KEYS
from tests.hosts.diffusers_standin import make_standin as make_diffusers_standin
from tests.hosts.everydream_standin import make_standin as make_everydream_standin
from tests.hosts.kohya_standin import make_standin as make_kohya_standin

ROOT = Path(__file__).resolve().parents[2]

WRITER_SPY = """
import json, os

import torch

from sdplug.plan import audit_file

_write = audit_file.write


def _logged(data, output_dir, rank, **options):
    path = _write(data, output_dir, rank, **options)
    with open(os.environ["AUDIT_WRITES"], "a") as log:
        log.write(json.dumps({"path": os.path.abspath(path), "keys": sorted(data)}) + "\\n")
    return path


audit_file.write = _logged

if os.environ.get("CRASH_AT_BACKWARD"):
    _backward, _calls = torch.Tensor.backward, [0]

    def _crashing(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["CRASH_AT_BACKWARD"]):
            raise RuntimeError("stand-in crash")
        return _backward(self, *args, **kwargs)

    torch.Tensor.backward = _crashing
"""

KOHYA_PRESET = '[[noise]]\ntype = "offset"\n\n[optimizer]\ntype = "adamw"\nlr = 1e-3\n'
WEIGHTED_PRESET = '[loss_weighting]\ntype = "min_snr"\ngamma = 5.0\n\n[optimizer]\ntype = "adamw"\nlr = 1e-3\n'


def _run(tmp_path: Path, command: list[str], *, cwd: Path | None = None, crash: bool = False) -> subprocess.CompletedProcess:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(WRITER_SPY)
    env = {
        **os.environ,
        "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
        "AUDIT_WRITES": str(tmp_path / "writes.jsonl"),
    }
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    if crash:
        env["CRASH_AT_BACKWARD"] = "2"
    return subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def kohya(tmp_path: Path, outcome: str) -> tuple[subprocess.CompletedProcess, Path]:
    root = make_kohya_standin(tmp_path / "sd", "main")
    (tmp_path / "p.toml").write_text(KOHYA_PRESET)
    out = tmp_path / "out"
    extra = {"refused": ["--noise_offset", "0.1"], "crashed": ["--crash_at_step", "2"], "completed": []}[outcome]
    command = ["-m", "sdplug", "kohya", "--preset", str(tmp_path / "p.toml"), "--sd-scripts", str(root), "--"]
    command += ["train_network.py", "--output_dir", str(out), "--max_train_steps", "3", *extra]
    return _run(tmp_path, command), out


def everydream(tmp_path: Path, outcome: str) -> tuple[subprocess.CompletedProcess, Path]:
    tree = make_everydream_standin(tmp_path / "ed2")
    (tree / "preset.toml").write_text(WEIGHTED_PRESET)
    config = {"plugins": ["sdplug.hosts.everydream.Plugin"], "sdplug_preset": "preset.toml"}
    config |= {"refused": {"min_snr_gamma": 5}, "crashed": {"standin_crash_at_step": 1}, "completed": {}}[outcome]
    (tree / "train.json").write_text(json.dumps(config))
    return _run(tmp_path, ["train.py", "--config", "train.json"], cwd=tree), tree / "logs" / "myproj-standin"


def diffusers(tmp_path: Path, outcome: str) -> tuple[subprocess.CompletedProcess, Path]:
    script = make_diffusers_standin(tmp_path / "tree")
    (tmp_path / "p.toml").write_text(WEIGHTED_PRESET)
    out = tmp_path / "out"
    extra = ["--snr_gamma", "5"] if outcome == "refused" else []
    command = ["-m", "sdplug", "diffusers", "--preset", str(tmp_path / "p.toml"), "--", str(script)]
    command += ["--output_dir", str(out), "--seed", "0", "--max_train_steps", "3", *extra]
    return _run(tmp_path, command, crash=outcome == "crashed"), out


def reference_trainer(tmp_path: Path, outcome: str) -> tuple[subprocess.CompletedProcess, Path]:
    # refused once the output folder is open: the preset's timestep range does not fit the model's schedule
    preset = '[timesteps]\ntype = "uniform"\nmax_timestep = 5000\n' if outcome == "refused" else WEIGHTED_PRESET
    (tmp_path / "p.toml").write_text(preset)
    out = tmp_path / "out"
    command = ["-m", "sdplug", "train", str(tmp_path / "p.toml"), "--output", str(out)]
    command += ["--steps", "3", "--batch-size", "1", "--no-samples", "--no-progress"]
    return _run(tmp_path, command, crash=outcome == "crashed"), out


HOSTS = {"kohya": kohya, "everydream": everydream, "diffusers": diffusers, "reference trainer": reference_trainer}


# every host's completed run, kohya's refusal and diffusers' crash in the default suite; the rest slow
CASES = [
    (host, outcome)
    if outcome == "completed" or (host, outcome) in (("kohya", "refused"), ("diffusers", "crashed"))
    else pytest.param(host, outcome, marks=pytest.mark.slow)
    for host in HOSTS
    for outcome in ("refused", "crashed", "completed")
]


@pytest.mark.parametrize(("host", "outcome"), CASES)
def test_every_host_writes_its_audit_through_the_one_writer(tmp_path, host, outcome):
    result, folder = HOSTS[host](tmp_path, outcome)
    assert (result.returncode == 0) == (outcome == "completed"), result.stderr[-3000:]
    audit_file = folder / "audit.json"
    assert audit_file.is_file(), result.stderr[-3000:]
    audit = json.loads(audit_file.read_text())
    # the file on disk is the writer's last write of it, and the writer left no partial file
    writes = [json.loads(line) for line in (tmp_path / "writes.jsonl").read_text().splitlines()]
    last = [w for w in writes if Path(w["path"]) == audit_file][-1]
    assert last["keys"] == sorted(audit)
    assert not list(folder.glob("*.partial"))
    # the keys every audit has, whichever host and however the run ended
    assert set(AUDIT_KEYS) <= set(audit), sorted(audit)
    if outcome == "refused":
        assert audit["steps"] == 0 and audit["completed"] is False
        assert audit["problems"][0].startswith("refused before training: ")
        assert set(audit) == set(AUDIT_KEYS)  # refused before a plan: nothing else to say
    elif outcome == "crashed":
        assert audit["completed"] is False
        assert any("stand-in crash" in problem for problem in audit["problems"]), audit["problems"]
    else:
        assert audit["completed"] is True and audit["problems"] == [] and audit["steps"] == 3
        assert audit["strategies"]["optimizer"] == ["adamw"]


@pytest.mark.parametrize(
    ("environ", "rank"),
    [({}, 0), ({"RANK": "2", "LOCAL_RANK": "0"}, 2), ({"LOCAL_RANK": "1"}, 1), ({"RANK": " ", "LOCAL_RANK": "3"}, 3)],
)
def test_every_launcher_gives_the_rank_by_one_rule(environ, rank):
    assert launcher_rank(environ) == rank


def test_a_rank_that_is_no_number_is_refused_naming_the_variable():
    from sdplug.errors import SdplugError

    with pytest.raises(SdplugError, match="RANK='zero'"):
        launcher_rank({"RANK": "zero"})


# what a plan keeps for itself: a host reads the plan through its public methods instead
PLAN_INTERNALS = (
    "audit",
    "optimizer_choice",
    "attention_choice",
    "noise_pipeline",
    "caption_pipeline",
    "divergence",
    "streams",
    "timestep_sampler",
    "loss_type",
)


def test_no_host_reaches_through_the_plan_into_what_it_keeps():
    """kohya, EveryDream2, the diffusers scripts and the reference trainer read the plan only
    through its public API (``Plan.rank``, ``record_host``, ``stream_generator``, ...)."""
    import ast

    import sdplug

    package = Path(sdplug.__file__).parent
    reached = []
    for folder in ("hosts", "trainer", "bench"):
        for path in sorted((package / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Attribute) and node.attr in PLAN_INTERNALS):
                    continue
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name == "plan":
                    reached.append(f"{path.relative_to(package)}:{node.lineno}: plan.{node.attr}")
    assert reached == []
