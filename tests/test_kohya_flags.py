"""The kohya flag table: every argument of sd-scripts main and v0.8.7 classified once, and the
checks and the config bridge that read it (no sd-scripts tree needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdplug.hosts.kohya.config_bridge import from_kohya, to_kohya
from sdplug.hosts.kohya.flags import FAMILIES, FLAGS, HOST_SETTINGS, KINDS, MEMORY_KEYS, VERSIONS, flags_for, is_set
from sdplug.hosts.kohya.reconcile import KohyaConflictError, check_conflicts, check_dataset_config, reconcile
from sdplug.presets import parse_preset

DATA = Path(__file__).parent / "data" / "kohya_parser_flags.json"
PARSERS = json.loads(DATA.read_text())
HOST_NAMES = [n for names in HOST_SETTINGS.values() for n in names]
SECTIONS = {"noise", "timesteps", "loss_weighting", "caption", "optimizer", "attention"} | {f"memory.{k}" for k in MEMORY_KEYS}


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
            "adaptive_noise_scale": 0.01,
            "keep_tokens_separator": "|||",
            "token_warmup_step": 100,
            "lr_scheduler": "cosine",
            "output_dir": "out",
            "made_up_key": 1,
        }
    )
    notes = {n.split(":")[0]: n for n in bridged.notes}
    assert set(notes) == {"adaptive_noise_scale", "keep_tokens_separator", "token_warmup_step", "lr_scheduler", "made_up_key"}
    assert (
        notes["adaptive_noise_scale"]
        == "adaptive_noise_scale: not carried over: " + flags_for("main")["adaptive_noise_scale"].why
    )
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
        f"`python tests/kohya_parser_flags.py {KOHYA_DIR} --write {version}`"
    )
