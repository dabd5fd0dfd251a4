"""sd-scripts main's flow scripts: what each does with the trick flags it accepts, held to the real
parsers' arguments, and ``sdplug check kohya`` on a stand-in tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sdplug.cli import main as cli_main
from sdplug.hosts.kohya import flag_check
from sdplug.hosts.kohya.config_bridge import from_kohya, to_kohya
from sdplug.hosts.kohya.flags import FLAGS, HOST_SETTINGS
from sdplug.hosts.kohya.flow_flags import (
    FLOW_HOST_SETTINGS,
    FLOW_SCRIPTS,
    FLOW_TRICKS,
    SCRIPT_DEFAULTS,
    SCRIPT_EFFECTS,
    TEXT_ENCODERS,
)
from sdplug.plan import bind
from sdplug.preset import parse_preset
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


# -- sdplug from-kohya --script FLOW_SCRIPT ---------------------------------------------------------


@pytest.mark.parametrize("script", FLOW_SCRIPTS)
def test_the_defaults_the_table_assumes_are_the_real_parsers(script):
    for name, value in SCRIPT_DEFAULTS[script].items():
        assert FLOW_PARSERS["scripts"][script][name]["default"] == value, name


def bridged(script: str, **config):
    result = from_kohya(config, name="k", script=script)
    return result.data, result.notes


def _ks2(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov distance."""
    grid = torch.cat([a, b]).double().sort().values
    cdf = lambda x: torch.searchsorted(x.double().sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def test_fluxs_sigma_sampling_reads_the_descending_table_so_the_logit_mean_changes_sign():
    """kohya FLUX --timestep_sampling sigma: u ~ sigmoid(N(m, s)), indices = (u * 1000).long(),
    sigma = the scheduler's (descending, shifted) timesteps[indices] / 1000. The preset's draws,
    on the unshifted flow, follow the same law."""
    data, notes = bridged(
        "flux_train_network.py", weighting_scheme="logit_normal", logit_mean=0.8, logit_std=0.7, discrete_flow_shift=3.0
    )
    assert data["timesteps"] == {"type": "logit_normal", "mean": -0.8, "std": 0.7}
    assert data["schedule"] == {"flow_shift": 3.0} and any("logit_mean 0.8: mean -0.8" in n for n in notes)
    g = torch.Generator().manual_seed(0)
    u = torch.sigmoid(0.8 + 0.7 * torch.randn(20000, generator=g))
    kohya = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).timesteps[(u * 1000).long()] / 1000
    plan = bind(parse_preset(data, path="k.toml"), FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), seed=1)
    ours = plan.process.sigmas[plan.timesteps(20000)]
    assert _ks2(ours, kohya) < 0.02  # 1.95 * sqrt(2 / 20000) = 0.0195 at p = 0.001
    unflipped = bind(
        parse_preset({**data, "timesteps": {**data["timesteps"], "mean": 0.8}}, path="k.toml"),
        FlowMatchEulerDiscreteScheduler(),
        seed=1,
    )
    assert _ks2(unflipped.process.sigmas[unflipped.timesteps(20000)], kohya) > 0.1  # the sign matters


def test_sd3_reads_u_as_sigma_with_its_training_shift_and_drops_each_encoder_on_its_own():
    data, notes = bridged(
        "sd3_train_network.py",
        weighting_scheme="logit_normal",
        logit_mean=0.5,
        training_shift=3.0,
        clip_l_dropout_rate=0.2,
        t5_dropout_rate=0.1,
        ip_noise_gamma=0.1,
    )
    assert data["timesteps"] == {"type": "logit_normal", "mean": 0.5, "std": 1.0} and data["schedule"] == {"flow_shift": 3.0}
    assert data["caption"] == [
        {"type": "dropout", "rate": 0.2, "encoders": ["clip_l"]},
        {"type": "dropout", "rate": 0.1, "encoders": ["t5xxl"]},
    ]
    assert any(n.startswith("ip_noise_gamma: sd3_train_network.py ignored it") for n in notes)
    plan = bind(
        parse_preset(data, path="k.toml"),
        FlowMatchEulerDiscreteScheduler(),
        seed=2,
        text_encoders=TEXT_ENCODERS["sd3_train_network.py"],
    )
    g = torch.Generator().manual_seed(0)
    u = torch.sigmoid(0.5 + torch.randn(20000, generator=g))
    kohya = (3 * u / (1 + 2 * u) * 1000).long() / 1000
    assert _ks2(plan.process.sigmas[plan.timesteps(20000)], kohya) < 0.02


@pytest.mark.parametrize(
    ("script", "config", "timesteps", "schedule"),
    [
        (
            "flux_train_network.py",
            {"timestep_sampling": "sigmoid", "sigmoid_scale": 1.3},
            {"type": "logit_normal", "mean": 0.0, "std": 1.3},
            None,
        ),
        (
            "flux_train_network.py",
            {"timestep_sampling": "flux_shift"},
            {"type": "logit_normal", "mean": 0.0, "std": 1.0},
            {"dynamic_shift": True},
        ),
        ("lumina_train_network.py", {"timestep_sampling": "nextdit_shift"}, {"type": "uniform"}, {"dynamic_shift": True}),
        ("lumina_train_network.py", {}, {"type": "logit_normal", "mean": 0.0, "std": 1.0}, {"flow_shift": 6.0}),  # its defaults
        ("anima_train_network.py", {"timestep_sampling": "uniform", "zero_terminal_snr": True}, {"type": "uniform"}, None),
    ],
)
def test_each_flow_sampler_becomes_its_preset_form(script, config, timesteps, schedule):
    data, notes = bridged(script, **config)
    assert data["timesteps"] == timesteps and data.get("schedule") == schedule
    if config.get("zero_terminal_snr"):
        assert any(n.startswith("zero_terminal_snr: dropped") for n in notes)
    bind(parse_preset(data, path="k.toml"), FlowMatchEulerDiscreteScheduler(), seed=0)  # a flow plan takes it


def test_an_sd3_weighting_scheme_is_kept_only_where_the_script_applies_it():
    assert bridged("sd3_train_network.py", weighting_scheme="cosmap")[0]["loss_weighting"] == {"type": "cosmap"}
    flux_raw = bridged("flux_train_network.py", weighting_scheme="cosmap", model_prediction_type="raw")[0]
    assert "loss_weighting" not in flux_raw
    data, notes = bridged("flux_train_network.py", weighting_scheme="sigma_sqrt", min_snr_gamma=5.0)  # sigma_scaled: the default
    assert data["loss_weighting"] == {"type": "sigma_sqrt"} and any(
        "weighting_scheme sigma_sqrt is the weighting kept" in n for n in notes
    )


def test_from_kohya_refuses_a_script_it_does_not_know(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("noise_offset = 0.1\n")
    assert cli_main(["from-kohya", str(config), "--script", "flux_train.py"]) == 1
    assert "--script 'flux_train.py': allowed:" in capsys.readouterr().err
    assert cli_main(["from-kohya", str(config), "--script", "flux_train_network.py", "-o", str(tmp_path / "p.toml")]) == 0
    assert "noise_offset: flux_train_network.py ignored it" in capsys.readouterr().err


# -- sdplug to-kohya --script FLOW_SCRIPT -----------------------------------------------------------

ROUND_TRIPS = [
    ({"timesteps": {"type": "logit_normal", "mean": 0.0, "std": 1.3}, "schedule": {"flow_shift": 3.0}}, "shift"),
    ({"timesteps": {"type": "logit_normal", "mean": 0.0, "std": 1.0}}, "sigmoid"),
    ({"timesteps": {"type": "logit_normal", "mean": 0.5, "std": 0.8}, "schedule": {"flow_shift": 2.0}}, "sigma"),
    ({"timesteps": {"type": "mode", "scale": 1.29}}, "sigma"),
    ({"timesteps": {"type": "uniform"}}, "uniform"),
    ({"timesteps": {"type": "logit_normal", "mean": 0.0, "std": 1.0}, "schedule": {"dynamic_shift": True}}, "flux_shift"),
]


@pytest.mark.parametrize(
    ("script", "data", "sampling"),
    [
        (script, data, sampling)
        for script in ("flux_train_network.py", "lumina_train_network.py", "hunyuan_image_train_network.py")
        for data, sampling in ROUND_TRIPS
        # kohya's flux_shift counts 2x2 patches on HunyuanImage's 1x1-patch latents: the next test
        if (script, sampling) != ("hunyuan_image_train_network.py", "flux_shift")
    ],
)
def test_a_flow_presets_timesteps_go_to_kohya_and_come_back(script, data, sampling):
    preset = parse_preset(data, path="p.toml")
    config = to_kohya(preset, script).data
    assert config["timestep_sampling"] == sampling
    back, _ = bridged(script, **config)
    assert parse_preset(back, path="b.toml").timesteps.create() == preset.timesteps.create()
    assert back.get("schedule", {}) == data.get("schedule", {})


def test_kohyas_flux_shift_on_hunyuan_counts_other_tokens_than_its_model_and_neither_bridge_hides_it():
    """kohya's flux_shift counts (h // 2) (w // 2) tokens on every script; HunyuanImage-2.1 embeds
    1x1 patches, so the preset's dynamic shift (the model's tokens, 4x as many) is not kohya's."""
    hunyuan = "hunyuan_image_train_network.py"
    data = {"timesteps": {"type": "logit_normal", "mean": 0.0, "std": 1.0}, "schedule": {"dynamic_shift": True}}
    result = to_kohya(parse_preset(data, path="p.toml"), hunyuan)
    assert "timestep_sampling" not in result.data
    assert any("tokens of 2x2 patches; not written" in n for n in result.notes), result.notes
    back, notes = bridged(hunyuan, timestep_sampling="flux_shift")
    assert back["schedule"] == {"dynamic_shift": True}
    assert any(f"kohya counts {hunyuan}'s tokens as 2x2 latent patches, its model embeds 1x1" in n for n in notes), notes
    _, flux_notes = bridged("flux_train_network.py", timestep_sampling="flux_shift")
    assert not any("latent patches" in n for n in flux_notes)


@pytest.mark.parametrize(("data", "sampling"), ROUND_TRIPS[:4])
def test_sd3s_timesteps_go_to_kohya_and_come_back(data, sampling):
    preset = parse_preset(data, path="p.toml")
    config = to_kohya(preset, "sd3_train_network.py").data
    assert "timestep_sampling" not in config  # SD3 draws through --weighting_scheme
    back, _ = bridged("sd3_train_network.py", **config)
    assert parse_preset(back, path="b.toml").timesteps.create() == preset.timesteps.create()
    assert back.get("schedule", {}) == data.get("schedule", {})


def test_to_kohya_leaves_out_what_the_flow_script_would_ignore_and_says_so():
    preset = parse_preset(
        {
            "noise": [{"type": "offset", "strength": 0.1}],
            "loss_weighting": {"type": "min_snr"},
            "loss": {"type": "pseudo_huber", "schedule": "snr"},
            "caption": [{"type": "dropout", "rate": 0.1, "encoders": ["t5xxl"]}],
        },
        path="p.toml",
    )
    flux = to_kohya(preset, "flux_train_network.py")
    assert not {"noise_offset", "min_snr_gamma", "loss_type", "huber_c", "caption_dropout_rate"} & set(flux.data)
    assert flux.data["model_prediction_type"] == "raw"  # not FLUX's default sigma_scaled
    assert any(n.startswith("noise_offset: flux_train_network.py ignores it") for n in flux.notes)
    assert any(n.startswith("loss 'pseudo_huber': flux_train_network.py fails on it") for n in flux.notes)
    assert any("has no per-encoder dropout" in n for n in flux.notes)
    sd3 = to_kohya(preset, "sd3_train_network.py")
    assert sd3.data["t5_dropout_rate"] == 0.1 and "caption_dropout_rate" not in sd3.data
    plain = to_kohya(preset)  # the SD scripts: the per-encoder dropout is no whole-caption dropout
    assert "caption_dropout_rate" not in plain.data and any("drop whole captions only" in n for n in plain.notes)
