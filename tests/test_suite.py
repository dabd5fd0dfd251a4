"""The README's promise about the suite itself: slow tests exist and `-m slow` selects them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_minus_m_slow_selects_the_slow_tests():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "slow", "--collect-only", "-q", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-1000:]  # 5 would mean "no tests collected"
    assert "test_learning.py::" in done.stdout
