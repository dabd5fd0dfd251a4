"""`sdplug sample` refuses what it cannot draw honestly: damaged or foreign LoRA files, untrusted
metadata, options out of range. Each refusal is one `error:` line naming the file or option, exit
status 1, no traceback and no grid written; a grid of NaN or inf is never written as an image."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdplug.cli import main

STEM = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
ESCAPE = "\x1b]0;PWNED\x07"  # an OSC sequence that retitles a terminal window


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A LoRA that `sdplug train` wrote for the embedded tiny model (one step, no sample grids)."""
    from sdplug.trainer.config import TrainConfig
    from sdplug.trainer.loop import Trainer

    directory = tmp_path_factory.mktemp("lora-run")
    (directory / "p.toml").write_text('[[noise]]\ntype = "pyramid"\n')
    config = TrainConfig(
        preset=str(directory / "p.toml"), output=directory / "out", steps=1, batch_size=2, progress=False, samples=False
    )
    Trainer(config).run()
    return config.output / "lora.safetensors"


def tampered(lora: Path, tmp_path: Path, *, tensors=None, metadata=None, run=None) -> Path:
    """A copy of ``lora`` with its tensors, metadata or ``sdplug_run`` changed by the given functions."""
    state = load_file(str(lora))
    with safe_open(str(lora), "pt") as f:
        meta = dict(f.metadata())
    if tensors:
        tensors(state)
    if metadata:
        metadata(meta)
    if run:
        recorded = json.loads(meta["sdplug_run"])
        run(recorded)
        meta["sdplug_run"] = json.dumps(recorded)
    path = tmp_path / "tampered.safetensors"
    save_file(state, str(path), metadata=meta)
    return path


def sample(tmp_path, *options, output=None):
    """`sdplug sample` drawing one small image; returns (exit status, the grid's path)."""
    grid = output or tmp_path / "grid.png"
    rc = main(["sample", "--prompt", "a red circle", "--steps", "1", "--seed", "0", "--guidance", "3", *options, "-o", str(grid)])
    return rc, grid


def assert_refused(capsys, rc, grid, *fragments):
    captured = capsys.readouterr()
    assert rc == 1, captured
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    assert not grid.is_file()
    return captured.err


def set_tensor(key, value):
    return lambda state: state.__setitem__(key, value)


def test_the_untampered_lora_draws(lora, tmp_path, capsys):
    rc, grid = sample(tmp_path, "--lora", str(lora))
    assert rc == 0 and grid.is_file()


@pytest.mark.parametrize(
    "tensors, key",
    [
        (lambda s: s[f"{STEM}.lora_up.weight"].view(-1)[3:5].fill_(float("nan")), f"{STEM}.lora_up.weight"),
        (set_tensor(f"{STEM}.alpha", torch.tensor(float("inf"))), f"{STEM}.alpha"),
        (set_tensor(f"{STEM}.lora_down.weight", torch.full((8, 64), float("-inf"))), f"{STEM}.lora_down.weight"),
    ],
    ids=["nan-weights", "inf-alpha", "inf-down"],
)
def test_non_finite_lora_tensors_are_refused(lora, tmp_path, capsys, tensors, key):
    rc, grid = sample(tmp_path, "--lora", str(tampered(lora, tmp_path, tensors=tensors)))
    assert_refused(capsys, rc, grid, "tampered.safetensors", key, "not finite")


@pytest.mark.parametrize("guidance", ["nan", "inf", "1e30", "100.5", "-101"])
def test_guidance_must_be_finite_and_in_range(lora, tmp_path, capsys, guidance):
    rc, grid = sample(tmp_path, "--lora", str(lora), "--guidance", "3", guidance)
    assert_refused(capsys, rc, grid, "--guidance", "from -100 to 100")


def test_guidance_below_one_is_allowed(lora, tmp_path, capsys):
    rc, grid = sample(tmp_path, "--lora", str(lora), "--guidance", "-1", "0", "0.5")
    assert rc == 0 and grid.is_file()


def test_guidance_help_says_what_the_values_mean(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0: the unconditional model" in text and "below 0" in text and "-100 to 100" in text


def test_an_overflowing_lora_is_refused_before_sampling(lora, tmp_path, capsys):
    def huge(state):
        for key in state:
            if key.endswith(".alpha"):
                state[key] = torch.tensor(1e38)
            else:
                state[key] = state[key] * 1e10

    rc, grid = sample(tmp_path, "--lora", str(tampered(lora, tmp_path, tensors=huge)))
    assert_refused(capsys, rc, grid, "tampered.safetensors", "overflow")


def test_a_sampler_that_produces_nan_is_reported_and_nothing_is_written(lora, tmp_path, capsys):
    # finite weights that the UNet's attention overflows on: NaN appears during sampling
    def huge_alpha(state):
        for key in state:
            if key.endswith(".alpha"):
                state[key] = torch.tensor(1e20)

    rc, grid = sample(tmp_path, "--lora", str(tampered(lora, tmp_path, tensors=huge_alpha)))
    assert_refused(capsys, rc, grid, "non-finite values (NaN or inf)", "guidance 3")


def _rank0(state):
    state[f"{STEM}.lora_down.weight"] = torch.zeros(0, 64)
    state[f"{STEM}.lora_up.weight"] = torch.zeros(64, 0)


@pytest.mark.parametrize(
    "tensors, fragments",
    [
        (set_tensor(f"{STEM}.alpha", torch.tensor([1.0, 2.0])), (f"{STEM}.alpha", "one number")),
        (_rank0, (STEM, "rank 0")),
        (set_tensor(f"{STEM}.lora_down.weight", torch.zeros(8)), (f"{STEM}.lora_down.weight", "2-D")),
        (lambda s: s.pop(f"{STEM}.lora_up.weight"), (STEM, "no .lora_up.weight")),
        (lambda s: s.pop(f"{STEM}.lora_down.weight"), (STEM, "no .lora_down.weight")),
        (set_tensor(f"{STEM}.lora_up.weight", torch.zeros(64, 4)), (STEM, "rank")),
        (set_tensor(f"{STEM}.lora_up.weight", torch.zeros(64, 8, dtype=torch.int32)), (f"{STEM}.lora_up.weight", "int32")),
    ],
    ids=["alpha-vector", "rank-0", "down-1d", "no-up", "no-down", "ranks-differ", "integer-weights"],
)
def test_malformed_lora_layers_are_refused(lora, tmp_path, capsys, tensors, fragments):
    rc, grid = sample(tmp_path, "--lora", str(tampered(lora, tmp_path, tensors=tensors)))
    assert_refused(capsys, rc, grid, "tampered.safetensors", *fragments)


@pytest.mark.parametrize(
    "change, fragments",
    [
        (dict(metadata=lambda m: m.__setitem__("sdplug_preset", "[[[ not toml")), ("sdplug_preset", "not valid TOML", "--preset")),
        (dict(run=lambda r: r.__setitem__("seed", "abc")), ("sdplug_run", "seed", "'abc'")),
        (dict(run=lambda r: r.__setitem__("seed", 1e30)), ("sdplug_run", "seed", "0 to 2**64 - 1")),
        (dict(run=lambda r: r.__setitem__("seed", True)), ("sdplug_run", "seed")),
        (dict(run=lambda r: r.__setitem__("prediction_type", "evil")), ("sdplug_run", "prediction_type", "'evil'", "epsilon")),
        (dict(metadata=lambda m: m.__setitem__("sdplug_run", "[1, 2]")), ("sdplug_run", "JSON object")),
        (dict(metadata=lambda m: m.__setitem__("sdplug_run", "{not json")), ("sdplug_run", "not JSON")),
        (dict(run=lambda r: r.__setitem__("base_model", 7)), ("sdplug_run", "base_model", "string")),
        (dict(run=lambda r: r.pop("base_model")), ("base_model", "--model")),
    ],
    ids=["preset-not-toml", "seed-abc", "seed-1e30", "seed-bool", "prediction-evil", "run-list", "run-not-json",
         "base-not-string", "no-base"],
)  # fmt: skip
def test_malformed_lora_metadata_is_refused(lora, tmp_path, capsys, change, fragments):
    rc, grid = sample(tmp_path, "--lora", str(tampered(lora, tmp_path, **change)))
    assert_refused(capsys, rc, grid, "tampered.safetensors", *fragments)


@pytest.mark.parametrize(
    "options, fragments",
    [
        (("--steps", "5000"), ("--steps 5000", "from 1 to 1000")),
        (("--steps", "0"), ("--steps 0", "from 1 to")),
        (("--seed", str(2**70)), (f"--seed {2**70}", "0 to 2**64 - 1")),
        (("--seed", "-1"), ("--seed -1", "0 to 2**64 - 1")),
        (("--device", "bogus"), ("--device bogus",)),
        (("--device", "meta"), ("--device meta",)),
    ],
    ids=["steps-5000", "steps-0", "seed-2**70", "seed-negative", "device-bogus", "device-meta"],
)
def test_options_out_of_range_are_refused(lora, tmp_path, capsys, options, fragments):
    rc, grid = sample(tmp_path, "--lora", str(lora), *options)
    assert_refused(capsys, rc, grid, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(lora, tmp_path, capsys):
    rc, grid = sample(tmp_path, "--lora", str(lora), "--device", "cuda")
    assert_refused(capsys, rc, grid, "--device cuda")


def test_an_output_that_is_a_folder_is_refused(lora, tmp_path, capsys):
    folder = tmp_path / "taken.png"
    folder.mkdir()
    rc = main(["sample", "--lora", str(lora), "--prompt", "x", "--steps", "1", "--seed", "0", "-o", str(folder)])
    captured = capsys.readouterr()
    assert rc == 1 and captured.err.startswith("error: -o ") and "folder" in captured.err
    assert not any(folder.iterdir())


def test_an_output_under_a_file_is_refused(lora, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, grid = sample(tmp_path, "--lora", str(lora), output=tmp_path / "file" / "grid.png")
    assert_refused(capsys, rc, grid, "-o ", "not a folder")


def test_the_base_model_recorded_in_the_metadata_is_used_without_model(lora, tmp_path, capsys):
    from sdplug.trainer.models import embedded, save_folder

    folder = tmp_path / "base"
    save_folder(embedded(seed=0), folder)  # the model this LoRA was trained on, as a folder
    recorded = tampered(lora, tmp_path, run=lambda r: r.__setitem__("base_model", str(folder)))
    rc, grid = sample(tmp_path, "--lora", str(recorded))
    captured = capsys.readouterr()
    assert rc == 0 and grid.is_file(), captured.err
    assert "sdplug_run.base_model" in captured.err and str(folder) in captured.err
    assert f"wrote {grid}: {folder}" in captured.out


def test_a_recorded_base_model_that_does_not_exist_is_refused(lora, tmp_path, capsys):
    missing = tmp_path / "gone" / "model"
    recorded = tampered(lora, tmp_path, run=lambda r: r.__setitem__("base_model", str(missing)))
    rc, grid = sample(tmp_path, "--lora", str(recorded))
    assert_refused(capsys, rc, grid, "sdplug_run.base_model", str(missing), "does not exist", "--model")


def test_a_recorded_pickle_checkpoint_is_not_loaded_without_model(lora, tmp_path, capsys):
    pickle = tmp_path / "base.ckpt"
    pickle.write_bytes(b"")
    recorded = tampered(lora, tmp_path, run=lambda r: r.__setitem__("base_model", str(pickle)))
    rc, grid = sample(tmp_path, "--lora", str(recorded))
    assert_refused(capsys, rc, grid, "sdplug_run.base_model", str(pickle), "--model")


def test_a_metadata_preset_must_not_extend_another(lora, tmp_path, capsys):
    (tmp_path / "parent.toml").write_text('[[noise]]\ntype = "gaussian"\n')
    preset = f'[preset]\nname = "child"\nextends = "{tmp_path / "parent.toml"}"\n'
    recorded = tampered(lora, tmp_path, metadata=lambda m: m.__setitem__("sdplug_preset", preset))
    rc, grid = sample(tmp_path, "--lora", str(recorded))
    assert_refused(capsys, rc, grid, "tampered.safetensors", "extends", "--preset")


def test_a_model_folders_saved_preset_must_not_extend_another(tmp_path, capsys):
    from sdplug.trainer.models import embedded, save_folder

    folder = tmp_path / "model"
    save_folder(embedded(seed=0), folder)
    (tmp_path / "parent.toml").write_text('[[noise]]\ntype = "gaussian"\n')
    (folder / "sdplug_preset.toml").write_text(f'[preset]\nname = "child"\nextends = "{tmp_path / "parent.toml"}"\n')
    capsys.readouterr()  # the folder's saving progress
    rc, grid = sample(tmp_path, "--model", str(folder))
    assert_refused(capsys, rc, grid, str(folder), "extends", "--preset")


def test_control_characters_from_metadata_never_reach_the_terminal_raw(lora, tmp_path, capsys):
    escaped = "\\u001b]0;PWNED\\u0007"  # TOML string escapes: the parsed name holds the raw bytes
    named = tampered(lora, tmp_path, metadata=lambda m: m.__setitem__("sdplug_preset", f'[preset]\nname = "{escaped}"\n'))
    rc, grid = sample(tmp_path, "--lora", str(named))
    captured = capsys.readouterr()
    assert rc == 0 and "PWNED" in captured.out
    assert "\x1b" not in captured.out + captured.err and "\x07" not in captured.out + captured.err
    grid.unlink()
    for change, echoed in (
        (dict(metadata=lambda m: m.__setitem__("sdplug_preset", f'[[noise]]\ntype = "{escaped}"\n')), True),
        (dict(metadata=lambda m: m.__setitem__("sdplug_preset", f"{ESCAPE} = [")), False),  # the parser's message
        (dict(run=lambda r: r.__setitem__("base_model", f"/nowhere/{ESCAPE}")), True),
        (dict(run=lambda r: r.__setitem__("prediction_type", ESCAPE)), True),
        (dict(run=lambda r: r.__setitem__("seed", ESCAPE)), True),
    ):
        rc, grid = sample(tmp_path, "--lora", str(tampered(lora, tmp_path, **change)))
        text = assert_refused(capsys, rc, grid, *(["\\x1b]0;PWNED\\x07"] if echoed else []))
        assert "\x1b" not in text and "\x07" not in text
