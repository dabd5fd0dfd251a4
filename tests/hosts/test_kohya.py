"""The kohya adapter against stand-in sd-scripts trees (main and v0.8.7 layouts)."""

import argparse
import atexit
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sdplug
from sdplug.errors import SdplugError
from sdplug.hosts.kohya import patching, runtime
from sdplug.hosts.kohya.runtime import KohyaAdapter
from sdplug.hosts.kohya.version import FLOW_ROUTES, KNOWN, KohyaVersionError, detect
from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod
from tests.hosts.kohya_standin import make_standin
from tests.hosts.make_kohya_patches import make_patches

ROOT = Path(__file__).resolve().parents[2]
PRESET = """
[[noise]]
type = "pyramid"
discount = 0.8

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.5

[optimizer]
type = "adamw8bit"
lr = 1e-3
min_8bit_size = 16

[attention]
type = "sdpa"
"""


@pytest.fixture(params=["main", "v0.8.7"])
def standin(request, tmp_path):
    return request.param, make_standin(tmp_path / f"sd-scripts-{request.param}", request.param)


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "kohya-preset.toml"
    path.write_text(PRESET)
    return path


def run(command, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def launch(preset, root, script, out, *extra):
    return run(
        [
            "-m",
            "sdplug",
            "kohya",
            "--preset",
            str(preset),
            "--sd-scripts",
            str(root),
            "--",
            script,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "4",
            "--v_parameterization",
            *extra,
        ]
    )


def check_applied(out: Path, version: str, script: str):
    audit = json.loads((out / "audit.json").read_text())
    record = json.loads((out / "standin-record.json").read_text())
    assert audit["host"] == {
        "name": "kohya sd-scripts",
        "version": version,
        "script": script,
        "prediction_type": "v_prediction",
        "rules": audit["host"]["rules"],
        "kohya_flags": audit["host"]["kohya_flags"],
    }
    # every trick-family flag set on the command line, and how it stands next to the preset
    assert audit["host"]["kohya_flags"]["v_parameterization"].startswith("independent (loss_weighting)")
    assert audit["problems"] == [] and audit["completed"] is True
    assert audit["steps"] == 4
    assert audit["noise"]["applied"] == [{"type": "pyramid", "calls": 4}]
    assert audit["loss_weighting"]["calls"] == 4
    # 4 steps of batch 4: the stand-in's loader fetches a fifth batch ahead, as accelerate's does,
    # which never trains and is not counted
    assert audit["caption"]["samples"] == 16 and audit["caption"]["dropout_rate_within_interval"]
    assert len(record["captions"]) == 16
    assert audit["optimizer"]["class"].startswith("bitsandbytes.optim")
    assert 1.9 < audit["optimizer"]["state_bytes_per_trainable_parameter"] < 3.0
    assert audit["optimizer"]["learning_rates"] == [1e-3]  # the preset's lr, whatever the groups said
    # and from the host's side: the script trained on what sdplug gave it
    assert record["noise_channel_mean_variance"] > 10 / 64  # pyramid, not white noise (1/64)
    assert record["captions"].count("") == audit["caption"]["dropped"] > 0
    assert record["empty_caption_rows"] == audit["caption"]["dropped"]  # the model saw the empty caption's encoding
    assert record["optimizer"].startswith("bitsandbytes.optim") and record["sdpa"] is True
    # the saved weights' metadata carries the resolved preset beside kohya's own keys
    spec = record["model_spec"]
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora" and spec["sdplug_version"] == sdplug.__version__
    (out / "preset-from-metadata.toml").write_text(spec["sdplug_preset"])
    saved = sdplug.load_preset(out / "preset-from-metadata.toml")
    assert [s.type for s in saved.noise] == ["pyramid"] and saved.loss_weighting.params["gamma"] == 5.0
    return audit


@pytest.mark.parametrize("script", ["train_network.py", "train_db.py"])
def test_launcher_applies_every_trick(standin, preset, tmp_path, script):
    version, root = standin
    out = tmp_path / "out"
    result = launch(preset, root, script, out)
    assert result.returncode == 0, result.stderr[-3000:]
    audit = check_applied(out, version, script)
    # what kohya's attention modules ran before and after the switch, not just a count
    assert audit["attention"] == {
        "strategy": "sdpa",
        "before": {"CrossAttention: vanilla": 1},
        "after": {"CrossAttention: sdpa": 1},
        "modules": 1,
        "changed": 1,
    }
    assert "--max_data_loader_n_workers 8 -> 0" in audit["host"]["rules"][0]


def test_validation_batches_are_not_training_steps(preset, tmp_path):
    # sd-scripts main validates the validation split at pinned timesteps: no step, no caption counted
    root = make_standin(tmp_path / "sd", "main")
    out = tmp_path / "out"
    result = launch(preset, root, "train_network.py", out, "--validate_every_n_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    audit = check_applied(out, "main", "train_network.py")
    assert audit["timesteps"]["draws"] == 16 and audit["noise"]["applied"][0]["calls"] == 4


@pytest.mark.slow
def test_kohya_lr_arguments_follow_the_preset_and_a_crash_is_in_the_audit(preset, tmp_path):
    root = make_standin(tmp_path / "sd", "main")
    out = tmp_path / "out"
    lrs = ["--learning_rate", "5e-4", "--unet_lr", "2e-4", "--text_encoder_lr", "0", "3e-4"]
    result = launch(preset, root, "train_network.py", out, *lrs)
    assert result.returncode == 0, result.stderr[-3000:]
    # kohya's own lr arguments (its logs, its saved metadata) say what the optimizer uses; an lr
    # of 0 (kohya's way to leave a part untrained) stays 0
    record = json.loads((out / "standin-record.json").read_text())
    assert (record["learning_rate"], record["unet_lr"], record["text_encoder_lr"]) == (1e-3, 1e-3, [0.0, 1e-3])
    rules = json.loads((out / "audit.json").read_text())["host"]["rules"]
    assert (
        "--learning_rate 0.0005 -> 0.001, --unet_lr 0.0002 -> 0.001, --text_encoder_lr [0.0, 0.0003] -> 0.001 "
        "(preset [optimizer] lr)" in rules
    )

    # groups kohya set to lr 0 (a part left untrained) stay at 0
    assert json.loads((out / "audit.json").read_text())["optimizer"]["learning_rates"] == [0.0, 1e-3]

    crashed = launch(preset, root, "train_network.py", tmp_path / "crash", "--crash_at_step", "2")
    assert crashed.returncode == 1 and "stand-in crash" in crashed.stderr
    audit = json.loads((tmp_path / "crash" / "audit.json").read_text())
    assert audit["steps"] == 2 and audit["caption"]["samples"] == 8  # the batch fetched ahead never trained
    assert audit["problems"] == ["stopped at step 2 by RuntimeError: stand-in crash"] and audit["completed"] is False
    assert audit["completed"] is False


@pytest.mark.parametrize("version", [pytest.param(v, marks=pytest.mark.slow) for v in ("main", "v0.8.7")])
def test_patch_route_applies_and_unpatch_restores_bytes(version, preset, tmp_path, monkeypatch):
    root = make_standin(tmp_path / f"sd-scripts-{version}", version)
    patches = tmp_path / "patches"
    manifest = {version: make_patches(root, version, patches)}
    (patches / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(patching, "patches_dir", lambda: patches)
    before = {p.name: p.read_bytes() for p in root.glob("*.py")}

    assert any(line.startswith("patched: train_network.py") for line in patching.apply(root))
    assert all(not line.startswith("patched") for line in patching.apply(root))  # idempotent
    out = tmp_path / "out"
    env_run = run(
        [
            str(root / "train_network.py"),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "4",
            "--v_parameterization",
            "--sdplug_preset",
            str(preset),
        ],
        cwd=root,
    )
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    check_applied(out, version, "train_network.py")
    # a refusal inside a patched script is a message, not a traceback through kohya's code
    refused = run(
        [str(root / "train_network.py"), "--output_dir", str(tmp_path / "o2"), "--noise_offset", "0.1"]
        + ["--sdplug_preset", str(preset)],
        cwd=root,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "sdplug: error:" in refused.stderr and "--noise_offset=0.1" in refused.stderr
    assert "--noise_offset=0.1" in json.loads((tmp_path / "o2" / "audit.json").read_text())["problems"][0]
    # refused before the adapter exists (no such preset): a message and an audit as well
    missing = run(
        [str(root / "train_network.py"), "--output_dir", str(tmp_path / "o3"), "--sdplug_preset", str(tmp_path / "nope.toml")],
        cwd=root,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "sdplug: error:" in missing.stderr
    assert "nope.toml" in json.loads((tmp_path / "o3" / "audit.json").read_text())["problems"][0]

    patching.revert(root)
    assert {p.name: p.read_bytes() for p in root.glob("*.py")} == before


def test_patch_refuses_local_changes_and_unknown_trees(standin, tmp_path, monkeypatch):
    version, root = standin
    patches = tmp_path / "patches"
    (patches / "manifest.json").parent.mkdir(parents=True, exist_ok=True)
    (patches / "manifest.json").write_text(json.dumps({version: make_patches(root, version, patches)}))
    monkeypatch.setattr(patching, "patches_dir", lambda: patches)
    (root / "train_db.py").write_text((root / "train_db.py").read_text() + "# mine\n")
    untouched = (root / "train_network.py").read_bytes()
    with pytest.raises(patching.PatchError, match="local changes"):
        patching.apply(root)
    assert (root / "train_network.py").read_bytes() == untouched
    with pytest.raises(KohyaVersionError):
        patching.apply(tmp_path)


def test_shipped_patches_fit_their_versions():
    manifest = json.loads((patching.patches_dir() / "manifest.json").read_text())
    assert set(manifest) == {"main", "v0.8.7"}
    for version, files in manifest.items():
        flow = set(FLOW_ROUTES) if version == "main" else set()
        assert set(files) == {"train_network.py", "sdxl_train_network.py", "train_db.py", "fine_tune.py"} | flow
        for script in files:
            diff = (patching.patches_dir() / version / f"{script}.patch").read_text()
            assert "sdplug_kohya.activate(args, parser, globals())" in diff
            # sdxl's and the flow scripts' parsers are train_network's, which the patch gives the option
            assert ("--sdplug_preset" in diff) == (script in ("train_network.py", "train_db.py", "fine_tune.py"))


def test_version_detection_and_refusal(standin, tmp_path):
    version, root = standin
    assert detect(root).name == version
    text = (root / "library" / "train_util.py").read_text()
    (root / "library" / "train_util.py").write_text(text.replace("def get_noise_noisy", "def renamed_noise"))
    (root / "library" / "train_util.py").write_text(
        text.replace("return noise, noisy_latents, timesteps", "return noisy_latents, noise, timesteps")
    )
    with pytest.raises(KohyaVersionError, match="does not know") as info:
        detect(root)
    assert "main" in str(info.value) and "v0.8.7" in str(info.value) and "missing" in str(info.value)
    result = launch(tmp_path / "none.toml", root, "train_network.py", tmp_path / "o")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # refused before the adapter could configure: the audit in --output_dir says so
    refused = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert refused["steps"] == 0 and refused["problems"][0].startswith("refused before training:")
    assert "none.toml" in refused["problems"][0]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--noise_offset", "0.1"], "sets [noise] and the kohya command line sets --noise_offset=0.1"),
        (["--optimizer_type", "AdamW"], "--optimizer_type=AdamW"),
        (["--sdpa"], "sets [attention]"),
        (["--caption_dropout_rate", "0.2"], "sets [caption]"),
        (["--min_snr_gamma", "5"], "sets [loss_weighting]"),
        (["--keep_tokens_separator", "|||"], "sets [caption] and the kohya command line sets --keep_tokens_separator=|||"),
        (["--token_warmup_step", "10"], "--token_warmup_step=10.0 (kohya's tag-count warm-up"),
    ],
)
def test_conflicting_flags_fail_before_training(preset, tmp_path, flags, words):
    root = make_standin(tmp_path / "sd", "main")
    result = launch(preset, root, "train_network.py", tmp_path / "o", *flags)
    assert result.returncode == 1
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "standin-model-loaded").exists()  # refused before any model loads
    # a refused run has an audit: no step, the refusal in problems
    audit = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert audit["steps"] == 0 and audit["completed"] is False and words in audit["problems"][0]


@pytest.mark.parametrize("script", ["train_network.py", "train_db.py"])
def test_optimizer_args_with_a_preset_optimizer_is_refused_before_the_model_loads(standin, preset, tmp_path, script):
    version, root = standin
    out = tmp_path / "o"
    result = launch(preset, root, script, out, "--optimizer_args", "weight_decay=0.01", "betas=0.5,0.5")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    words = "sets [optimizer] and the kohya command line sets --optimizer_args=['weight_decay=0.01', 'betas=0.5,0.5']"
    assert words in result.stderr
    assert not (out / "standin-model-loaded").exists()
    assert words in json.loads((out / "audit.json").read_text())["problems"][0]


def test_a_zero_terminal_snr_preset_turns_on_kohyas_rescale_and_binds_the_plan_to_it(tmp_path):
    preset = tmp_path / "ztsnr.toml"
    preset.write_text('[schedule]\nzero_terminal_snr = true\n[loss_weighting]\ntype = "min_snr"\n[[noise]]\ntype = "offset"\n')
    root = make_standin(tmp_path / "sd", "main")
    out = tmp_path / "o"
    result = launch(preset, root, "train_network.py", out, "--v_parameterization")
    assert result.returncode == 0, result.stderr[-3000:]
    audit = json.loads((out / "audit.json").read_text())
    assert "--zero_terminal_snr -> True (preset [schedule] zero_terminal_snr)" in audit["host"]["rules"]
    assert audit["schedule"]["alpha_cumprod_last"] == 0.0 and audit["problems"] == []
    assert audit["loss_weighting"]["calls"] == audit["steps"] > 0


@pytest.mark.parametrize("version", ["main", "v0.8.7"])
def test_the_presets_loss_type_replaces_kohyas_elementwise_loss(tmp_path, version):
    preset = tmp_path / "huber.toml"
    preset.write_text('[loss]\ntype = "pseudo_huber"\nschedule = "snr"\n[loss_weighting]\ntype = "min_snr"\n')
    root = make_standin(tmp_path / "sd", version)
    out = tmp_path / "o"
    result = launch(preset, root, "train_network.py", out)
    assert result.returncode == 0, result.stderr[-3000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["loss"] == {"type": "pseudo_huber", "calls": audit["steps"]} and audit["steps"] > 0
    assert audit["problems"] == []
    # kohya's own loss flags set the same thing: refused, naming the flag and the section
    clash = launch(preset, root, "train_network.py", tmp_path / "clash", "--loss_type", "l1")
    assert clash.returncode == 1 and "--loss_type=l1" in clash.stderr and "[loss]" in clash.stderr


def test_the_loss_hook_is_the_loss_type_on_the_steps_timesteps_in_both_signatures():
    preset = parse_preset({"loss": {"type": "pseudo_huber", "c": 0.1, "schedule": "snr"}}, path="p.toml")
    pred, target, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 995])
    for version in KNOWN:
        adapter = KohyaAdapter(preset, version, "train_network.py")
        adapter.plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
        adapter._train_util = types.ModuleType("library.train_util")
        adapter._train_util.conditional_loss = lambda *a, **k: pytest.fail("kohya's own loss ran")
        adapter._replace(adapter._train_util, "conditional_loss", adapter._loss_hook)
        adapter.timesteps = t
        expected = adapter.plan.elementwise_loss(pred, target, t)
        sigma = ((1 - adapter.plan.alphas_cumprod[t]) / adapter.plan.alphas_cumprod[t]).sqrt()
        c = ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).view(-1, 1, 1, 1)  # kohya's snr schedule, per sample
        assert torch.allclose(expected, 2 * c * (((pred - target) ** 2 + c**2).sqrt() - c), rtol=1e-4, atol=1e-6)
        if version.name == "main":  # (model_pred, target, loss_type, reduction, huber_c)
            got = adapter._train_util.conditional_loss(pred, target, "l2", "none", None)
        else:  # (model_pred, target, reduction=, loss_type=, huber_c=)
            got = adapter._train_util.conditional_loss(pred, target, reduction="none", loss_type="l2", huber_c=1)
        assert torch.equal(got, expected)
        assert torch.equal(
            adapter._train_util.conditional_loss(pred, target, "l2", "mean")
            if version.name == "main"
            else adapter._train_util.conditional_loss(pred, target, "mean"),
            expected.mean(),
        )


def test_loss_mask_options_kohya_would_not_apply_are_refused_before_the_model_loads(tmp_path):
    preset = tmp_path / "masked.toml"
    preset.write_text('[loss]\ntype = "mse"\nunmasked_weight = 0.1\n')
    root = make_standin(tmp_path / "sd", "main")
    out = tmp_path / "o"
    result = launch(preset, root, "train_network.py", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "loss.unmasked_weight" in result.stderr and "applies its own loss mask" in result.stderr
    assert not (out / "standin-model-loaded").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_without_cuda_is_refused_before_the_model_loads(tmp_path):
    # fp16 autocast on a CPU does not fail: it crawls (a real sd-scripts run sat 15 minutes in
    # latent caching). The same rule as the reference trainer's, from the plan.
    preset = tmp_path / "fp16.toml"
    preset.write_text('[[noise]]\ntype = "offset"\n[memory]\nmixed_precision = "fp16"\n')
    root = make_standin(tmp_path / "sd", "main")
    out = tmp_path / "o"
    result = launch(preset, root, "train_network.py", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "memory.mixed_precision = 'fp16' needs a CUDA GPU" in result.stderr
    assert not (out / "standin-model-loaded").exists()


def test_noise_flags_are_refused_with_a_timesteps_only_preset(tmp_path):
    # sdplug's timestep hook replaces kohya's whole noise function: --noise_offset would be lost
    preset = tmp_path / "t.toml"
    preset.write_text('[timesteps]\ntype = "logit_normal"\n')
    root = make_standin(tmp_path / "sd", "v0.8.7")
    result = launch(preset, root, "train_network.py", tmp_path / "o", "--noise_offset", "0.05")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "sets [timesteps] and the kohya command line sets --noise_offset=0.05" in result.stderr
    assert "replaces kohya's noise function" in result.stderr


def test_independent_flags_run_and_are_named_in_the_audit(preset, tmp_path):
    root = make_standin(tmp_path / "sd", "main")
    out = tmp_path / "out"
    result = launch(preset, root, "train_network.py", out, "--lr_scheduler", "cosine", "--max_grad_norm", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    flags = json.loads((out / "audit.json").read_text())["host"]["kohya_flags"]
    assert flags["lr_scheduler"].startswith("independent (optimizer): presets set no lr schedule")
    assert flags["max_grad_norm"].startswith("independent (optimizer): presets set no gradient clipping")


def test_dataset_config_caption_keys_are_refused_before_the_model_loads(preset, tmp_path):
    root = make_standin(tmp_path / "sd", "main")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("[general]\nshuffle_caption = true\n\n[[datasets]]\n[[datasets.subsets]]\nkeep_tokens = 2\n")
    result = launch(preset, root, "train_network.py", tmp_path / "o", "--dataset_config", str(dataset))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "shuffle_caption = True in [general], keep_tokens = 2 in [[datasets.subsets]] 1.1" in result.stderr
    assert not (tmp_path / "o" / "standin-model-loaded").exists()


def test_learned_weighting_joins_kohyas_optimizer_in_a_trained_group(standin, tmp_path):
    version, root = standin
    preset = tmp_path / "learned.toml"
    preset.write_text('[loss_weighting]\ntype = "learned"\n\n[optimizer]\ntype = "adamw"\nlr = 1e-3\n')
    out = tmp_path / "out"
    extra = ["--text_encoder_lr", "0", "3e-4"] if version == "main" else []  # main's stand-in adds an lr-0 group first
    result = launch(preset, root, "train_network.py", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["problems"] == [] and audit["loss_weighting"]["calls"] == 4
    optimizer = audit["optimizer"]
    assert optimizer["learned_weighting_parameters"] > 0 and optimizer["learned_weighting_lr"] == [1e-3]
    assert optimizer["learned_weighting_devices"] == ["cpu"]  # parameters and buffers alike


def test_learned_weighting_moves_with_its_buffers_to_the_device_of_its_group():
    # the first CUDA step used to fail: parameters moved, the frequencies/phases buffers stayed on
    # the CPU. "meta" stands in for a GPU: every tensor of the weighting must follow the group.
    preset = parse_preset({"loss_weighting": {"type": "learned"}, "optimizer": {"type": "adamw", "lr": 1e-3}}, path="p.toml")
    adapter = KohyaAdapter(preset, KNOWN[0], "train_network.py")
    adapter.plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    group = {"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))], "lr": 1e-4}
    adapter._optimizer_hook(SimpleNamespace(learning_rate=1e-4), [group])
    network = adapter.plan.loss_weighting.network
    assert len(list(network.buffers())) == 2
    assert {t.device.type for t in [*network.parameters(), *network.buffers()]} == {"meta"}
    trained = {id(p) for p in adapter.plan.built_optimizer.param_groups[0]["params"]}
    assert {id(p) for p in network.parameters()} <= trained  # the same Parameters, moved in place


class _Attention(torch.nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        self.to_q, self.to_k = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.use_memory_efficient_attention_xformers = self.use_memory_efficient_attention_mem_eff = False
        self.use_sdpa = sdpa


def _attention_adapter(replace):
    preset = parse_preset({"attention": {"type": "sdpa"}}, path="a.toml")
    adapter = KohyaAdapter(preset, KNOWN[0], "train_network.py")
    adapter.plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    adapter._train_util = types.ModuleType("library.train_util")  # hashable, like the real module
    adapter._train_util.replace_unet_modules = replace
    adapter._replace(adapter._train_util, "replace_unet_modules", adapter._attention_hook)
    return adapter


def test_attention_record_shows_what_ran_before_and_after_the_switch():
    def replace(unet, mem_eff_attn, xformers, sdpa):
        for m in unet:
            m.use_sdpa = sdpa

    already = torch.nn.Sequential(_Attention(True), _Attention(True))
    adapter = _attention_adapter(replace)
    adapter._train_util.replace_unet_modules(already, False, False, False)
    # already SDPA: the record says so instead of claiming two switched modules
    record = adapter.plan.report()["attention"]
    assert record["before"] == record["after"] == {"_Attention: sdpa": 2}
    assert record["changed"] == 0

    ignored = _attention_adapter(lambda unet, *flags: None)  # a switch that does not take
    with pytest.raises(SdplugError, match="still run _Attention: vanilla"):
        ignored._train_util.replace_unet_modules(torch.nn.Sequential(_Attention(False)), False, False, False)


@pytest.mark.parametrize(
    "cache", [[], ["--cache_text_encoder_outputs"], ["--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"]]
)
def test_sdxl_caption_dropout_with_and_without_cached_text_encoder_outputs(standin, preset, tmp_path, cache):
    version, root = standin
    if "--cache_text_encoder_outputs_to_disk" in cache and version != "main":
        pytest.skip("the v0.8.7 stand-in caches in memory only")
    out = tmp_path / "out"
    result = launch(preset, root, "sdxl_train_network.py", out, *cache)
    assert result.returncode == 0, result.stderr[-3000:]
    audit = check_applied(out, version, "sdxl_train_network.py")
    caption = audit["caption"]
    # cached: no caption text, so each dropped sample got the empty caption's cached outputs
    # (check_applied saw the host's model get exactly that many empty-caption rows)
    assert caption["empty_caption_embeddings_substituted"] == (caption["dropped"] if cache else 0)
    assert any("empty caption's outputs" in rule for rule in audit["host"]["rules"]) == bool(cache)


def test_cached_text_encoder_outputs_refuse_caption_text_transforms(standin, tmp_path):
    version, root = standin
    preset = tmp_path / "shuffle.toml"
    preset.write_text('[[caption]]\ntype = "dropout"\nrate = 0.1\n\n[[caption]]\ntype = "shuffle"\n')
    result = launch(preset, root, "sdxl_train_network.py", tmp_path / "o", "--cache_text_encoder_outputs")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "[caption] shuffle rewrite the caption text" in result.stderr and "'dropout' only" in result.stderr
    assert not (tmp_path / "o" / "standin-record.json").exists()


def test_unsupported_script_is_refused(preset, tmp_path):
    root = make_standin(tmp_path / "sd", "main")
    (root / "train_textual_inversion.py").write_text("print('should not run')\n")
    result = launch(preset, root, "train_textual_inversion.py", tmp_path / "o")
    assert result.returncode == 1 and "supports train_network.py" in result.stderr and "should not run" not in result.stdout
    (root / "lumina_train_network.py").write_text("print('should not run')\n")
    result = launch(preset, root, "lumina_train_network.py", tmp_path / "o")  # a flow script, not main's at 48d368f
    assert result.returncode == 1 and "should not run" not in result.stdout
    assert "lumina_train_network.py in" in result.stderr and "is not the one sdplug's table describes" in result.stderr


# -- the session: installed in this process, and undone --------------------------------------------
IN_PROCESS_PRESET = """
[[noise]]
type = "offset"

[loss_weighting]
type = "min_snr"

[[caption]]
type = "dropout"

[optimizer]
type = "adamw"
lr = 1e-3

[attention]
type = "sdpa"
"""


@pytest.fixture
def in_process(monkeypatch):
    """The stand-in's library imported into this process (gone again afterwards), with atexit
    recording instead of registering: the list of handlers that would run at exit."""
    for name in [n for n in sys.modules if n == "library" or n.startswith("library.") or n == "train_network"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(runtime, "_ACTIVE", None)
    handlers = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: handlers.append(f) or f)
    monkeypatch.setattr(atexit, "unregister", lambda f: handlers.__setitem__(slice(None), [h for h in handlers if h != f]))
    yield handlers
    for name in [n for n in sys.modules if n == "library" or n.startswith("library.") or n == "train_network"]:
        del sys.modules[name]


def _import_standin(root):
    folder = str(root.resolve())
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("library.train_util"), importlib.import_module("library.custom_train_functions")
    finally:
        sys.path.remove(folder)  # imported; the adapter puts the folder on sys.path itself


def _namespaces(train_util, custom, *more):
    return [vars(train_util), vars(custom), vars(train_util.BaseDataset), *more]


def _snapshot(namespaces):
    return [dict(namespace) for namespace in namespaces]


def _assert_restored(namespaces, snapshot):
    for namespace, before in zip(namespaces, snapshot, strict=True):
        assert set(namespace) == set(before)  # nothing added (an inherited method gets no entry of its own)
        changed = [key for key, value in before.items() if namespace[key] is not value]
        assert changed == []


@pytest.mark.parametrize("route", ["launcher", "patched script"])
def test_session_undo_restores_every_patched_function_the_excepthook_and_atexit(standin, tmp_path, in_process, route):
    version, root = standin
    handlers = in_process
    (tmp_path / "p.toml").write_text(IN_PROCESS_PRESET)
    train_util, custom = _import_standin(root)
    original_weight = custom.apply_snr_weight
    script_globals = {"__file__": str(root / "train_network.py"), "apply_snr_weight": original_weight}
    loaded = types.ModuleType("train_network")  # sdxl_train_network runs train_network's loop
    loaded.apply_snr_weight = original_weight
    sys.modules["train_network"] = loaded
    namespaces = _namespaces(train_util, custom, script_globals, vars(loaded))
    before, previous_hook = _snapshot(namespaces), sys.excepthook

    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser)
    custom.add_custom_train_arguments(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path / "out")])
    if route == "launcher":
        adapter = runtime.activate_for_launch(sdplug.load_preset(tmp_path / "p.toml"), detect(root), root, "train_network.py")
        adapter.rebind_script_globals(script_globals, custom)
        args = train_util.read_config_from_file(args, parser)  # the hook: configures
    else:
        args.sdplug_preset = str(tmp_path / "p.toml")
        adapter = runtime.activate(args, parser, script_globals)
    # installed: every hook, the script's imported names, the excepthook and the audit at exit
    assert train_util.get_noise_noisy_latents_and_timesteps == adapter._noise_hook
    assert "process_caption" in vars(train_util.BaseDataset) and custom.apply_snr_weight == adapter._weight_hook
    assert script_globals["apply_snr_weight"] == loaded.apply_snr_weight == adapter._weight_hook
    assert sys.excepthook is not previous_hook and handlers == [adapter.write_audit]
    assert str(root.resolve()) in sys.path and runtime._ACTIVE is adapter and adapter.plan is not None

    adapter.session.undo()
    _assert_restored(namespaces, before)
    assert custom.apply_snr_weight is original_weight and script_globals["apply_snr_weight"] is original_weight
    assert sys.excepthook is previous_hook
    assert handlers == []  # unregistered: at exit no audit is written
    assert str(root.resolve()) not in sys.path and runtime._ACTIVE is None
    adapter.session.undo()  # a second undo changes nothing
    _assert_restored(namespaces, before)


def test_an_install_that_fails_midway_leaves_sd_scripts_untouched(tmp_path, in_process):
    root = make_standin(tmp_path / "sd", "main")
    train_util, custom = _import_standin(root)
    namespaces = _namespaces(train_util, custom)
    before = _snapshot(namespaces)
    adapter = KohyaAdapter(parse_preset({"noise": [{"type": "offset"}]}, path="p.toml"), detect(root), "train_network.py")

    def failing_caption_hooks(train_util, method):  # after the library's hooks and one caption hook
        adapter._replace(train_util.BaseDataset, "__getitem__", lambda dataset, index: None)
        raise RuntimeError("caption hooks failed")

    adapter.captions.install = failing_caption_hooks
    with pytest.raises(RuntimeError, match="caption hooks failed"):
        adapter.install(train_util, custom)
    _assert_restored(namespaces, before)


def test_the_audit_names_every_hook_that_never_ran(tmp_path):
    preset = parse_preset(
        {
            "noise": [{"type": "offset"}],
            "loss_weighting": {"type": "min_snr"},
            "caption": [{"type": "dropout"}],
            "optimizer": {"type": "adamw", "lr": 1e-3},
            "attention": {"type": "sdpa"},
        },
        path="p.toml",
    )
    adapter = KohyaAdapter(preset, KNOWN[0], "train_network.py")
    adapter.plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    adapter.args = SimpleNamespace(output_dir=str(tmp_path), no_metadata=False)
    scheduler = SimpleNamespace(alphas_cumprod=scaled_linear_alphas_cumprod())
    never = [
        "optimizer 'adamw' was never built (the host did not call plan.optimizer)",
        "attention 'sdpa' was never installed (the host did not call plan.attention)",
    ]
    # main's validation pins the timestep: a noise call, but no training step
    adapter._noise_hook(SimpleNamespace(min_timestep=200, max_timestep=200), scheduler, torch.zeros(2, 4, 8, 8))
    assert json.loads(adapter.write_audit().read_text())["problems"] == [
        "no training step ran (plan.step() was never called): nothing the preset names is proven applied",
        *never,
    ]
    adapter._noise_hook(SimpleNamespace(min_timestep=None, max_timestep=None), scheduler, torch.zeros(2, 4, 8, 8))
    assert json.loads(adapter.write_audit().read_text())["problems"] == [
        "loss weighting ran 0 times in 1 steps",
        "caption 'dropout' never ran",
        *never,
    ]


def test_cli_from_and_to_kohya(tmp_path):
    config = tmp_path / "kohya.toml"
    config.write_text('[general]\nnoise_offset = 0.05\n[train]\nmin_snr_gamma = 5\noptimizer_type = "Lion8bit"\n')
    result = run(["-m", "sdplug", "from-kohya", str(config), "-o", str(tmp_path / "preset.toml")])
    assert result.returncode == 0, result.stderr
    preset = sdplug.load_preset(tmp_path / "preset.toml")
    assert preset.optimizer.type == "lion8bit" and preset.noise[0].type == "offset"
    back = run(["-m", "sdplug", "to-kohya", str(tmp_path / "preset.toml")])
    assert back.returncode == 0 and "min_snr_gamma = 5.0" in back.stdout and 'optimizer_type = "Lion8bit"' in back.stdout


# -- a real sd-scripts checkout (skipped unless SDPLUG_KOHYA_DIR points to one) -------------------
KOHYA_DIR = os.environ.get("SDPLUG_KOHYA_DIR")


def run_real(preset, out, script, extra):
    python = os.environ.get("SDPLUG_KOHYA_PYTHON", sys.executable)
    command = [python, "-m", "sdplug", "kohya", "--preset", str(preset), "--sd-scripts", KOHYA_DIR, "--", script]
    command += ["--output_dir", str(out), "--max_train_steps", "2", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-5000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["problems"] == [] and audit["steps"] == 2
    assert audit["noise"]["applied"][0]["calls"] == 2 and audit["loss_weighting"]["calls"] == 2
    return audit


@pytest.mark.skipif(
    not KOHYA_DIR, reason="set SDPLUG_KOHYA_DIR (and SDPLUG_KOHYA_ARGS) to run against a real sd-scripts checkout"
)
@pytest.mark.parametrize("script", ["train_network.py", "train_db.py"])
def test_real_sd_scripts_checkout(preset, tmp_path, script):
    """SDPLUG_KOHYA_ARGS: the script arguments for a 2-step run on your machine (model, data, tokenizer)."""
    extra = os.environ.get("SDPLUG_KOHYA_ARGS", "").split()
    if script == "train_network.py":
        extra += ["--network_module", "networks.lora"]
    run_real(preset, tmp_path / "out", script, extra)


@pytest.mark.skipif(not KOHYA_DIR, reason="set SDPLUG_KOHYA_DIR to run against a real sd-scripts checkout")
@pytest.mark.parametrize("script", ["train_network.py", "sdxl_train_network.py", "train_db.py", "fine_tune.py"])
def test_real_sd_scripts_refuse_optimizer_args_before_the_model_loads(preset, tmp_path, script):
    python = os.environ.get("SDPLUG_KOHYA_PYTHON", sys.executable)
    out = tmp_path / "out"
    command = [python, "-m", "sdplug", "kohya", "--preset", str(preset), "--sd-scripts", KOHYA_DIR, "--", script]
    command += ["--output_dir", str(out), "--optimizer_args", "weight_decay=0.01", "betas=0.5,0.5"]  # no model given
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "sets [optimizer] and the kohya command line sets --optimizer_args=" in result.stderr
    assert [p.name for p in out.iterdir()] == ["audit.json"]  # nothing of a training run
    assert "--optimizer_args=" in json.loads((out / "audit.json").read_text())["problems"][0]


@pytest.mark.skipif(
    not (KOHYA_DIR and os.environ.get("SDPLUG_KOHYA_SDXL_ARGS")),
    reason="set SDPLUG_KOHYA_DIR and SDPLUG_KOHYA_SDXL_ARGS (an SDXL model, data, tokenizers) to run sdxl_train_network",
)
def test_real_sd_scripts_sdxl_cached_text_encoder_outputs(preset, tmp_path):
    """Caption dropout on cached text-encoder outputs in a real sdxl_train_network.py."""
    extra = os.environ["SDPLUG_KOHYA_SDXL_ARGS"].split()
    extra += ["--network_module", "networks.lora", "--network_train_unet_only", "--cache_text_encoder_outputs"]
    audit = run_real(preset, tmp_path / "out", "sdxl_train_network.py", extra)
    caption = audit["caption"]
    assert caption["samples"] >= 2 and caption["empty_caption_embeddings_substituted"] == caption["dropped"]


def test_launcher_exits_non_zero_when_the_audit_finds_problems(tmp_path, in_process, monkeypatch, capsys):
    """The one problems policy: the script ran (its outputs are its own), the audit is written,
    and the launcher's exit status says a trick did not apply."""
    from sdplug.hosts.kohya import launcher

    root = make_standin(tmp_path / "sd", "main")
    (tmp_path / "p.toml").write_text(IN_PROCESS_PRESET)
    out = tmp_path / "out"

    def script_that_never_trains(path, run_name):  # reads its config (the adapter configures), then stops
        train_util = sys.modules["library.train_util"]
        parser = argparse.ArgumentParser()
        train_util.add_training_arguments(parser)
        sys.modules["library.custom_train_functions"].add_custom_train_arguments(parser)
        train_util.read_config_from_file(parser.parse_args(sys.argv[1:]), parser)

    monkeypatch.setattr(launcher.runpy, "run_path", script_that_never_trains)
    code = launcher.main(
        ["--preset", str(tmp_path / "p.toml"), "--sd-scripts", str(root), "train_network.py", "--output_dir", str(out)]
    )
    assert code == 1
    audit = json.loads((out / "audit.json").read_text())
    no_step = "no training step ran (plan.step() was never called): nothing the preset names is proven applied"
    assert audit["completed"] is True and audit["problems"][0] == no_step
    assert "optimizer 'adamw' was never built (the host did not call plan.optimizer)" in audit["problems"]
    assert f"the audit found strategies that did not apply: {no_step}" in capsys.readouterr().err
    assert in_process == []  # written by the launcher, so nothing is left for exit


@pytest.mark.slow
def test_a_schedule_free_optimizer_gets_mains_train_eval_switch_and_is_refused_where_none_exists(tmp_path):
    pytest.importorskip("schedulefree", reason="the schedulefree extra (CI installs it)")
    from sdplug.strategies.optimizer_modes import in_train_mode

    preset = parse_preset({"optimizer": {"type": "adamw_schedulefree", "lr": 1e-3}}, path="sf.toml")
    adapter = KohyaAdapter(preset, KNOWN[0], "train_network.py")
    adapter.plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    adapter._train_util = types.ModuleType("library.train_util")
    adapter._train_util.get_optimizer_train_eval_fn = lambda optimizer, args: (lambda: None, lambda: None)  # kohya's: by name
    adapter._replace(adapter._train_util, "get_optimizer_train_eval_fn", adapter._train_eval_hook)
    optimizer = adapter.plan.optimizer([torch.nn.Parameter(torch.ones(3))])
    train_fn, eval_fn = adapter._train_util.get_optimizer_train_eval_fn(optimizer, SimpleNamespace(optimizer_type="sdplug"))
    assert in_train_mode(optimizer) is True
    eval_fn()
    assert in_train_mode(optimizer) is False
    train_fn()
    assert in_train_mode(optimizer) is True

    (tmp_path / "sf.toml").write_text('[optimizer]\ntype = "adamw_schedulefree"\nlr = 1e-3\n')
    for version, script in (("v0.8.7", "train_network.py"), ("main", "train_db.py")):
        root = make_standin(tmp_path / f"sd-{version}", version)
        out = tmp_path / f"o-{version}"
        result = launch(tmp_path / "sf.toml", root, script, out)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"sd-scripts {version} {script} has no switch for it" in result.stderr and "optimizer.type" in result.stderr
        assert not (out / "standin-model-loaded").exists()


class _Network(torch.nn.Module):
    """A network as sd-scripts' network modules build one: its own save_weights."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.saved = {}

    def save_weights(self, file, dtype, metadata):
        self.saved[file] = (self.weight.detach().clone(), metadata)


def test_ema_saves_a_twin_of_every_network_file_kohya_saves(tmp_path, monkeypatch):
    network_module = types.ModuleType("standin_networks")
    network_module.create_network = lambda *args, **kwargs: _Network()
    monkeypatch.setitem(sys.modules, "standin_networks", network_module)
    preset = parse_preset({"ema": {"decay": 0.5}, "optimizer": {"type": "adamw", "lr": 0.1}}, path="e.toml")
    adapter = KohyaAdapter(preset, KNOWN[0], "train_network.py")
    adapter.plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    from sdplug.hosts.kohya import ema_save

    ema_save.install(adapter, SimpleNamespace(network_module="standin_networks"))
    network = network_module.create_network(1.0, 4)  # what train_network.py calls
    _, _, optimizer = adapter._optimizer_hook(SimpleNamespace(learning_rate=1e-4), [{"params": list(network.parameters())}])
    for _ in range(3):
        (network.weight**2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    network.save_weights("out/last.safetensors", None, {"ss_x": "1"})
    plain, _ = network.saved["out/last.safetensors"]
    averaged, metadata = network.saved["out/last-ema.safetensors"]
    assert torch.allclose(averaged, adapter.plan.ema_average.shadows[0]) and not torch.equal(plain, averaged)
    assert torch.equal(network.weight.detach(), plain)  # the trained weights are back after the twin
    assert json.loads(metadata["sdplug_ema"])["optimizer_steps"] == 3 and metadata["ss_x"] == "1"
    adapter.session.undo()
    assert network_module.create_network is not None and not hasattr(network_module.create_network, "__wrapped__")


def test_ema_is_refused_for_scripts_that_save_whole_models(tmp_path):
    from sdplug.errors import PresetError
    from sdplug.hosts.kohya import ema_save

    adapter = KohyaAdapter(parse_preset({"ema": {"decay": 0.99}}, path="e.toml"), KNOWN[0], "train_db.py")
    with pytest.raises(PresetError, match=r"e\.toml.*ema\.decay.*train_db\.py saves whole models"):
        ema_save.install(adapter, SimpleNamespace(network_module=None))
