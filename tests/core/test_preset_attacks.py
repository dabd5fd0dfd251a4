"""Presets written to attack sdplug: hostile text, hostile paths, hostile nesting, and mistakes that
must all be reported -- each refused with a clear, single-purpose error, never a traceback."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sdplug
from sdplug.errors import PresetError, printable
from sdplug.params import describe_allowed, field_names
from sdplug.preset import load_preset, parse_preset

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J"  # sets the terminal's title, then clears the screen


def sdplug_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "sdplug", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def errors_of(path, **kwargs):
    with pytest.raises(PresetError) as info:
        load_preset(path, **kwargs)
    return info.value


# -- control characters never reach the terminal raw ---------------------------------------------
def test_printable_escapes_c0_c1_and_del_and_keeps_ordinary_unicode():
    assert printable(f"a{HOSTILE}\x9b\x7f\n\t é ü 漢 \\") == "a\\x1b]0;PWNED\\x07\\x1b[2J\\x9b\\x7f\\x0a\\x09 é ü 漢 \\"
    assert printable(printable(HOSTILE)) == printable(HOSTILE)  # already-escaped text stays as it is


def test_preset_error_message_escapes_the_file_name_and_key_but_keeps_the_attributes():
    error = PresetError(f"bad {HOSTILE}", path=f"p{HOSTILE}.toml", key=f"noise[0].{HOSTILE}")
    assert "\x1b" not in str(error) and "\x07" not in str(error)
    assert str(error) == f"p{printable(HOSTILE)}.toml: noise[0].{printable(HOSTILE)}: bad {printable(HOSTILE)}"
    assert error.path == f"p{HOSTILE}.toml" and error.key == f"noise[0].{HOSTILE}"


def test_validate_escapes_file_names_sections_keys_and_names_from_the_file(tmp_path):
    escaped = HOSTILE.encode("unicode_escape").decode().replace("\\x", "\\u00")  # as TOML writes them in strings
    bad = write(tmp_path, f"bad{HOSTILE}.toml", f'["{escaped}"]\nx = 1\n[[noise]]\ntype = "offset"\n"{escaped}" = 1\n')
    good = write(tmp_path, f"good{HOSTILE}.toml", f'[preset]\nname = "{escaped}"\n[[noise]]\ntype = "offset"\n')
    result = sdplug_cli("validate", str(bad), str(good))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\x07" not in stream
    assert f"bad{printable(HOSTILE)}.toml: {printable(HOSTILE)}: unknown section" in result.stderr
    assert f"noise[0].{printable(HOSTILE)}: unknown key" in result.stderr
    assert f"ok: {tmp_path}/good{printable(HOSTILE)}.toml ({printable(HOSTILE)})" in result.stdout


def test_an_embedded_presets_source_is_escaped(tmp_path):
    from sdplug.preset import parse_preset_text

    with pytest.raises(PresetError) as info:
        parse_preset_text('[[noise]]\ntype = "nope"\n', path=f"lora{HOSTILE}.safetensors (its metadata)", embedded_from="x")
    assert "\x1b" not in str(info.value) and f"lora{printable(HOSTILE)}.safetensors" in str(info.value)


# -- extends: only a user's own regular .toml presets --------------------------------------------
SECRET = "hunter2-secret"


@pytest.mark.parametrize("target", ["/etc/passwd", "/proc/self/environ", "../../../../../../etc/hostname"])
def test_extends_refuses_files_that_are_not_toml(tmp_path, target):
    child = write(tmp_path, "child.toml", f'[preset]\nextends = "{target}"\n')
    error = errors_of(child)
    assert error.key == "preset.extends" and error.path == str(child)
    assert "Allowed: a path to a .toml file" in str(error) and "not a .toml file" in str(error)


def test_extends_does_not_echo_values_of_a_non_toml_file(tmp_path):
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", "secrets.conf", f'[memory]\nmixed_precision = "{SECRET}"\n')
    error = errors_of(write(tmp_path, "child.toml", '[preset]\nextends = "etc/secrets.conf"\n'))
    assert SECRET not in str(error) and error.key == "preset.extends"


def test_extends_through_a_toml_symlink_to_another_file_is_refused(tmp_path):
    write(tmp_path, "secrets.conf", f'[memory]\nmixed_precision = "{SECRET}"\n')
    (tmp_path / "innocent.toml").symlink_to(tmp_path / "secrets.conf")
    error = errors_of(write(tmp_path, "child.toml", '[preset]\nextends = "innocent.toml"\n'))
    assert SECRET not in str(error) and error.key == "preset.extends" and "secrets.conf" in str(error)


def test_extends_names_a_directory_as_a_directory(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    error = errors_of(write(tmp_path, "child.toml", '[preset]\nextends = "folder.toml"\n'))
    assert error.key == "preset.extends" and "is a directory" in str(error)


def test_extends_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.toml")
    child = write(tmp_path, "child.toml", '[preset]\nextends = "pipe.toml"\n')
    result = sdplug_cli("validate", str(child), timeout=60)  # a blocking open would hang here
    assert result.returncode == 1 and "preset.extends" in result.stderr and "not a regular file" in result.stderr


def test_errors_inside_an_extended_file_do_not_quote_its_values(tmp_path):
    parent = write(tmp_path, "other.toml", f'[memory]\nmixed_precision = "{SECRET}"\n')
    error = errors_of(write(tmp_path, "child.toml", '[preset]\nextends = "other.toml"\n'))
    assert SECRET not in str(error)
    assert error.path == str(parent) and error.key == "memory.mixed_precision"
    assert "Allowed: one of 'no', 'fp16', 'bf16'" in str(error) and f"sdplug validate {parent}" in str(error)
    # validating that file itself shows everything
    assert SECRET in str(errors_of(parent))


def test_a_preset_embedded_in_a_download_cannot_extend(tmp_path):
    from sdplug.preset import parse_preset_text

    text = '[preset]\nextends = "/etc/passwd"\n[[noise]]\ntype = "offset"\n'
    with pytest.raises(PresetError) as info:
        parse_preset_text(text, path="lora.safetensors (its metadata)", embedded_from="lora.safetensors")
    assert info.value.key == "preset.extends" and "embedded in lora.safetensors" in str(info.value)
    saved = write(tmp_path, "sdplug_preset.toml", '[preset]\nextends = "min-snr"\n')
    error = errors_of(saved, embedded_from=str(tmp_path))
    assert error.key == "preset.extends" and f"embedded in {tmp_path}" in str(error)
    with pytest.raises(PresetError, match="cannot 'extends'"):
        parse_preset({"preset": {"extends": "min-snr"}}, path="x", embedded_from="model")


def test_an_embedded_preset_without_extends_loads():
    from sdplug.preset import parse_preset_text

    preset = parse_preset_text('[[noise]]\ntype = "offset"\n', path="lora (its metadata)", embedded_from="lora")
    assert [spec.type for spec in preset.noise] == ["offset"]


# -- deep nesting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["[" * 1200 + "]" * 1200, "{a = " * 1200 + "1" + "}" * 1200, "[" * 40 + "1" + "]" * 40])
def test_deeply_nested_values_are_a_clear_error(tmp_path, value):
    error = errors_of(write(tmp_path, "deep.toml", f'[[noise]]\ntype = "offset"\nstrength = {value}\n'))
    assert "nested more than" in str(error) and "\n" not in str(error)


def test_deeply_nested_data_in_code_is_a_clear_error():
    value: list = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(PresetError, match="nested more than"):
        parse_preset({"noise": [{"type": "offset", "strength": value}]}, path="deep")


# -- every mistake of a file ------------------------------------------------------------------------
FOUR_MISTAKES = """\
[[noise]]
type = "offset"
strenght = 0.1
[[noise]]
type = "pyramd"
[loss_weighting]
type = "min_snr"
gamma = "5"
[[caption]]
type = "dropout"
rate = 1.5
"""


def test_every_mistake_of_a_file_is_reported(tmp_path):
    path = write(tmp_path, "four.toml", FOUR_MISTAKES)
    error = errors_of(path)
    assert [e.key for e in error.errors] == ["noise[0].strenght", "noise[1].type", "loss_weighting.gamma", "caption[0].rate"]
    assert all(e.path == str(path) for e in error.errors)
    assert str(error).count("\n") == 3  # one paragraph each
    result = sdplug_cli("validate", str(path))
    assert result.returncode == 1 and result.stderr.count("error: ") == 4


def test_every_mistake_of_one_table_is_reported(tmp_path):
    path = write(
        tmp_path,
        "t.toml",
        '[optimizer]\ntype = "adamw"\nlr = 5.0\nbetas = [0.9, 1.5]\nwieght_decay = 0.1\nepss = 1\n'
        '[memory]\nmixed_precision = "fp8"\ncache_latents = "yes"\n[preset]\nnam = "x"\nextends = 3\n[bogus]\n',
    )
    keys = {e.key for e in errors_of(path).errors}
    assert keys == {
        "bogus",
        "preset.nam",
        "preset.extends",
        "optimizer.lr",
        "optimizer.betas[1]",
        "optimizer.wieght_decay",
        "optimizer.epss",
        "memory.mixed_precision",
        "memory.cache_latents",
    }


def test_several_mistakes_survive_pickling(tmp_path):
    import pickle

    error = errors_of(write(tmp_path, "four.toml", FOUR_MISTAKES))
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and len(again.errors) == 4


def test_one_mistake_is_still_one_plain_error(tmp_path):
    error = errors_of(write(tmp_path, "one.toml", '[[noise]]\ntype = "offset"\nstrength = 2.0\n'))
    assert error.errors == (error,) and "\n" not in str(error)


# -- list shows each strategy's parameters -------------------------------------------------------
def test_list_params_shows_every_parameter_default_and_range():
    result = sdplug_cli("list", "noise", "--params")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for entry in sdplug.strategies.registry("noise").entries():
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(entry.name + " "))
        block = []
        for line in lines[start + 1 :]:
            if not line.startswith("      "):
                break
            block.append(line)
        names = field_names(entry.cls)
        # every declared parameter, in order
        assert [line.split()[0] for line in block] == (names or ["(no"])
        for name, line in zip(names, block if names else [], strict=True):
            assert "default " in line and describe_allowed(entry.cls, name) in line
    assert any(line.split()[:3] == ["strength", "default", "0.1"] and "a number >= 0.0 and <= 1.0" in line for line in lines)
    assert any(line.split()[:3] == ["normalize", "default", '"batch"'] for line in lines)


def test_list_params_covers_list_and_unset_defaults_and_parameterless_strategies():
    result = sdplug_cli("list", "--params")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:4] == ["betas", "default", "[0.9,", "0.999]"] for line in lines)
    assert any(line.split()[:4] == ["max_timestep", "default", "not", "set"] for line in lines)
    sdpa = next(i for i, line in enumerate(lines) if line.strip().startswith("sdpa "))
    assert lines[sdpa + 1].strip() == "(no parameters)"


def test_list_without_params_is_unchanged():
    result = sdplug_cli("list", "noise")
    assert result.returncode == 0 and not any(line.startswith("      ") for line in result.stdout.splitlines())


# -- wording -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,article", [("optimizer", "an"), ("attention", "an"), ("loss", "a"), ("timesteps", "a")])
def test_unknown_type_uses_the_right_article(tmp_path, section, article):
    error = errors_of(write(tmp_path, "x.toml", f'[{section}]\ntype = "nope"\n'))
    assert f"'nope' is not {article} {section} strategy" in str(error)


def test_show_as_written_prints_only_what_was_written(tmp_path):
    path = write(tmp_path, "p.toml", '[[noise]]\ntype = "offset"\n')
    result = sdplug_cli("show", "--as-written", str(path))
    assert result.returncode == 0, result.stderr
    assert "[memory]" not in result.stdout and "[schedule]" not in result.stdout and 'type = "offset"' in result.stdout
    written = write(tmp_path, "w.toml", '[memory]\nmixed_precision = "no"\n[schedule]\nzero_terminal_snr = true\n')
    text = load_preset(written).to_toml(with_defaults=False)
    assert 'mixed_precision = "no"' in text and "gradient_checkpointing" not in text
    assert "zero_terminal_snr = true" in text and "epsilon_ok" not in text


def test_as_written_keeps_a_setting_changed_in_code(tmp_path):
    preset = load_preset(write(tmp_path, "p.toml", '[[noise]]\ntype = "offset"\n'))
    changed = dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, cache_latents=True))
    assert changed.to_dict()["memory"] == {"cache_latents": True}


# -- numbers that are no numbers --------------------------------------------------------------------
@pytest.mark.parametrize(
    "table,key,words",
    [
        ('[[noise]]\ntype = "offset"\nstrength = nan\n', "noise[0].strength", "nan is not a number"),
        ('[[noise]]\ntype = "offset"\nstrength = inf\n', "noise[0].strength", "inf is not finite"),
        ('[[noise]]\ntype = "offset"\nadaptive_scale = -inf\n', "noise[0].adaptive_scale", "-inf is not finite"),
        ('[optimizer]\ntype = "adamw"\nbetas = [nan, 0.9]\n', "optimizer.betas[0]", "nan is not a number"),
        ("[ema]\ndecay = nan\n", "ema.decay", "nan is not a number"),
        ('[timesteps]\ntype = "biased"\nportion = nan\n', "timesteps.portion", "nan is not a number"),
    ],
)
def test_nan_and_inf_are_named_as_such(tmp_path, table, key, words):
    error = errors_of(write(tmp_path, "n.toml", table))
    assert error.key == key and words in str(error) and "less than" not in str(error) and "greater" not in str(error)


def test_nan_is_refused_in_code_too():
    with pytest.raises(PresetError, match="nan is not a number"):
        sdplug.strategies.registry("noise").create("offset", strength=math.nan)


# -- what a path is --------------------------------------------------------------------------------
def test_validate_says_what_a_non_file_is(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "is a directory" in str(errors_of(folder))
    result = sdplug_cli("validate", str(folder), "/dev/zero", timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{folder}: it is a directory" in result.stderr
    assert "/dev/zero: it is not a regular file (a character device)" in result.stderr
    assert "no such preset file" not in result.stderr


def test_a_fifo_preset_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "p.toml")
    result = sdplug_cli("validate", str(tmp_path / "p.toml"), timeout=60)
    assert result.returncode == 1 and "not a regular file (a FIFO)" in result.stderr


def test_a_missing_file_is_still_no_such_file(tmp_path):
    assert "no such preset file" in str(errors_of(tmp_path / "nope.toml"))


# -- zero-terminal SNR and generalized offset noise ------------------------------------------------
def test_validate_refuses_generalized_offset_with_a_zero_terminal_schedule(tmp_path, sd_alphas):
    path = write(tmp_path, "z.toml", '[schedule]\nzero_terminal_snr = true\n[[noise]]\ntype = "generalized_offset"\n')
    error = errors_of(path)
    assert error.key == "noise[0].type" and "zero-terminal SNR" in str(error)
    # the plan refuses it with the same sentence, for the same reason
    preset = dataclasses.replace(load_preset(write(tmp_path, "g.toml", '[[noise]]\ntype = "generalized_offset"\n')))
    zero = dataclasses.replace(preset, schedule=dataclasses.replace(preset.schedule, zero_terminal_snr=True))
    with pytest.raises(PresetError) as info:
        zero.build(alphas_cumprod=sd_alphas, prediction_type="v_prediction")
    assert info.value.problem == error.problem


def test_generalized_offset_without_zero_terminal_snr_validates(tmp_path):
    preset = load_preset(write(tmp_path, "g.toml", '[[noise]]\ntype = "generalized_offset"\n'))
    assert preset.noise[0].type == "generalized_offset"
