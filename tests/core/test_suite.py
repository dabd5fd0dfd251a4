"""The README's promise about the suite itself: slow tests exist and `-m slow` selects them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # it checks the slow selection itself: there it runs
def test_minus_m_slow_selects_the_slow_tests():
    done = subprocess.run(
        # one file holding slow tests: collecting the whole suite would cost the default run seconds
        [sys.executable, "-m", "pytest", "-m", "slow", "--collect-only", "-q", "tests/trainer/test_learning.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-1000:]  # 5 would mean "no tests collected"
    assert "test_learning.py::" in done.stdout


def test_modules_and_classes_stay_small():
    """The house's limits: a generous guard (no module over 600 lines, no class over 500): a module is
    split when it has two jobs, not at a count. ``Plan`` is the largest class: the one contract
    every host calls, whose parts (optimizer, attention, audit, problems) live in modules of their own."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "sdplug"
    too_big = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 600:
            too_big.append(f"{path.relative_to(package)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 500:
                too_big.append(f"{path.relative_to(package)}: class {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, too_big
