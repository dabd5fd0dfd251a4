"""The README's code runs as written: the 'Your own training loop' block, from a user's folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_your_own_training_loop_runs_and_audits_every_trick(tmp_path):
    code = readme_block("## Your own training loop")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = int(re.search(r"for step in range\((\d+)\)", code).group(1))
    audit = json.loads((tmp_path / "my-run" / "audit.json").read_text())
    assert audit["steps"] == steps and audit["problems"] == []
    assert audit["noise"]["applied"] == [{"type": "pyramid", "calls": steps}]
    assert audit["loss_weighting"]["calls"] == steps and audit["caption"]["samples"] == 8 * steps
    assert audit["host"] == {"name": "my own loop"}
