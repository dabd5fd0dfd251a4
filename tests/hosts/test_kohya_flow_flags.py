"""sd-scripts main's flow scripts: what each does with the trick flags it accepts, held to the real
parsers' arguments, and ``sdplug check kohya`` on a stand-in tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdplug.cli import main as cli_main
from sdplug.hosts.kohya import flag_check
from sdplug.hosts.kohya.flags import FLAGS, HOST_SETTINGS
from sdplug.hosts.kohya.flow_flags import (
    FLOW_HOST_SETTINGS,
    FLOW_SCRIPTS,
    FLOW_TRICKS,
    SCRIPT_EFFECTS,
    TEXT_ENCODERS,
)
from tests.hosts.kohya_flow_standin import PARSERS, make_flow_scripts
from tests.hosts.kohya_standin import make_standin

FLOW_PARSERS = json.loads(PARSERS.read_text())
SD_PARSERS = json.loads((Path(__file__).parents[1] / "data" / "kohya_parser_flags.json").read_text())


def test_the_flow_parsers_were_read_from_the_tree_the_sd_scripts_parsers_were():
    assert FLOW_PARSERS["commit"] == SD_PARSERS["main"]["commit"]
    assert sorted(FLOW_PARSERS["scripts"]) == sorted(FLOW_SCRIPTS) == sorted(TEXT_ENCODERS)


@pytest.mark.parametrize("script", FLOW_SCRIPTS)
def test_every_argument_of_a_flow_script_is_accounted_for(script):
    """Each argument the flow script adds to train_network's is a flow trick, a host setting, a
    flag with a script effect, or already in the SD scripts' table; none is two of the first two."""
    base = set(SD_PARSERS["main"]["scripts"]["train_network.py"])
    arguments = set(FLOW_PARSERS["scripts"][script])
    assert base <= arguments  # every flow script inherits train_network's parser
    known = {f.name for f in FLAGS} | {n for names in HOST_SETTINGS.values() for n in names}
    settings = {n for names in FLOW_HOST_SETTINGS.values() for n in names}
    with_effects = {n for row in SCRIPT_EFFECTS for n in row.names}
    for name in sorted(arguments - base):
        places = [name in FLOW_TRICKS, name in settings, name in known]
        assert sum(places) == 1 or (sum(places) == 0 and name in with_effects), name
    assert not set(FLOW_TRICKS) & settings


def test_every_script_effect_names_flags_its_scripts_accept():
    """A row about a flag a script does not accept would be a mistake in the table."""
    for row in SCRIPT_EFFECTS:
        for script in row.scripts:
            for name in row.names:
                assert name in FLOW_PARSERS["scripts"][script], (script, name)


def defaults(script: str, **given) -> dict:
    values = {name: spec["default"] for name, spec in FLOW_PARSERS["scripts"][script].items()}
    return {**values, **given}


def found(script: str, **given) -> dict[str, str]:
    return {f.flag: f.effect for f in flag_check.findings(script, defaults(script, **given), set(given))}


@pytest.mark.parametrize("script", FLOW_SCRIPTS)
def test_the_sd_scripts_noise_and_weighting_flags_do_nothing_in_every_flow_script(script):
    given = {"noise_offset": 0.1, "multires_noise_iterations": 6, "min_snr_gamma": 5.0, "debiased_estimation_loss": True}
    assert found(script, **given) == dict.fromkeys(given, "ignored")


def test_input_perturbation_acts_in_the_flux_draw_and_not_in_sd3s():
    assert found("flux_train_network.py", ip_noise_gamma=0.1) == {}
    assert found("sd3_train_network.py", ip_noise_gamma=0.1) == {"ip_noise_gamma": "ignored"}
    assert found("flux_train_network.py", ip_noise_gamma_random_strength=True) == {"ip_noise_gamma_random_strength": "ignored"}


def test_a_timestep_range_acts_in_sd3_only():
    assert found("sd3_train_network.py", min_timestep=100, max_timestep=900) == {}
    assert found("flux_train_network.py", min_timestep=100) == {"min_timestep": "ignored"}


def test_the_weighting_scheme_acts_only_with_what_each_script_needs():
    flux, sd3, anima = "flux_train_network.py", "sd3_train_network.py", "anima_train_network.py"
    # logit_normal / mode shape the draw: with timestep_sampling sigma (flux's default), always on SD3
    assert found(flux, weighting_scheme="logit_normal", logit_mean=0.5) == {}
    assert found(flux, weighting_scheme="logit_normal", timestep_sampling="shift", logit_mean=0.5) == {
        "weighting_scheme": "ignored",
        "logit_mean": "ignored",
    }
    assert found(anima, weighting_scheme="mode") == {"weighting_scheme": "ignored"}  # anima's default: sigmoid
    assert found(sd3, weighting_scheme="mode", mode_scale=1.29) == {}
    # sigma_sqrt / cosmap weight the loss: with sigma_scaled on FLUX (its default), always on SD3 and Anima
    assert found(flux, weighting_scheme="cosmap") == {}
    assert found(flux, weighting_scheme="cosmap", model_prediction_type="raw") == {"weighting_scheme": "ignored"}
    assert found(anima, weighting_scheme="cosmap") == {}
    assert found(flux, logit_std=2.0) == {"logit_std": "ignored"}  # without logit_normal at all


def test_a_shift_and_a_sigmoid_scale_act_only_with_the_samplers_that_read_them():
    flux = "flux_train_network.py"
    assert found(flux, discrete_flow_shift=3.1582, timestep_sampling="shift", sigmoid_scale=1.2) == {}
    assert found(flux, discrete_flow_shift=3.1582, timestep_sampling="flux_shift") == {"discrete_flow_shift": "ignored"}
    assert found(flux, sigmoid_scale=1.2) == {"sigmoid_scale": "ignored"}  # the default sampler, sigma
    assert found("lumina_train_network.py", sigmoid_scale=1.2, timestep_sampling="nextdit_shift") == {"sigmoid_scale": "ignored"}


@pytest.mark.parametrize("script", FLOW_SCRIPTS)
def test_a_huber_loss_with_the_default_snr_schedule_fails_and_another_schedule_acts(script):
    assert found(script, loss_type="huber") == {"loss_type": "fails"}
    assert found(script, loss_type="smooth_l1", huber_schedule="snr") == {"loss_type": "fails", "huber_schedule": "fails"}
    assert found(script, loss_type="huber", huber_schedule="exponential", huber_c=0.1) == {}
    assert found(script, loss_type="l2", huber_c=0.2) == {"huber_c": "ignored"}


def test_caption_dropout_on_cached_outputs_is_lost_where_the_scripts_lose_it():
    lumina = "lumina_train_network.py"
    cached = {"cache_text_encoder_outputs": True, "network_train_unet_only": True}
    assert found(lumina, caption_dropout_rate=0.1, **cached) == {"caption_dropout_rate": "ignored"}
    assert found(lumina, caption_dropout_rate=0.1) == {}
    assert found("flux_train_network.py", caption_dropout_every_n_epochs=3, cache_text_encoder_outputs=True) == {
        "caption_dropout_every_n_epochs": "ignored"
    }
    assert found("sd3_train_network.py", t5_dropout_rate=0.1, cache_text_encoder_outputs=True) == {}


@pytest.fixture
def tree(tmp_path):
    return make_flow_scripts(make_standin(tmp_path / "sd-scripts", "main"))


def test_check_kohya_reads_the_scripts_own_parser_and_exits_1_on_an_ignored_flag(tree, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[training]\nmin_snr_gamma = 5.0\n")
    argv = ["check", "kohya", "--sd-scripts", str(tree), "--", "flux_train_network.py", "--noise_offset", "0.1"]
    assert cli_main([*argv, "--output_dir", "out", "--config_file", str(config)]) == 1
    out = capsys.readouterr().out
    assert "--noise_offset 0.1: ignored" in out and "[[noise]] type = 'offset'" in out
    assert "--min_snr_gamma 5.0: ignored" in out  # a key of --config_file is a flag the user wrote
    assert "note: --model_prediction_type sigma_scaled" in out  # FLUX's default, unwritten
    assert "--output_dir" not in out


def test_check_kohya_exits_0_when_every_flag_acts(tree, capsys):
    argv = ["check", "kohya", "--sd-scripts", str(tree), "--", "sd3_train_network.py", "--weighting_scheme", "logit_normal"]
    assert cli_main([*argv, "--min_timestep", "100", "--training_shift", "3.0"]) == 0
    assert "none of the 3 flags given is ignored" in capsys.readouterr().out


def test_check_kohya_refuses_an_unknown_script_or_a_tree_it_does_not_describe(tree, capsys):
    assert cli_main(["check", "kohya", "--sd-scripts", str(tree), "--", "sdxl_train.py"]) == 2
    assert "not found" in capsys.readouterr().err
    (tree / "sdxl_train.py").write_text("")
    assert cli_main(["check", "kohya", "--sd-scripts", str(tree), "--", "sdxl_train.py"]) == 2
    err = capsys.readouterr().err
    assert "sdxl_train.py: sdplug check kohya knows" in err and "flux_train_network.py" in err
    script = tree / "lumina_train_network.py"
    script.write_text(script.read_text().replace("        return loss", "        return loss * 2"))
    assert cli_main(["check", "kohya", "--sd-scripts", str(tree), "--", "lumina_train_network.py"]) == 2
    err = capsys.readouterr().err
    assert "not the one sdplug's table describes" in err and "post_process_loss" in err
