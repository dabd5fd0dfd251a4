"""The sdplug command line, run as a user would (a subprocess)."""

import subprocess
import sys
from pathlib import Path

import pytest

import sdplug

ROOT = Path(__file__).resolve().parents[2]


def sdplug_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sdplug", *args], capture_output=True, text=True, cwd=cwd)


def test_list_shows_every_strategy_with_description_and_origin():
    result = sdplug_cli("list")
    assert result.returncode == 0
    for family in sdplug.FAMILIES:
        assert f"{family}:" in result.stdout
        for name in sdplug.available(family):
            line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name + " "))
            assert line.rstrip().endswith("[sdplug]") and len(line.split()) > 3


def test_list_one_family():
    result = sdplug_cli("list", "loss_weighting")
    assert result.returncode == 0 and "min_snr" in result.stdout and "pyramid" not in result.stdout


def test_validate_shipped_presets_exits_zero():
    result = sdplug_cli("validate", *sorted(str(p) for p in (ROOT / "presets").glob("*.toml")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") == len(list((ROOT / "presets").glob("*.toml")))


def test_validate_bad_preset_exits_one_with_a_paragraph_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[noise]]\ntype = "pyramid"\ndiscount = 1.5\n')
    good = ROOT / "presets" / "min-snr.toml"
    result = sdplug_cli("validate", str(good), str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {bad}: noise[0].discount: 1.5 is not allowed for noise 'pyramid': "
        "Input should be less than or equal to 1. Allowed: a number > 0.0 and <= 1.0."
    )
    assert "ok: " in result.stdout


def test_show_prints_the_resolved_preset_with_defaults():
    result = sdplug_cli("show", str(ROOT / "presets" / "dark-and-bright.toml"))
    assert result.returncode == 0
    text = result.stdout
    assert "extends" not in text
    assert 'type = "adamw8bit"' in text  # from the parent
    assert 'variant = "intended"' in text  # a default made explicit
    assert "gradient_checkpointing = true" in text


def test_unknown_family_is_an_error_not_a_traceback():
    result = sdplug_cli("list", "noises")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Did you mean 'noise'" in result.stderr


@pytest.mark.slow
def test_train_takes_the_validation_and_masked_loss_options(tmp_path):
    no_holdout = sdplug_cli("train", "min-snr", "--validate-every", "3", "--output", str(tmp_path / "o"))
    assert no_holdout.returncode == 1 and "needs held-out images" in no_holdout.stderr and "Traceback" not in no_holdout.stderr
    split = sdplug_cli("train", "min-snr", "--validation-split", "0.9", "--output", str(tmp_path / "o"))
    assert split.returncode == 1 and "allowed: a share from 0 to 0.5" in split.stderr
    masked = sdplug_cli("train", "min-snr", "--masked-loss", "--steps", "1", "--output", str(tmp_path / "m"))
    assert masked.returncode == 1 and "--masked-loss: none of the" in masked.stderr  # the embedded data has no masks
