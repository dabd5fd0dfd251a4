"""The kohya adapter inside sd-scripts trees (stand-ins of main and v0.8.7, both routes):
flags written at kohya's default value, the saved network's metadata, a v-prediction model
trained without --v_parameterization, and the launcher's documented command."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdplug.hosts.kohya import launcher
from sdplug.hosts.kohya.flags import flags_for
from sdplug.hosts.kohya.reconcile import KohyaConflictError, check_conflicts, check_dataset_config, reconcile
from sdplug.hosts.kohya.saved_metadata import METADATA_KEYS, corrected_metadata
from sdplug.preset import parse_preset
from tests.hosts.kohya_standin import make_standin
from tests.hosts.make_kohya_patches import make_patches

ROOT = Path(__file__).resolve().parents[2]


def run(command, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def launch(preset: Path, root: Path, out: Path, *extra: str, script: str = "train_network.py"):
    """``sdplug kohya`` (the launcher route) on a stand-in tree, 2 steps."""
    command = ["-m", "sdplug", "kohya", "--preset", str(preset), "--sd-scripts", str(root), "--", script]
    return run([*command, "--output_dir", str(out), "--max_train_steps", "2", *extra])


def patched(tmp_path: Path, version: str) -> Path:
    """A stand-in tree with sdplug's patches applied (the patch route: ``--sdplug_preset``)."""
    from sdplug.hosts.kohya import patching

    root = make_standin(tmp_path / f"sd-{version}", version)
    patches = tmp_path / "patches"
    (patches / "manifest.json").parent.mkdir(parents=True, exist_ok=True)
    (patches / "manifest.json").write_text(json.dumps({version: make_patches(root, version, patches)}))
    original = patching.patches_dir
    patching.patches_dir = lambda: patches
    try:
        patching.apply(root)
    finally:
        patching.patches_dir = original
    return root


def run_patched(root: Path, preset: Path, out: Path, *extra: str):
    command = [str(root / "train_network.py"), "--output_dir", str(out), "--max_train_steps", "2", *extra]
    return run([*command, "--sdplug_preset", str(preset)], cwd=root)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


LOSS_PRESET = '[loss]\ntype = "smooth_l1"\nschedule = "constant"\nc = 0.2\n'


# -- a flag written at kohya's default value is what the user wrote --------------------------------
@pytest.mark.parametrize("version", ["main", "v0.8.7"])
def test_loss_type_written_at_its_default_is_refused_with_a_loss_section(tmp_path, version):
    preset = write(tmp_path / "loss.toml", LOSS_PRESET)
    root = make_standin(tmp_path / "sd", version)
    out = tmp_path / "o"
    result = launch(preset, root, out, "--loss_type", "l2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "sets [loss] and the kohya command line sets --loss_type=l2" in result.stderr
    assert "Traceback" not in result.stderr and not (out / "standin-model-loaded").exists()
    audit = json.loads((out / "audit.json").read_text())
    assert audit["steps"] == 0 and "--loss_type=l2" in audit["problems"][0]


def test_a_config_file_key_at_its_default_is_refused_like_the_command_line(tmp_path):
    preset = write(tmp_path / "loss.toml", LOSS_PRESET)
    root = make_standin(tmp_path / "sd", "main")
    config = write(tmp_path / "kohya.toml", '[training]\nloss_type = "l2"\n')
    out = tmp_path / "o"
    result = launch(preset, root, out, "--config_file", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--loss_type=l2" in result.stderr and not (out / "standin-model-loaded").exists()


def test_the_patch_route_refuses_a_flag_written_at_its_default(tmp_path):
    preset = write(tmp_path / "loss.toml", LOSS_PRESET)
    root = patched(tmp_path, "main")
    out = tmp_path / "o"
    result = run_patched(root, preset, out, "--loss_type", "l2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--loss_type=l2" in result.stderr and not (out / "standin-model-loaded").exists()


def test_off_values_and_the_l2_the_table_asks_for_train_and_written_flags_are_audited(tmp_path):
    # v0.8.7 with [[noise]]: the flag table's advice is --loss_type l2; --noise_offset 0 leaves
    # kohya's offset off, as its default does; --max_grad_norm 1.0 is kohya's default, written
    preset = write(tmp_path / "noise.toml", '[[noise]]\ntype = "pyramid"\n')
    root = make_standin(tmp_path / "sd", "v0.8.7")
    out = tmp_path / "o"
    result = launch(preset, root, out, "--loss_type", "l2", "--noise_offset", "0", "--max_grad_norm", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    flags = json.loads((out / "audit.json").read_text())["host"]["kohya_flags"]
    assert flags["max_grad_norm"].startswith("independent (optimizer)")
    assert flags["loss_type"].startswith("conflict (loss_weighting)")  # written: listed, and at l2 no refusal
    assert "noise_offset" not in flags


def test_conflicts_and_the_audit_classify_what_was_written():
    preset = parse_preset({"loss": {"type": "smooth_l1"}, "noise": [{"type": "offset"}]}, path="p.toml")
    values = {"loss_type": "l2", "huber_c": 0.1, "noise_offset": 0.0, "max_grad_norm": 1.0}
    defaults = {"loss_type": "l2", "huber_c": 0.1, "noise_offset": None, "max_grad_norm": 1.0}
    check_conflicts(preset, "main", values, defaults)  # nothing written: kohya's defaults are no conflict
    with pytest.raises(KohyaConflictError, match=r"--loss_type=l2.*--huber_c=0.1|--huber_c=0.1.*--loss_type=l2"):
        check_conflicts(preset, "main", values, defaults, written={"loss_type", "huber_c", "noise_offset"})
    check_conflicts(preset, "main", values, defaults, written={"noise_offset"})  # an explicit 0: kohya's offset stays off
    result = reconcile(preset, "main", values, defaults, script="train_network.py", lr=None, written={"max_grad_norm"})
    assert set(result.flags) == {"max_grad_norm"}


def test_dataset_config_keys_written_at_their_default_are_refused(tmp_path):
    preset = parse_preset({"caption": [{"type": "shuffle"}]}, path="p.toml")
    config = write(tmp_path / "dataset.toml", '[general]\nshuffle_caption = false\ncaption_separator = ","\n')
    with pytest.raises(KohyaConflictError, match=r"caption_separator = ',' in \[general\]") as refused:
        check_dataset_config(preset, str(config), {"shuffle_caption": False, "caption_separator": ","})
    assert "shuffle_caption" not in str(refused.value)  # false: kohya's shuffle stays off, as by default


# -- the saved network's metadata says what ran ----------------------------------------------------
METADATA_PRESET = """
[loss]
type = "smooth_l1"
schedule = "constant"
c = 0.2

[loss_weighting]
type = "debiased"

[[caption]]
type = "shuffle"
keep_tokens = 1

[[caption]]
type = "dropout"
rate = 0.1
"""


@pytest.mark.parametrize(("version", "route"), [("main", "launcher"), ("v0.8.7", "launcher"), ("main", "patch")])
def test_the_saved_networks_kohya_metadata_says_what_the_preset_ran(tmp_path, version, route):
    preset = write(tmp_path / "p.toml", METADATA_PRESET)
    out = tmp_path / "o"
    extra = ("--network_module", "networks.lora")
    if route == "launcher":
        result = launch(preset, make_standin(tmp_path / "sd", version), out, *extra)
    else:
        result = run_patched(patched(tmp_path, version), preset, out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((out / "last.safetensors").read_text())["metadata"]
    assert {k: metadata[k] for k in ("ss_loss_type", "ss_huber_schedule", "ss_huber_c")} == {
        "ss_loss_type": "smooth_l1",
        "ss_huber_schedule": "constant",
        "ss_huber_c": "0.2",
    }
    assert metadata["ss_debiased_estimation"] == "True" and metadata["ss_min_snr_gamma"] == "None"
    assert metadata["ss_shuffle_caption"] == "True" and metadata["ss_keep_tokens"] == "1"
    assert metadata["ss_caption_dropout_rate"] == "0.1"
    assert ("ss_huber_scale" in metadata) == (version == "main") and metadata.get("ss_huber_scale", "1.0") == "1.0"
    described = json.loads(metadata["ss_sdplug_preset"])
    assert described["name"] == "p" and "ss_loss_type" in described["set_keys"]
    assert described["sections"]["loss"] == [{"type": "smooth_l1", "schedule": "constant", "c": 0.2}]
    assert metadata["ss_noise_offset"] == "None"  # no preset section replaced kohya's noise: kohya's own key
    assert "ss_noise_offset" not in described["set_keys"]


def _metadata(**keys: object) -> dict[str, str]:
    return {k: str(v) for k, v in keys.items()}


def test_metadata_keys_take_each_strategys_kohya_value_or_say_sdplug_ran_it():
    preset = parse_preset(
        {
            "noise": [{"type": "pyramid", "variant": "kohya", "iterations": 6, "discount": 0.4}],
            "loss": {"type": "huber", "delta": 0.5},
            "loss_weighting": {"type": "min_snr", "gamma": 3.0},
        },
        path="mix.toml",
    )
    kohya = _metadata(
        ss_multires_noise_iterations=None,
        ss_multires_noise_discount=0.3,
        ss_noise_offset=None,
        ss_loss_type="l2",
        ss_min_snr_gamma="sdplug-preset-weighting",
        ss_debiased_estimation=False,
        ss_shuffle_caption=False,
        ss_learning_rate=1e-4,
    )
    fixed = corrected_metadata(kohya, preset)
    assert fixed["ss_multires_noise_iterations"] == "6" and fixed["ss_multires_noise_discount"] == "0.4"
    assert fixed["ss_noise_offset"] == "None"  # kohya's offset did not run
    assert fixed["ss_loss_type"] == "sdplug:huber"  # a loss kohya has no name for
    assert fixed["ss_min_snr_gamma"] == "3.0" and fixed["ss_debiased_estimation"] == "False"
    assert fixed["ss_shuffle_caption"] == "False" and fixed["ss_learning_rate"] == "0.0001"  # no [caption]; not a trick key
    assert "ss_huber_c" not in fixed  # keys kohya did not write are not added
    assert kohya["ss_loss_type"] == "l2"  # the caller's dict is left as it was


def test_dataset_subsets_in_the_metadata_are_corrected_too():
    preset = parse_preset({"caption": [{"type": "shuffle", "keep_tokens": 2}]}, path="c.toml")
    datasets = [{"subsets": [{"shuffle_caption": False, "keep_tokens": 0, "num_repeats": 3}]}]
    fixed = corrected_metadata({"ss_datasets": json.dumps(datasets)}, preset)
    assert json.loads(fixed["ss_datasets"]) == [{"subsets": [{"shuffle_caption": True, "keep_tokens": 2, "num_repeats": 3}]}]


def test_no_metadata_saves_only_kohyas_minimum_keys(monkeypatch):
    import types
    from types import SimpleNamespace

    from sdplug.hosts.kohya import saved_metadata
    from sdplug.hosts.kohya.runtime import KohyaAdapter
    from sdplug.hosts.kohya.version import KNOWN

    saved = {}
    module = types.ModuleType("standin_networks")
    module.create_network = lambda *a, **k: SimpleNamespace(save_weights=lambda f, d, m: saved.update({f: m}))
    monkeypatch.setitem(sys.modules, "standin_networks", module)
    adapter = KohyaAdapter(parse_preset({"loss": {"type": "l1"}}, path="l.toml"), KNOWN[0], "train_network.py")
    for no_metadata in (True, False):
        saved_metadata.install(adapter, SimpleNamespace(network_module="standin_networks", no_metadata=no_metadata))
        module.create_network().save_weights(f"{no_metadata}.safetensors", None, {"ss_network_module": "standin_networks"})
        adapter.session.undo()
    assert saved["True.safetensors"] == {"ss_network_module": "standin_networks"}  # nothing added
    assert "ss_sdplug_preset" in saved["False.safetensors"]


def test_the_metadata_keys_follow_the_flag_table():
    # a key is rewritten only for sections the table says take its flag over
    for version in ("main", "v0.8.7"):
        table = flags_for(version)
        for flag, (_, sections) in METADATA_KEYS.items():
            if flag in table:
                assert set(sections) <= set(table[flag].sections), (version, flag)


# -- a v-prediction model trained as epsilon -------------------------------------------------------
def _model(tmp_path: Path, prediction_type: str) -> Path:
    folder = tmp_path / "model"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction_type}))
    return folder


def test_a_v_prediction_model_without_v_parameterization_is_warned_and_audited(tmp_path):
    preset = write(tmp_path / "w.toml", '[loss_weighting]\ntype = "min_snr"\n')
    root = make_standin(tmp_path / "sd", "main")
    model = _model(tmp_path, "v_prediction")
    out = tmp_path / "o"
    result = launch(preset, root, out, "--pretrained_model_name_or_path", str(model))
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if "v_prediction" in line and "--v_parameterization" in line]
    assert warning and str(model) in warning[0]
    host = json.loads((out / "audit.json").read_text())["host"]
    assert host["model_prediction_type"]["declared"] == "v_prediction"
    assert (
        host["model_prediction_type"]["trained_as"] == "epsilon"
        and "--v_parameterization" in host["model_prediction_type"]["warning"]
    )
    assert host["prediction_type"] == "epsilon"


def test_a_model_trained_as_it_declares_is_recorded_without_a_warning(tmp_path, caplog):
    from types import SimpleNamespace

    from sdplug.hosts.kohya.model_prediction import check_prediction_type

    model = _model(tmp_path, "v_prediction")
    with caplog.at_level("WARNING", logger="sdplug"):
        record = check_prediction_type(SimpleNamespace(pretrained_model_name_or_path=str(model), v_parameterization=True))
    assert record == {
        "declared": "v_prediction",
        "by": str(model / "scheduler" / "scheduler_config.json"),
        "trained_as": "v_prediction",
    }
    assert not caplog.records
    single_file = SimpleNamespace(pretrained_model_name_or_path=str(tmp_path / "sd15.safetensors"), v_parameterization=False)
    assert check_prediction_type(single_file) is None  # a single-file checkpoint declares nothing


# -- the launcher's documented commands ------------------------------------------------------------
def test_every_module_the_launcher_documents_runs():
    commands = [line.strip() for line in launcher.__doc__.splitlines() if " -m " in line]
    assert commands, "the launcher documents its `-m` form"
    for command in commands:
        words = command.split(" -m ", 1)[1].split()
        module = words[0]
        subcommand = list(itertools.takewhile(lambda w: not w.startswith("-"), words[1:]))
        result = run(["-m", module, *subcommand, "--help"])
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert re.search(r"usage: sdplug kohya", result.stdout), command


# -- a run that goes non-finite ------------------------------------------------------------------------
@pytest.mark.parametrize(("nan_at", "stopped_by"), [(2, "instead of training on"), (4, "instead of saving last.safetensors")])
def test_a_run_gone_non_finite_stops_fails_and_saves_no_network(tmp_path, nan_at, stopped_by):
    """The loss turns NaN in step nan_at + 1 (of 5): the plan sees the trained weights go
    non-finite after that optimizer step; sd-scripts is stopped at its next step, or, on the last
    step, at the save -- never a network file of non-finite weights, a non-zero exit, and the
    audit names the step."""
    preset = write(tmp_path / "p.toml", '[optimizer]\ntype = "adamw"\nlr = 1e-3\n')
    out = tmp_path / "o"
    extra = ("--network_module", "networks.lora", "--max_train_steps", "5", "--nan_loss_at_step", str(nan_at))
    result = launch(preset, make_standin(tmp_path / "sd", "main"), out, *extra)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (out / "last.safetensors").exists()
    audit = json.loads((out / "audit.json").read_text())
    assert audit["completed"] is False and audit["divergence"]["first_step"] == nan_at + 1
    assert audit["divergence"]["seen_in"].startswith("the trained weights")
    assert any(f"non-finite at step {nan_at + 1}" in p for p in audit["problems"])
    assert stopped_by in result.stderr
