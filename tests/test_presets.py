"""Presets: shipped ones validate; every kind of mistake is one PresetError naming file and key."""

import glob
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdplug
from sdplug.presets import SECTIONS, parse_preset, tomllib

ROOT = Path(__file__).resolve().parent.parent
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
