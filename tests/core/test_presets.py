"""Presets: shipped ones validate; every kind of mistake is one PresetError naming file and key."""

import glob
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdplug
from sdplug.preset import SECTIONS, parse_preset
from sdplug.preset.files import tomllib

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(glob.glob(str(ROOT / "presets" / "*.toml")))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_for(tmp_path, text, name="bad.toml"):
    path = write(tmp_path, name, text)
    with pytest.raises(sdplug.PresetError) as info:
        sdplug.load_preset(path)
    assert info.value.path == str(path)
    assert "\n" not in str(info.value)  # one paragraph
    return info.value


def test_shipped_presets_validate_and_cover_the_seeds():
    names = {Path(p).stem for p in SHIPPED}
    assert {"pyramid-noise", "min-snr", "caption-dropout-cfg", "dark-and-bright", "consumer-8gb"} <= names
    for path in SHIPPED:
        preset = sdplug.load_preset(path)
        for spec in (*preset.noise, *preset.caption):
            spec.create()


def test_extends_merges_parent_then_child(tmp_path):
    preset = sdplug.load_preset(ROOT / "presets" / "dark-and-bright.toml")
    assert preset.extends_chain == (str(ROOT / "presets" / "consumer-8gb.toml"),)
    assert preset.optimizer.type == "adamw8bit"  # from the parent
    assert preset.memory.gradient_checkpointing is True
    assert [s.type for s in preset.noise] == ["pyramid"]
    assert preset.loss_weighting.params == {"gamma": 5.0}


def test_child_section_replaces_and_memory_merges_by_key(tmp_path):
    write(
        tmp_path, "parent.toml", '[[noise]]\ntype = "offset"\n[memory]\ngradient_checkpointing = true\nmixed_precision = "fp16"\n'
    )
    child = write(tmp_path, "child.toml", 'noise = []\n[preset]\nextends = "parent"\n[memory]\nmixed_precision = "bf16"\n')
    preset = sdplug.load_preset(child)
    assert preset.noise == ()
    assert preset.memory.gradient_checkpointing is True and preset.memory.mixed_precision == "bf16"


def test_extends_a_shipped_preset_by_name_from_anywhere(tmp_path):
    path = write(tmp_path, "mine.toml", '[preset]\nextends = "min-snr"\n[[caption]]\ntype = "dropout"\n')
    preset = sdplug.load_preset(path)
    assert preset.loss_weighting.type == "min_snr" and preset.caption[0].type == "dropout"


def test_show_round_trips(tmp_path):
    for path in SHIPPED:
        preset = sdplug.load_preset(path)
        again = parse_preset(tomllib.loads(preset.to_toml()), path="again.toml")
        assert again.to_dict(with_defaults=True) == preset.to_dict(with_defaults=True)


@pytest.mark.parametrize(
    "text,key,words",
    [
        (
            '[[noise]]\ntype = "pyramid"\ndiscont = 0.8\n',
            "noise[0].discont",
            ["Did you mean 'discount'", "Allowed keys: discount"],
        ),
        (
            '[[noise]]\ntype = "pyramid"\ndiscount = "0.8"\n',
            "noise[0].discount",
            ["'0.8' is not allowed", "a number > 0.0 and <= 1.0"],
        ),
        ('[[noise]]\ntype = "pyramid"\ndiscount = 1.5\n', "noise[0].discount", ["1.5 is not allowed", "<= 1.0"]),
        ('[[noise]]\ntype = "pyramid"\ndiscount = 0.0\n', "noise[0].discount", ["> 0.0"]),
        ('[loss_weighting]\ntype = "min_snr"\ngamma = 0\n', "loss_weighting.gamma", ["0 is not allowed", "> 0.0"]),
        ('[loss_weighting]\ntype = "min_snr"\ngamma = -1.0\n', "loss_weighting.gamma", ["-1.0"]),
        ('[[caption]]\ntype = "dropout"\nrate = 1.2\n', "caption[0].rate", ["1.2", ">= 0.0 and <= 1.0"]),
        ('[[caption]]\ntype = "dropout"\nrate = true\n', "caption[0].rate", ["true is not allowed"]),
        ('[[noise]]\ntype = "pyramd"\n', "noise[0].type", ["Allowed types: gaussian", "Did you mean 'pyramid'"]),
        ("[[noise]]\ndiscount = 0.5\n", "noise[0].type", ["missing 'type'"]),
        ('[noise]\ntype = "pyramid"\n', "noise", ["[[noise]]"]),
        (
            '[loss_weighting]\ntype = "min_snr"\n[loss_weightin]\n',
            "loss_weightin",
            ["unknown section", "Did you mean 'loss_weighting'"],
        ),
        ('[preset]\nnam = "x"\n', "preset.nam", ["Allowed keys: name, description, extends"]),
        ('[memory]\nmixed_precision = "fp8"\n', "memory.mixed_precision", ["'fp8'", "'no', 'fp16', 'bf16'"]),
        ('[optimizer]\ntype = "adamw"\nbetas = [0.9, 1.5]\n', "optimizer.betas[1]", ["< 1.0"]),
        ('[attention]\ntype = "flash"\n', "attention.type", ["sdpa, sliced, xformers"]),
        (
            '[[noise]]\ntype = "pyramid"\nscale_min = 3.0\nscale_max = 2.0\n',
            "noise[0]",
            ["scale_max (2.0) must be >= scale_min (3.0)"],
        ),
        (
            '[[noise]]\ntype = "input_perturbation"\n[[noise]]\ntype = "pyramid"\n',
            "noise[1].type",
            ["input-only strategies last"],
        ),
        ('[memory]\ncache_text_encoder_outputs = true\n[[caption]]\ntype = "shuffle"\n', "caption[0].type", ["'dropout' only"]),
        ('[preset]\nextends = "no-such-preset"\n', "preset.extends", ["neither a preset file nor a shipped preset", "min-snr"]),
        ("[[noise]\n", None, ["not valid TOML"]),
    ],
)
def test_malformed_presets_name_file_key_and_allowed(tmp_path, text, key, words):
    error = error_for(tmp_path, text)
    assert error.key == key
    for word in words:
        assert word in str(error)
    assert str(error).startswith(str(tmp_path / "bad.toml"))


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.toml", '[preset]\nextends = "b.toml"\n')
    write(tmp_path, "b.toml", '[preset]\nextends = "a.toml"\n')
    with pytest.raises(sdplug.PresetError, match="cycle") as info:
        sdplug.load_preset(tmp_path / "a.toml")
    assert info.value.key == "preset.extends"


def test_error_in_a_parent_names_the_parent_file(tmp_path):
    write(tmp_path, "parent.toml", '[[noise]]\ntype = "offset"\nstrength = 5.0\n')
    child = write(tmp_path, "child.toml", '[preset]\nextends = "parent"\n')
    with pytest.raises(sdplug.PresetError) as info:
        sdplug.load_preset(child)
    assert info.value.path == str(tmp_path / "parent.toml") and info.value.key == "noise[0].strength"


def test_missing_file_lists_shipped_presets(tmp_path):
    with pytest.raises(sdplug.PresetError, match="Shipped presets: caption-dropout-cfg"):
        sdplug.load_preset(tmp_path / "nope.toml")


toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["pyramid", "min_snr", "dropout", "adamw8bit", "sdpa", "fp16", "offset", "learned"]),
)
keys = st.one_of(
    st.sampled_from([*SECTIONS, "type", "rate", "discount", "gamma", "extends", "fallback", "betas"]), st.text(max_size=8)
)
values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_fuzzed_preset_data_only_ever_raises_preset_error(data):
    try:
        parse_preset(data, path="fuzz.toml")
    except sdplug.PresetError:
        pass


strategy_tables = st.fixed_dictionaries(
    {"type": st.sampled_from(sdplug.available("noise"))},
    optional={k: toml_scalars for k in ("discount", "strength", "iterations", "variant", "normalize", "alpha", "gamma", "cells")},
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(strategy_tables, max_size=3),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(sdplug.available("caption"))}, optional={"rate": toml_scalars, "keep_tokens": toml_scalars}
        ),
        max_size=2,
    ),
)
def test_fuzzed_strategy_tables_only_ever_raise_preset_error(noise, caption):
    try:
        parse_preset({"noise": noise, "caption": caption}, path="fuzz.toml")
    except sdplug.PresetError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_preset_text_only_ever_raises_preset_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "p.toml"
    path.write_text(text)
    try:
        sdplug.load_preset(path)
    except sdplug.PresetError:
        pass


# -- issue 8, item 9: inputs that used to escape validation ---------------------------------------
@pytest.mark.parametrize("name", ["_path", "_key", "name"])
def test_a_strategy_key_named_like_an_internal_argument_is_just_an_unknown_key(tmp_path, name):
    error = error_for(tmp_path, f'[timesteps]\ntype = "uniform"\n{name} = "x"\n')
    assert error.key == f"timesteps.{name}"
    assert f"unknown key {name!r}" in str(error) and "Allowed keys: min_timestep, max_timestep" in str(error)


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[[noise]]\ntype = "offset"\n')
    assert [s.type for s in sdplug.load_preset(path).noise] == ["offset"]


@pytest.mark.parametrize("text", ["", "\n  \n", "# nothing but a comment\n"])
def test_an_empty_file_is_refused_not_silently_valid(tmp_path, text):
    error = error_for(tmp_path, text)
    assert error.key is None and "the file is empty" in str(error) and "[preset]" in str(error)


def test_a_non_utf8_preset_says_so(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes('[preset]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(sdplug.PresetError, match="not UTF-8 text") as info:
        sdplug.load_preset(path)
    assert info.value.path == str(path)


def write_chain(tmp_path, files):
    for i in range(files - 1):
        write(tmp_path, f"p{i}.toml", f'[preset]\nextends = "p{i + 1}.toml"\n')
    write(tmp_path, f"p{files - 1}.toml", '[[noise]]\ntype = "offset"\n')
    return tmp_path / "p0.toml"


def test_extends_chain_has_a_depth_limit_with_a_clear_error(tmp_path):
    from sdplug.preset.model import MAX_EXTENDS_DEPTH

    (tmp_path / "ok").mkdir()
    assert sdplug.load_preset(write_chain(tmp_path / "ok", MAX_EXTENDS_DEPTH)).noise[0].type == "offset"
    with pytest.raises(sdplug.PresetError, match=f"at most {MAX_EXTENDS_DEPTH} files") as info:
        sdplug.load_preset(write_chain(tmp_path, 1200))  # was a RecursionError
    assert info.value.key == "preset.extends" and "\n" not in str(info.value)


def test_control_characters_round_trip_through_to_toml():
    description = 'a\x7fb\x01c\x1b"\\ \u00e9'  # DEL and C0 controls, quote, backslash, non-ASCII
    preset = parse_preset({"preset": {"name": "x\x01", "description": description}}, path="c.toml")
    again = tomllib.loads(preset.to_toml())
    assert again["preset"] == {"name": "x\x01", "description": description}


def test_check_against_schedule_names_the_file_key_and_range(tmp_path, sd_alphas):
    from sdplug.plan import bind

    parent = write(tmp_path, "parent.toml", '[timesteps]\ntype = "uniform"\nmax_timestep = 5000\n')
    child = write(tmp_path, "child.toml", '[preset]\nextends = "parent"\n')
    with pytest.raises(sdplug.PresetError) as info:
        bind(sdplug.load_preset(child), alphas_cumprod=sd_alphas, prediction_type="epsilon")
    error = info.value
    assert error.path == str(parent) and error.key == "timesteps.max_timestep"  # the file that wrote it
    assert "5000" in str(error) and "max_timestep <= 1000" in str(error)


@pytest.mark.parametrize(
    "table,key",
    [
        ('type = "uniform"\nmin_timestep = 1000\n', "timesteps.min_timestep"),
        ('type = "biased"\nbias = "range"\nbegin = 5000\n', "timesteps.begin"),
        ('type = "biased"\nbias = "range"\nbegin = 10\nend = 1001\n', "timesteps.end"),
        ('type = "biased"\nbias = "range"\nend = 1000\n', "timesteps.end"),  # every step: plain uniform
    ],
)
def test_timestep_parameters_beyond_the_schedule_are_refused_when_bound(tmp_path, sd_alphas, table, key):
    from sdplug.plan import bind

    path = write(tmp_path, "t.toml", f"[timesteps]\n{table}")
    preset = sdplug.load_preset(path)  # validates: the schedule is not known yet
    with pytest.raises(sdplug.PresetError, match="allowed: 0 <=") as info:
        bind(preset, alphas_cumprod=sd_alphas, prediction_type="epsilon")
    assert info.value.path == str(path) and info.value.key == key


def test_timestep_parameters_that_fit_a_longer_schedule_bind(tmp_path, sd_alphas):
    from sdplug.plan import bind

    path = write(tmp_path, "t.toml", '[timesteps]\ntype = "uniform"\nmin_timestep = 100\nmax_timestep = 1000\n')
    plan = bind(sdplug.load_preset(path), alphas_cumprod=sd_alphas, prediction_type="epsilon")
    t = plan.timesteps(64, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 100 and t.max() < 1000
