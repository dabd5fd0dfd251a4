"""The kohya flag table: every argument of sd-scripts main and v0.8.7 classified once, and the
checks and the config bridge that read it (no sd-scripts tree needed)."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

import sdplug
from sdplug.hosts.host_flags import KINDS, is_set
from sdplug.hosts.kohya.config_bridge import from_kohya, to_kohya
from sdplug.hosts.kohya.flags import FAMILIES, FLAGS, HOST_SETTINGS, MEMORY_KEYS, VERSIONS, flags_for
from sdplug.hosts.kohya.reconcile import (
    KohyaConflictError,
    PresetWeightingMarker,
    check_conflicts,
    check_dataset_config,
    reconcile,
)
from sdplug.preset import parse_preset

DATA = Path(__file__).parents[1] / "data" / "kohya_parser_flags.json"
PARSERS = json.loads(DATA.read_text())
HOST_NAMES = [n for names in HOST_SETTINGS.values() for n in names]
SECTIONS = {"noise", "timesteps", "loss", "loss_weighting", "caption", "optimizer", "attention"} | {
    f"memory.{k}" for k in MEMORY_KEYS
}


def parser_names(version: str) -> set[str]:
    return set().union(*PARSERS[version]["scripts"].values())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_parser_argument_is_classified_exactly_once(version):
    names = parser_names(version)
    table = [f.name for f in FLAGS if version in f.versions]
    assert len(table) == len(set(table)), "a flag has two rows for one version"
    assert not set(table) & set(HOST_NAMES), "a flag is both a trick flag and a host setting"
    missing = sorted(names - set(table) - set(HOST_NAMES))
    assert not missing, f"sd-scripts {version} arguments the flag table does not classify: {missing}"
    assert set(table) <= names, f"rows for arguments {version} does not have: {sorted(set(table) - names)}"


def test_table_rows_are_well_formed():
    everywhere = parser_names("main") | parser_names("v0.8.7")
    assert set(HOST_NAMES) - everywhere == {"sdplug_preset"}  # sdplug's own option, added by the patches
    assert len(HOST_NAMES) == len(set(HOST_NAMES))
    for flag in FLAGS:
        assert flag.kind in KINDS and flag.family in FAMILIES and flag.why, flag
        assert set(flag.versions) <= set(VERSIONS), flag
        # a flag the preset takes over names the sections that do; an independent one names none
        assert bool(flag.sections) == (flag.kind != "independent"), flag
        assert set(flag.sections) <= SECTIONS, flag


def test_every_preset_section_takes_over_kohyas_own_flags():
    taken = {s for f in FLAGS for s in f.sections}
    assert taken == SECTIONS


def _preset(data):
    return parse_preset(data, path="p.toml")


def _defaults():
    # the parser defaults of the flags used below, as sd-scripts sets them
    return {"optimizer_args": None, "optimizer_type": "", "mixed_precision": "no", "noise_offset": None, "loss_type": "l2"}


def test_optimizer_args_with_a_preset_optimizer_is_a_conflict():
    preset = _preset({"optimizer": {"type": "adamw", "lr": 1e-4}})
    values = {"optimizer_args": ["weight_decay=0.01", "betas=0.5,0.5"], "optimizer_type": ""}
    for version in VERSIONS:
        with pytest.raises(KohyaConflictError, match=r"sets \[optimizer\] and the kohya command line sets --optimizer_args="):
            check_conflicts(preset, version, values, _defaults())
    check_conflicts(_preset({}), "main", values, _defaults())  # no [optimizer]: kohya's own


def test_conflict_rules_follow_the_table():
    # a value equal to the preset's own is no conflict; another one is
    preset = _preset({"memory": {"mixed_precision": "bf16"}})
    check_conflicts(preset, "main", {"mixed_precision": "bf16"}, _defaults())
    with pytest.raises(KohyaConflictError, match=r"memory.mixed_precision = 'bf16' and .* --mixed_precision=fp16"):
        check_conflicts(preset, "main", {"mixed_precision": "fp16"}, _defaults())
    # v0.8.7 only: a huber loss and sdplug's noise hook
    noise = _preset({"noise": [{"type": "offset"}]})
    check_conflicts(noise, "main", {"loss_type": "huber"}, _defaults())
    with pytest.raises(KohyaConflictError, match="ONE timestep per batch"):
        check_conflicts(noise, "v0.8.7", {"loss_type": "huber"}, _defaults())


def test_is_set_compares_with_the_parser_default():
    assert not is_set(0.3, 0.3) and is_set(0.5, 0.3)  # multires_noise_discount
    assert not is_set(None, "") and not is_set("", None) and is_set("|||", "")
    assert is_set(0.0, 1.0)  # --max_grad_norm 0 turns clipping off: set


def test_reconcile_changes_what_the_preset_takes_over():
    preset = _preset({"caption": [{"type": "dropout", "rate": 0.1}], "optimizer": {"type": "adamw", "lr": 1e-3}})
    values = {
        "max_data_loader_n_workers": 4,
        "persistent_data_loader_workers": True,
        "learning_rate": 1e-4,
        "learning_rate_te": 5e-5,
        "lr_scheduler": "cosine",
        "some_new_flag": 3,
    }
    defaults = {"max_data_loader_n_workers": 8, "learning_rate": 2e-6, "lr_scheduler": "constant"}
    result = reconcile(preset, "main", values, defaults, script="train_db.py", lr=1e-3)
    assert result.changes == {
        "max_data_loader_n_workers": 0,
        "persistent_data_loader_workers": False,
        "learning_rate": 1e-3,
        "learning_rate_te": 1e-3,  # train_db/fine_tune's text-encoder lr follows the preset too
    }
    assert "--learning_rate 0.0001 -> 0.001, --learning_rate_te 5e-05 -> 0.001 (preset [optimizer] lr)" in result.rules
    assert result.flags["lr_scheduler"].startswith("independent (optimizer)")
    assert result.flags["learning_rate"].startswith("reconciled (optimizer)")
    assert result.unclassified == ["some_new_flag"]


def test_dataset_config_caption_keys_are_refused(tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_tag_dropout_rate = 0.1\n')
    preset = _preset({"caption": [{"type": "shuffle"}]})
    with pytest.raises(KohyaConflictError, match=r"caption_tag_dropout_rate = 0.1 in \[\[datasets.subsets\]\] 1.1"):
        check_dataset_config(preset, str(config), {"caption_tag_dropout_rate": 0.0})
    check_dataset_config(_preset({}), str(config), {})  # no [caption]: kohya's own


def test_from_kohya_notes_every_trick_key_it_does_not_translate():
    bridged = from_kohya(
        {
            "noise_offset": 0.05,
            "masked_loss": True,
            "keep_tokens_separator": "|||",
            "token_warmup_step": 100,
            "lr_scheduler": "cosine",
            "output_dir": "out",
            "made_up_key": 1,
        }
    )
    notes = {n.split(":")[0]: n for n in bridged.notes}
    assert set(notes) == {"masked_loss", "keep_tokens_separator", "token_warmup_step", "lr_scheduler", "made_up_key"}
    assert notes["masked_loss"] == "masked_loss: stays a kohya setting: " + flags_for("main")["masked_loss"].why
    assert notes["lr_scheduler"].startswith("lr_scheduler: stays a kohya setting:")
    assert "not an argument of sd-scripts" in notes["made_up_key"]


def test_to_kohya_writes_only_keys_of_the_table():
    preset = _preset(
        {
            "noise": [{"type": "offset", "strength": 0.1}, {"type": "input_perturbation", "gamma": 0.1}],
            "timesteps": {"type": "uniform", "min_timestep": 100, "max_timestep": 900},
            "loss_weighting": {"type": "min_snr", "gamma": 5.0},
            "caption": [{"type": "dropout", "rate": 0.1, "every_n_epochs": 2}, {"type": "shuffle", "keep_tokens": 1}],
            "optimizer": {"type": "adamw", "lr": 1e-4, "weight_decay": 0.01},
            "attention": {"type": "sdpa"},
            "memory": {"gradient_checkpointing": True, "mixed_precision": "bf16", "cache_latents": True},
        }
    )
    keys = set(to_kohya(preset).data)
    assert keys <= set(flags_for("main")) & set(flags_for("v0.8.7"))


KOHYA_CONFIG = {
    "noise_offset": 0.05,
    "min_snr_gamma": 5,
    "caption_dropout_rate": 0.1,
    "caption_dropout_every_n_epochs": 3,
    "shuffle_caption": True,
    "keep_tokens": 1,
    "optimizer_type": "AdamW8bit",
    "learning_rate": 1e-4,
    "optimizer_args": ["weight_decay=0.05", "betas=0.9,0.99"],
    "xformers": True,
    "gradient_checkpointing": True,
    "mixed_precision": "fp16",
    "cache_latents": True,
}


def test_from_kohya_builds_a_valid_preset():
    bridged = from_kohya(KOHYA_CONFIG)
    preset = parse_preset(bridged.data, path="kohya.toml")
    assert [s.type for s in preset.noise] == ["offset"] and preset.noise[0].params == {"strength": 0.05}
    assert preset.loss_weighting.type == "min_snr" and preset.loss_weighting.params == {"gamma": 5.0}
    assert [(s.type, dict(s.params)) for s in preset.caption] == [
        ("dropout", {"rate": 0.1, "every_n_epochs": 3}),
        ("shuffle", {"keep_tokens": 1}),
    ]
    assert preset.optimizer.type == "adamw8bit"
    assert preset.optimizer.params == {"lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.99]}
    assert preset.attention.type == "xformers"
    assert preset.memory.gradient_checkpointing and preset.memory.mixed_precision == "fp16" and preset.memory.cache_latents
    assert bridged.notes == []


def test_to_kohya_round_trips_what_kohya_can_express():
    preset = parse_preset(from_kohya(KOHYA_CONFIG).data, path="kohya.toml")
    config = to_kohya(preset).data
    for key, value in KOHYA_CONFIG.items():
        if key == "optimizer_args":  # and the eps kohya's config left at the optimizer's default
            eps = sdplug.create("optimizer", "adamw8bit").eps
            assert sorted(config[key]) == ["betas=0.9,0.99", f"eps={eps}", "weight_decay=0.05"]
        else:
            assert config[key] == value, key


def test_bridges_name_what_they_cannot_carry():
    bridged = from_kohya(
        {"multires_noise_iterations": 6, "multires_noise_discount": 0.3, "optimizer_type": "DAdaptLion", "token_warmup_step": 10}
    )
    # kohya's multires noise is the "kohya" pyramid variant exactly, both ways
    assert bridged.data["noise"] == [{"type": "pyramid", "variant": "kohya", "discount": 0.3, "iterations": 6}]
    assert to_kohya(parse_preset(bridged.data, path="k.toml")).data == {
        "multires_noise_iterations": 6,
        "multires_noise_discount": 0.3,
    }
    assert any("DAdaptLion" in n for n in bridged.notes) and any("token_warmup_step" in n for n in bridged.notes)
    preset = parse_preset(
        {"noise": [{"type": "perlin"}], "loss_weighting": {"type": "learned"}, "timesteps": {"type": "logit_normal"}},
        path="p.toml",
    )
    cannot = to_kohya(preset).notes
    assert any("perlin" in n for n in cannot) and any("learned" in n for n in cannot) and any("logit_normal" in n for n in cannot)


# strategies whose every parameter is left at its default (pyramid: kohya's variant, as kohya has only that)
DEFAULTS_ONLY = {
    "noise": [{"type": "offset"}, {"type": "pyramid", "variant": "kohya"}, {"type": "input_perturbation"}],
    "timesteps": {"type": "uniform"},
    "loss_weighting": {"type": "min_snr"},
    "caption": [{"type": "dropout"}, {"type": "tag_dropout"}, {"type": "shuffle"}],
    "optimizer": {"type": "lion8bit"},
}


def test_to_kohya_writes_the_strategies_own_defaults():
    config = to_kohya(_preset(DEFAULTS_ONLY)).data
    assert config["noise_offset"] == sdplug.create("noise", "offset").strength
    pyramid = sdplug.create("noise", "pyramid")
    assert (config["multires_noise_iterations"], config["multires_noise_discount"]) == (pyramid.iterations, pyramid.discount)
    assert config["ip_noise_gamma"] == sdplug.create("noise", "input_perturbation").gamma
    uniform = sdplug.create("timesteps", "uniform")
    assert config["min_timestep"] == uniform.min_timestep and uniform.max_timestep is None and "max_timestep" not in config
    assert config["min_snr_gamma"] == sdplug.create("loss_weighting", "min_snr").gamma
    assert config["caption_dropout_rate"] == sdplug.create("caption", "dropout").rate
    assert config["caption_tag_dropout_rate"] == sdplug.create("caption", "tag_dropout").rate
    assert config["keep_tokens"] == sdplug.create("caption", "shuffle").keep_tokens
    # kohya's Lion8bit is bitsandbytes' at weight decay 0; the preset's means the strategy's
    lion = sdplug.create("optimizer", "lion8bit")
    written = sorted(config["optimizer_args"])
    assert written == sorted([f"weight_decay={lion.weight_decay}", "betas=" + ",".join(str(b) for b in lion.betas)])
    assert "learning_rate" not in config  # no lr in the preset: kohya's --learning_rate rules, as in the adapter
    assert to_kohya(_preset(DEFAULTS_ONLY)).notes == []


def test_to_kohya_follows_a_changed_strategy_default(monkeypatch):
    from sdplug.params import strategy_params
    from sdplug.strategies import registry
    from sdplug.strategies.noise import OffsetNoise

    @strategy_params
    class ChangedDefault(OffsetNoise):
        strength: float = 0.37

    entries = registry("noise")._entries  # the registered offset noise, with another default
    monkeypatch.setitem(entries, "offset", dataclasses.replace(entries["offset"], cls=ChangedDefault))
    assert to_kohya(_preset({"noise": [{"type": "offset"}]})).data == {"noise_offset": 0.37}


def test_to_kohya_names_keep_tokens_it_cannot_keep_apart():
    preset = _preset({"caption": [{"type": "shuffle", "keep_tokens": 1}, {"type": "tag_dropout", "keep_tokens": 2}]})
    bridged = to_kohya(preset)
    assert bridged.data["keep_tokens"] == 2
    assert any(n.startswith("keep_tokens: kohya has one") for n in bridged.notes)


def test_reconcile_is_pure_and_returns_every_change_it_makes():
    preset = _preset(
        {
            "caption": [{"type": "dropout", "rate": 0.1}],
            "loss_weighting": {"type": "min_snr"},
            "optimizer": {"type": "adamw", "lr": 1e-3},
            "memory": {"gradient_checkpointing": True, "mixed_precision": "bf16"},
        }
    )
    values = {
        "max_data_loader_n_workers": 4,
        "learning_rate": 1e-4,
        "text_encoder_lr": [0.0, 3e-4],
        "gradient_checkpointing": False,
        "mixed_precision": "no",
    }
    defaults = {"max_data_loader_n_workers": 8, "learning_rate": 2e-6, "mixed_precision": "no"}
    given = copy.deepcopy(values)
    # read-only mappings: a write to kohya's values or defaults would raise
    first = reconcile(preset, "main", MappingProxyType(given), MappingProxyType(defaults), script="train_network.py", lr=1e-3)
    second = reconcile(preset, "main", MappingProxyType(given), MappingProxyType(defaults), script="train_network.py", lr=1e-3)
    assert given == values  # the lists inside untouched too
    assert (first.changes, first.rules, first.flags) == (second.changes, second.rules, second.flags)
    # kohya calls its weighting function only with --min_snr_gamma set: the marker that routes it to the preset's
    assert isinstance(first.changes.pop("min_snr_gamma"), PresetWeightingMarker)
    assert first.changes == {
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "max_data_loader_n_workers": 0,
        "persistent_data_loader_workers": False,
        "learning_rate": 1e-3,
        "text_encoder_lr": [0.0, 1e-3],  # an lr of 0 (a part left untrained) stays 0
    }
    assert "min_snr_gamma" not in reconcile(_preset({}), "main", given, defaults, script="train_network.py", lr=None).changes


# -- a real sd-scripts checkout (skipped unless SDPLUG_KOHYA_DIR points to one) -------------------
KOHYA_DIR = os.environ.get("SDPLUG_KOHYA_DIR")


@pytest.mark.skipif(not KOHYA_DIR, reason="set SDPLUG_KOHYA_DIR (and SDPLUG_KOHYA_PYTHON) to read a real checkout's parsers")
def test_real_sd_scripts_parsers_are_classified_and_the_names_file_is_current():
    from sdplug.hosts.kohya.version import detect

    version = detect(Path(KOHYA_DIR)).name
    python = os.environ.get("SDPLUG_KOHYA_PYTHON", sys.executable)
    script = Path(__file__).parent / "kohya_parser_flags.py"
    built = subprocess.run([python, str(script), KOHYA_DIR], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    real = {name: set(flags) - {"sdplug_preset"} for name, flags in json.loads(built.stdout).items()}  # patched trees
    names = set().union(*real.values())
    missing = sorted(names - set(flags_for(version)) - set(HOST_NAMES))
    assert not missing, f"arguments of {KOHYA_DIR} ({version}) the flag table does not classify: {missing}"
    committed = {name: set(flags) for name, flags in PARSERS[version]["scripts"].items()}
    assert real == committed, (
        f"{DATA} is not current for {KOHYA_DIR}: regenerate it with "
        f"`python tests/hosts/kohya_parser_flags.py {KOHYA_DIR} --write {version}`"
    )


def test_loss_types_schedule_and_noise_extras_round_trip_through_the_bridge():
    kohya = {
        "loss_type": "huber",
        "huber_c": 0.2,
        "huber_schedule": "exponential",
        "huber_scale": 2.0,
        "noise_offset": 0.05,
        "noise_offset_random_strength": True,
        "adaptive_noise_scale": 0.01,
        "ip_noise_gamma": 0.1,
        "ip_noise_gamma_random_strength": True,
        "zero_terminal_snr": True,
        "v_parameterization": True,
        "v_pred_like_loss": 0.2,
    }
    bridged = from_kohya(kohya)
    preset = _preset(bridged.data)
    assert preset.loss.type == "pseudo_huber" and preset.loss.create().schedule == "exponential"
    assert preset.schedule.zero_terminal_snr and preset.loss_weighting.type == "v_pred_like_loss"
    offset, perturbation = (spec.create() for spec in preset.noise)
    assert offset.random_strength and offset.adaptive_scale == 0.01 and perturbation.random_strength
    back = to_kohya(preset).data
    assert {k: back[k] for k in kohya if k != "v_parameterization"} == {
        k: v for k, v in kohya.items() if k != "v_parameterization"
    }
    assert not [n for n in bridged.notes if "loss_type" in n or "huber" in n or "zero_terminal" in n]
    # kohya's smooth_l1 is sdplug's smooth_l1; l2 is the default (no [loss])
    assert _preset(from_kohya({"loss_type": "smooth_l1"}).data).loss.type == "smooth_l1"
    assert "loss" not in from_kohya({"loss_type": "l2"}).data


def test_a_flag_that_clashes_with_two_sections_names_both():
    from sdplug.hosts.kohya.reconcile import KohyaConflictError, check_conflicts

    preset = _preset({"noise": [{"type": "pyramid"}], "loss": {"type": "pseudo_huber"}})
    with pytest.raises(KohyaConflictError) as caught:
        check_conflicts(preset, "v0.8.7", {"loss_type": "huber"}, {"loss_type": "l2"})
    message = str(caught.value)
    assert "sets [noise] and the kohya command line sets --loss_type=huber" in message
    assert "sets [loss] and the kohya command line sets --loss_type=huber" in message
