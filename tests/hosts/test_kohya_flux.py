"""The kohya adapter on sd-scripts main's FLUX and SD3 scripts (stand-ins of them:
``kohya_flow_standin``): the preset's draws, weights and dropout decisions as a loop of one's own
draws them, what the script ignores reported, what clashes refused before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdplug
from sdplug.errors import SdplugError
from sdplug.hosts.kohya import cached_text
from sdplug.hosts.kohya.flow_flags import MODEL_PATCH
from sdplug.process import Flow, flow_sigmas
from tests.hosts.kohya_flow_standin import make_flow_scripts
from tests.hosts.kohya_standin import make_standin
from tests.hosts.test_cross_host import FLOW_PRESET as CROSS_HOST_FLOW_PRESET

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 3, 4
# the cross-host flow preset (noise of three kinds, input perturbation reaching the model input
# only; SD3's logit-normal sigma; min-SNR in its velocity form; caption dropout) with FLUX's
# resolution-dependent shift
FLOW_PRESET = CROSS_HOST_FLOW_PRESET + "\n[schedule]\ndynamic_shift = true\n"
TIMESTEPS = '[timesteps]\ntype = "logit_normal"\n'
MIN_SNR = '[loss_weighting]\ntype = "min_snr"\ngamma = 5.0\n'


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_flow_scripts(make_standin(tmp_path_factory.mktemp("sd") / "sd-scripts", "main"))


def flux(tree, tmp_path, preset_text: str, *args: str, script: str = "flux_train_network.py"):
    preset = tmp_path / "preset.toml"
    preset.write_text(preset_text)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdplug", "kohya", "--preset", str(preset), "--sd-scripts", str(tree), "--"]
    command += [script, "--output_dir", str(out), "--max_train_steps", str(STEPS)]
    command += ["--train_batch_size", str(BATCH), "--seed", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300), out


def test_flux_draws_what_a_loop_of_ones_own_draws_for_one_preset_and_seed(tree, tmp_path):
    done, out = flux(tree, tmp_path, FLOW_PRESET)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "standin-record.json").read_text())
    report = json.loads((out / "audit.json").read_text())

    plan = sdplug.load_preset(tmp_path / "preset.toml").build(process=Flow(flow_sigmas(1000)), seed=0, rank=0)
    latents = torch.zeros(BATCH, 4, 8, 8)  # the stand-in's latents
    dropped = [plan.caption("any caption").dropped for _ in range(STEPS * BATCH)]
    for step in range(STEPS):
        plan.step()
        t = plan.timesteps(BATCH, latent_size=(8, 8))
        noise = plan.noise(latents, timesteps=t)
        plan.weight(torch.ones(BATCH), t)
        # kohya's timesteps are sigma * 1000, and its target reads the noise tensor the hook filled
        assert record["timesteps"][step] == pytest.approx(plan.model_time(t).tolist(), rel=1e-6)
        assert float(noise.target.double().sum()) == pytest.approx(record["noise_sums"][step], rel=1e-6)
    assert [c == "" for c in record["captions"]] == dropped and any(dropped) and not all(dropped)
    ours = plan.report()
    assert report["schedule"] == ours["schedule"] and report["schedule"]["shift"] == "dynamic"
    assert report["timesteps"]["mu_per_latent_size"] == pytest.approx(ours["timesteps"]["mu_per_latent_size"])
    weights = [r["loss_weighting"]["mean_weight_per_timestep_bin"] for r in (report, ours)]
    assert [w is None for w in weights[0]] == [w is None for w in weights[1]]
    assert [w for w in weights[0] if w is not None] == pytest.approx([w for w in weights[1] if w is not None], rel=1e-6)
    assert report["problems"] == [] and report["steps"] == STEPS


def test_flags_flux_ignores_are_reported_and_fluxs_default_output_reading_is_made_raw(tree, tmp_path):
    done, out = flux(tree, tmp_path, FLOW_PRESET, "--noise_offset", "0.1", "--min_snr_gamma", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flux_train_network.py ignores --noise_offset" in done.stderr
    host = json.loads((out / "audit.json").read_text())["host"]
    assert host["kohya_flags"]["noise_offset"].startswith("ignored by flux_train_network.py")
    assert host["kohya_flags"]["min_snr_gamma"].startswith("ignored by flux_train_network.py")
    assert any(
        rule.startswith("--model_prediction_type sigma_scaled (flux_train_network.py's default) -> raw") for rule in host["rules"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--timestep_sampling", "shift"), "--timestep_sampling=shift"),  # acts, and [timesteps] sets it
        pytest.param(("--ip_noise_gamma", "0.1"), "--ip_noise_gamma=0.1", marks=pytest.mark.slow),  # FLUX's draw applies it too
        (
            ("--model_prediction_type", "additive"),
            "--model_prediction_type additive: with a preset flux_train_network.py's output is read raw",
        ),
        pytest.param(  # written: refused
            ("--model_prediction_type", "sigma_scaled"),
            "--model_prediction_type sigma_scaled: with a preset",
            marks=pytest.mark.slow,
        ),
        pytest.param(("--weighting_scheme", "cosmap"), "--weighting_scheme=cosmap", marks=pytest.mark.slow),
    ],
)
def test_a_flag_that_acts_next_to_the_section_that_sets_it_is_refused_before_the_model_loads(tree, tmp_path, args, message):
    done, out = flux(tree, tmp_path, FLOW_PRESET, *args)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not (out / "standin-model-loaded").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[loss_weighting]\ntype = "learned"\n', "learns its weight from the loss"),
        pytest.param('[attention]\ntype = "xformers"\n', "flux_train_network.py has no attention switch", marks=pytest.mark.slow),
    ],
)
def test_what_fluxs_script_cannot_apply_is_refused(tree, tmp_path, section, message):
    assert MIN_SNR in FLOW_PRESET
    text = FLOW_PRESET.replace(MIN_SNR, "") + section
    done, out = flux(tree, tmp_path, text)
    assert done.returncode == 1 and message in done.stderr
    assert not (out / "standin-model-loaded").exists()


def test_without_timesteps_in_the_preset_the_plan_draws_kohyas_own_sampler(tree, tmp_path):
    """--timestep_sampling shift --discrete_flow_shift 3 --sigmoid_scale 1.3 is logit_normal(0, 1.3)
    on a flow shifted by 3: the plan draws it, so the preset's other families see kohya's sigmas."""
    assert TIMESTEPS in FLOW_PRESET
    text = CROSS_HOST_FLOW_PRESET.replace(TIMESTEPS, "")
    args = ("--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--sigmoid_scale", "1.3")
    done, out = flux(tree, tmp_path, text, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "audit.json").read_text())
    assert report["schedule"]["shift"] == 3.0 and report["timesteps"]["type"] == "logit_normal (host default)"
    assert any("drawn by the plan as {'type': 'logit_normal', 'mean': 0.0, 'std': 1.3}" in r for r in report["host"]["rules"])


def test_sd3_draws_alike_and_weights_its_preconditioned_x0_loss(tree, tmp_path):
    """SD3's script compares x_t - sigma * output with the latents: the process's sigma_scaled
    output, so the preset's weights are its x0 weights (min(SNR, 5) for min-SNR), on the same
    sigmas and noise as FLUX's and an own loop's."""
    done, out = flux(tree, tmp_path, FLOW_PRESET, script="sd3_train_network.py")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "standin-record.json").read_text())
    report = json.loads((out / "audit.json").read_text())
    process = Flow(flow_sigmas(1000), output="sigma_scaled")
    plan = sdplug.load_preset(tmp_path / "preset.toml").build(process=process, seed=0, rank=0)
    for step in range(STEPS):
        plan.step()
        t = plan.timesteps(BATCH, latent_size=(8, 8))
        noise = plan.noise(torch.zeros(BATCH, 4, 8, 8), timesteps=t)
        plan.weight(torch.ones(BATCH), t)
        assert record["timesteps"][step] == pytest.approx(plan.model_time(t).tolist(), rel=1e-6)
        assert float(noise.target.double().sum()) == pytest.approx(record["noise_sums"][step], rel=1e-6)
    ours = plan.report()
    assert report["schedule"] == ours["schedule"] and report["schedule"]["output"] == "sigma_scaled"
    weights = [w for w in report["loss_weighting"]["mean_weight_per_timestep_bin"] if w is not None]
    assert weights == pytest.approx([w for w in ours["loss_weighting"]["mean_weight_per_timestep_bin"] if w is not None])
    assert max(weights) == pytest.approx(5.0)  # min(SNR, 5) in x0 space: 5 wherever SNR >= 5


@pytest.mark.slow
def test_sd3s_own_weighting_stands_without_a_preset_weighting(tree, tmp_path):
    """No [loss_weighting]: kohya's --weighting_scheme sigma_sqrt weights SD3's loss itself, on the
    plan's sigmas (the plan draws kohya's uniform density)."""
    text = FLOW_PRESET.replace(MIN_SNR, "").replace(TIMESTEPS, "").replace("\n[schedule]\ndynamic_shift = true\n", "")
    done, out = flux(tree, tmp_path, text, "--weighting_scheme", "sigma_sqrt", script="sd3_train_network.py")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "audit.json").read_text())
    assert not report["strategies"]["loss_weighting"] and report["timesteps"]["type"] == "uniform (host default)"
    assert "weighting_scheme" in report["host"]["kohya_flags"]


def test_a_kohya_sampler_the_plan_cannot_draw_is_refused_not_changed(tree, tmp_path):
    """SD3 with --weighting_scheme logit_normal draws over --min/--max_timestep; the plan's
    logit_normal spans the whole schedule, so without [timesteps] the run is refused."""
    text = FLOW_PRESET.replace(TIMESTEPS, "").replace("\n[schedule]\ndynamic_shift = true\n", "")
    args = ("--weighting_scheme", "logit_normal", "--min_timestep", "100")
    done, out = flux(tree, tmp_path, text, *args, script="sd3_train_network.py")
    assert done.returncode == 1 and "cannot as written (min_timestep: not carried over" in done.stderr
    assert not (out / "standin-model-loaded").exists()


ENCODER_DROPOUTS = """
[[caption]]
type = "dropout"
rate = 0.4
encoders = ["clip_l"]

[[caption]]
type = "dropout"
rate = 0.4
encoders = ["t5xxl"]
"""


@pytest.mark.parametrize(
    ("script", "encoders", "to_disk"),
    [
        ("flux_train_network.py", ("clip_l", "t5xxl"), False),
        pytest.param("sd3_train_network.py", ("clip_l", "clip_g", "t5xxl"), True, marks=pytest.mark.slow),
        pytest.param("flux_train_network.py", ("clip_l", "t5xxl"), True, marks=pytest.mark.slow),
        pytest.param("sd3_train_network.py", ("clip_l", "clip_g", "t5xxl"), False, marks=pytest.mark.slow),
    ],
)
def test_a_dropout_naming_an_encoder_swaps_that_encoders_cached_rows_alone(tree, tmp_path, script, encoders, to_disk):
    """With cached text-encoder outputs, each dropped encoder's part of a sample's rows (SD3's
    CLIP-L and CLIP-G columns of one tensor too) is the empty caption's, the others the caption's,
    for exactly the samples the plan's decisions drop; kohya's own cache to disk alike."""
    preset_text = FLOW_PRESET.split("[[caption]]")[0] + ENCODER_DROPOUTS + "[optimizer]" + FLOW_PRESET.split("[optimizer]")[1]
    args = ["--cache_text_encoder_outputs", *(["--cache_text_encoder_outputs_to_disk"] if to_disk else [])]
    done, out = flux(tree, tmp_path, preset_text, *args, script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads(line) for line in (out / "flow-encoders.jsonl").read_text().splitlines()]
    plan = sdplug.load_preset(tmp_path / "preset.toml").build(
        process=Flow(flow_sigmas(1000)), seed=0, rank=0, text_encoders=encoders
    )
    draws = [plan.dropped_encoders(encoders) for _ in range(STEPS * BATCH)]
    for name in encoders:
        rows = [flag for step in seen for flag in step[name]]
        assert rows == [name in draw for draw in draws], name
    assert [flag for step in seen for flag in step["clip_l"]] != [flag for step in seen for flag in step["t5xxl"]]
    assert not any(flag for step in seen for flag in step.get("clip_g", []))  # no dropout names CLIP-G
    caption = json.loads((out / "audit.json").read_text())["caption"]
    assert caption["samples"] == STEPS * BATCH


def test_a_dropout_naming_an_encoder_without_the_cache_is_refused(tree, tmp_path):
    preset_text = FLOW_PRESET.split("[[caption]]")[0] + ENCODER_DROPOUTS + "[optimizer]" + FLOW_PRESET.split("[optimizer]")[1]
    done, out = flux(tree, tmp_path, preset_text)
    assert done.returncode == 1 and "--cache_text_encoder_outputs" in done.stderr
    assert not (out / "standin-model-loaded").exists()


@pytest.mark.parametrize(
    "script",
    ["flux_train_network.py"]
    + [
        pytest.param(s, marks=pytest.mark.slow)
        for s in ("sd3_train_network.py", "lumina_train_network.py", "hunyuan_image_train_network.py", "anima_train_network.py")
    ],
)
def test_patch_route_runs_flow_scripts_and_unpatch_restores_bytes(tmp_path, monkeypatch, script):
    """``sdplug patch kohya``: the flow script, run directly with --sdplug_preset, trains on the
    plan's draws (the same as through the launcher), and ``unpatch`` gives every byte back."""
    from sdplug.hosts.kohya import patching
    from tests.hosts.make_kohya_patches import make_patches

    root = make_flow_scripts(make_standin(tmp_path / "sd" / "sd-scripts", "main"))
    patches = tmp_path / "patches"
    (patches / "main").mkdir(parents=True)
    (patches / "manifest.json").write_text(json.dumps({"main": make_patches(root, "main", patches)}))
    monkeypatch.setattr(patching, "patches_dir", lambda: patches)
    before = {p.name: p.read_bytes() for p in root.glob("*.py")}
    assert f"patched: {script}" in patching.apply(root)

    preset = tmp_path / "preset.toml"
    preset.write_text(FLOW_PRESET)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{root}", "OMP_NUM_THREADS": "1"}
    runs = {}
    for route in ("patch", "launcher"):
        out = tmp_path / route
        args = ["--output_dir", str(out), "--max_train_steps", str(STEPS), "--train_batch_size", str(BATCH), "--seed", "0"]
        if route == "patch":
            command = [sys.executable, str(root / script), *args, "--sdplug_preset", str(preset)]
        else:
            command = [sys.executable, "-m", "sdplug", "kohya", "--preset", str(preset), "--sd-scripts", str(root), "--"]
            command += [script, *args]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[route] = (json.loads((out / "standin-record.json").read_text()), json.loads((out / "audit.json").read_text()))
    (patched, patched_audit), (launched, _) = runs["patch"], runs["launcher"]
    assert patched["noise_sums"] == launched["noise_sums"] and patched["timesteps"] == launched["timesteps"]
    assert patched_audit["problems"] == [] and patched_audit["steps"] == STEPS
    assert patched_audit["schedule"]["process"] == "flow"

    patching.revert(root)
    assert {p.name: p.read_bytes() for p in root.glob("*.py")} == before


@pytest.mark.parametrize(
    ("script", "prediction", "encoder"),
    [
        ("lumina_train_network.py", "velocity_reversed", "gemma2"),
        # Qwen2.5-VL: its cached rows are as long as their caption, the empty caption's shorter
        ("hunyuan_image_train_network.py", "velocity", "qwen2_5_vl"),
        pytest.param("anima_train_network.py", "velocity", "qwen3", marks=pytest.mark.slow),
    ],
)
def test_lumina_hunyuan_and_anima_draw_alike_and_drop_their_cached_encoders(tree, tmp_path, script, prediction, encoder):
    """The other three flow scripts: the plan's sigma (kohya's sigma * 1000; HunyuanImage's
    integer part), noise and weights, Lumina 2 on the reversed convention; with cached outputs, a
    dropout naming one of the script's encoders swaps that encoder's rows alone."""
    dropout = f'[[caption]]\ntype = "dropout"\nrate = 0.4\nencoders = ["{encoder}"]\n\n'
    preset_text = FLOW_PRESET.split("[[caption]]")[0] + dropout + "[optimizer]" + FLOW_PRESET.split("[optimizer]")[1]
    done, out = flux(tree, tmp_path, preset_text, "--cache_text_encoder_outputs", script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "standin-record.json").read_text())
    report = json.loads((out / "audit.json").read_text())
    seen = [json.loads(line) for line in (out / "flow-encoders.jsonl").read_text().splitlines()]

    encoders = (encoder,) if script != "hunyuan_image_train_network.py" else ("qwen2_5_vl", "byt5")
    # the dynamic shift counts the model's own tokens: HunyuanImage-2.1's 1x1 patches, 2x2 elsewhere
    process = Flow(flow_sigmas(1000), prediction, patch_size=MODEL_PATCH[script])
    plan = sdplug.load_preset(tmp_path / "preset.toml").build(process=process, seed=0, rank=0, text_encoders=encoders)
    draws = [plan.dropped_encoders(encoders) for _ in range(STEPS * BATCH)]
    for step in range(STEPS):
        plan.step()
        t = plan.timesteps(BATCH, latent_size=(8, 8))
        noise = plan.noise(torch.zeros(BATCH, 4, 8, 8), timesteps=t)
        plan.sample_weights(t)
        sigma_1000 = (plan.process.sigmas[t] * 1000).tolist()
        if script == "hunyuan_image_train_network.py":  # its script truncates sigma * 1000 to integers
            sigma_1000 = [float(int(v)) for v in sigma_1000]
        assert record["timesteps"][step] == pytest.approx(sigma_1000, rel=1e-5)
        assert float(noise.target.double().sum()) == pytest.approx(record["noise_sums"][step], rel=1e-6)
    for name in encoders:
        assert [f for step in seen for f in step[name]] == [name in d for d in draws], name
    assert any(encoder in d for d in draws) and not all(encoder in d for d in draws)
    assert report["schedule"]["prediction_type"] == prediction and report["problems"] == []
    assert report["schedule"]["dynamic_shift"]["patch_size"] == MODEL_PATCH[script]
    ours = plan.report()["loss_weighting"]["mean_weight_per_timestep_bin"]
    theirs = report["loss_weighting"]["mean_weight_per_timestep_bin"]
    assert [w for w in theirs if w is not None] == pytest.approx([w for w in ours if w is not None], rel=1e-6)


def test_the_empty_captions_cached_rows_are_fitted_to_a_batch_as_kohya_main_pads_rows():
    """HunyuanImage's Qwen2.5-VL rows are as long as their caption's tokens, and main's collation
    pads a batch's rows with zeros to its longest. The empty caption's rows, shorter or longer than a
    batch's, are fitted the same way; where rows are fixed-length (v0.8.7), another shape is refused."""
    slots = cached_text.ENCODER_SLOTS["hunyuan_image_train_network.py"]
    embed, mask, byt5 = torch.arange(30.0).reshape(2, 5, 3) + 1, torch.ones(2, 5), torch.full((2, 4, 3), 7.0)
    empty = [torch.full((2, 3), -1.0), torch.ones(2), torch.zeros(4, 3), torch.zeros(4), torch.tensor(0.0)]

    def batch(length: int) -> list[torch.Tensor]:  # [vlm_embed, vlm_mask, byt5_embed, byt5_mask, ocr_mask]
        return [embed[:, :length].clone(), mask[:, :length].clone(), byt5.clone(), torch.ones(2, 4), torch.ones(2)]

    shorter = batch(5)  # the empty caption's 2 tokens in a batch of 5: padded into it
    cached_text.substitute_encoders(shorter, 1, empty, slots, frozenset({"qwen2_5_vl"}), pad_sequences=True)
    torch.testing.assert_close(shorter[0][1], torch.cat([empty[0], torch.zeros(3, 3)]))
    assert shorter[0].shape == (2, 5, 3) and shorter[1][1].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(shorter[0][0], embed[0])  # the other sample, and byT5, as they were
    torch.testing.assert_close(shorter[2], byt5)
    longer = batch(1)  # a batch of 1-token rows: it grows to 2, its own rows padded with zeros
    cached_text.substitute_row(longer, 0, empty, pad_sequences=True)
    assert longer[0].shape == (2, 2, 3) and longer[1].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    torch.testing.assert_close(longer[0][0], empty[0])
    torch.testing.assert_close(longer[0][1], torch.cat([embed[1, :1], torch.zeros(1, 3)]))
    assert longer[4].tolist() == [0.0, 1.0]
    with pytest.raises(SdplugError, match="do not have the layout sdplug knows for qwen2_5_vl"):
        cached_text.substitute_encoders(batch(5), 1, empty, slots, frozenset({"qwen2_5_vl"}))  # fixed-length rows
    with pytest.raises(SdplugError, match=r"rows have shape \(5, 3\) but the empty caption's has \(2, 4\)"):
        cached_text.substitute_row(batch(5), 0, [torch.zeros(2, 4), *empty[1:]], pad_sequences=True)  # another width


@pytest.mark.parametrize(
    ("section", "args", "expect"),
    [
        ('[attention]\ntype = "sdpa"\n', [], "torch"),
        pytest.param('[attention]\ntype = "sdpa"\n', ["--attn_mode", "flash"], "--attn_mode flash sets", marks=pytest.mark.slow),
        pytest.param('[attention]\ntype = "sliced"\n', [], "has no such kernel", marks=pytest.mark.slow),
    ],
)
def test_anima_attention_goes_through_kohyas_attn_mode(tree, tmp_path, section, args, expect):
    """Anima (and HunyuanImage) take an attention kernel, kohya's --attn_mode: the preset's
    [attention] sets it before the model loads; a written --attn_mode next to it is refused."""
    done, out = flux(tree, tmp_path, FLOW_PRESET + section, *args, script="anima_train_network.py")
    if expect != "torch":
        assert done.returncode == 1 and expect in done.stderr
        assert not (out / "standin-model-loaded").exists()
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "flow-args.json").read_text())["attn_mode"] == "torch"
    audit = json.loads((out / "audit.json").read_text())
    assert audit["attention"]["strategy"] == "sdpa" and "--attn_mode torch -> torch" in audit["attention"]["modules"]
    assert any(rule.startswith("--attn_mode torch (the preset's [attention] 'sdpa'") for rule in audit["host"]["rules"])
