"""Using what was trained: model folders diffusers loads, and `sdplug sample` reproducing the
run's own 'after' grid from the saved LoRA or model (same start noise, same sampler)."""

import contextlib
import io
import warnings

import pytest
import torch
from PIL import Image

from sdplug.cli import main
from sdplug.errors import SdplugError
from sdplug.trainer.config import TrainConfig
from sdplug.trainer.generate import SampleRequest, generate
from sdplug.trainer.loop import Trainer, train
from sdplug.trainer.models import load
from sdplug.trainer.synthetic import write_dataset

PRESET = '[[noise]]\ntype = "pyramid"\n[optimizer]\ntype = "adamw"\nlr = 1e-2\n'
PROMPTS = ("a red circle on a black background", "a blue square on a white background")
GRID = dict(sample_prompts=PROMPTS, sample_seeds=(0, 1), guidance_scales=(3.0,), sample_steps=2)


def run(tmp_path, **options):
    (tmp_path / "p.toml").write_text(PRESET)
    config = TrainConfig(preset=str(tmp_path / "p.toml"), output=tmp_path / "out", steps=2, batch_size=4, progress=False)
    for key, value in {**GRID, **options}.items():
        setattr(config, key, value)
    trainer = Trainer(config)
    trainer.run()
    return trainer


def request(tmp_path, **options):
    return SampleRequest(
        prompts=list(PROMPTS), output=tmp_path / "grid.png", guidance_scales=[3.0], seeds=[0, 1], steps=2, **options
    )


def test_sample_with_an_embedded_lora_reproduces_the_runs_after_grid(tmp_path):
    trainer = run(tmp_path, train_text_encoder=True, seed=3)
    after, before = trainer.samples_after[3.0], trainer.samples_before[3.0]
    assert not torch.allclose(after, before, atol=1e-3)  # the LoRA changed something
    images, line = generate(request(tmp_path, lora=trainer.config.output / "lora.safetensors"))
    # the base model is rebuilt from the seed in the LoRA's metadata; the start noise is the preset's
    assert torch.allclose(images[3.0], after, atol=1e-4)
    assert "pyramid noise (preset p" in line and (tmp_path / "grid.png").is_file()
    gaussian, _ = generate(request(tmp_path, lora=trainer.config.output / "lora.safetensors", noise="gaussian"))
    assert not torch.allclose(gaussian[3.0], after, atol=1e-3)
    lora_file, grid = str(trainer.config.output / "lora.safetensors"), tmp_path / "cli" / "grid.png"
    assert main(["sample", "--lora", lora_file, "--prompt", *PROMPTS, "--guidance", "3", "--steps", "2", "-o", str(grid)]) == 0
    assert Image.open(grid).size == Image.open(trainer.config.output / "samples-after.png").size


def test_sample_with_a_lora_on_a_loaded_model(tmp_path, tiny_sd):
    data = write_dataset(tmp_path / "data", per_combination=1)
    trainer = run(tmp_path, model=tiny_sd, data=data)
    images, _ = generate(request(tmp_path, model=tiny_sd, lora=trainer.config.output / "lora.safetensors"))
    assert torch.allclose(images[3.0], trainer.samples_after[3.0], atol=1e-4)
    # without --model, the base model folder the LoRA's metadata records is used while it exists
    recorded, _ = generate(request(tmp_path, lora=trainer.config.output / "lora.safetensors"))
    assert torch.allclose(recorded[3.0], trainer.samples_after[3.0], atol=1e-4)


def test_embedded_dreambooth_folder_loads_in_diffusers_and_samples_back(tmp_path, capfd):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run(tmp_path, mode="dreambooth")
    assert not [w for w in caught if "steps_offset" in str(w.message)]
    assert "cannot be saved" not in capfd.readouterr().err  # the absent VAE is by design
    folder = trainer.config.output / "model"
    assert (folder / "model_index.json").is_file() and load(folder).pixel_space
    pipe = StableDiffusionPipeline.from_pretrained(folder, vae=None, local_files_only=True)
    pixels = pipe(PROMPTS[0], num_inference_steps=1, output_type="latent").images
    assert pixels.shape == (1, 3, 32, 32)
    images, line = generate(request(tmp_path, model=folder))
    assert torch.allclose(images[3.0], trainer.samples_after[3.0], atol=1e-4)
    assert "sdplug_preset.toml" in line  # the preset saved with the model chose the start noise


def test_dreambooth_on_a_model_without_data_warns_and_saves_a_pipeline_folder(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    (tmp_path / "p.toml").write_text(PRESET)
    config = TrainConfig(
        preset=str(tmp_path / "p.toml"), model=tiny_sd, mode="dreambooth", output=tmp_path / "out", steps=1,
        batch_size=2, samples=False, progress=False,
    )  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train(config)
    assert f"WARNING: --model without --data: training {tiny_sd} on the built-in 32x32 synthetic shapes" in stdout.getvalue()
    pipe = StableDiffusionPipeline.from_pretrained(config.output / "model", local_files_only=True, safety_checker=None)
    assert pipe.vae is not None and not load(config.output / "model").pixel_space


def test_sample_command_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "--prompt", "x", "-o", str(tmp_path / "g.png")]) == 1
    assert "needs --model (a model folder) or --lora" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert main(["sample", "--prompt", "x", "--lora", str(tmp_path / "bad.safetensors")]) == 1
    assert "not a readable .safetensors file" in capsys.readouterr().err
    assert main(["sample", "--prompt", "x", "--model", str(tmp_path), "-o", str(tmp_path / "g.txt")]) == 1
    assert "not an image file name" in capsys.readouterr().err


def test_a_lora_for_another_model_is_refused_not_partly_applied(tmp_path):
    from safetensors.torch import save_file

    from sdplug.trainer.generate import merge_kohya_lora
    from sdplug.trainer.models import embedded

    bundle = embedded()
    down, up = torch.zeros(4, 7), torch.zeros(7, 4)
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": down, "lora_unet_nowhere_to_q.lora_up.weight": up}, str(tmp_path / "x"))
    from safetensors.torch import load_file

    with pytest.raises(SdplugError, match="1 of its 1 layers are not linear layers of this model"):
        merge_kohya_lora(bundle, load_file(str(tmp_path / "x")), tmp_path / "x")
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(SdplugError, match="is 7x7, the model's layer is"):
        merge_kohya_lora(bundle, {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, tmp_path / "x")
