"""Masked loss in the reference trainer: masks from -masklabel.png files or alpha channels."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from sdplug.trainer import data
from sdplug.trainer.config import OptionError, TrainConfig
from sdplug.trainer.loop import Trainer


@pytest.fixture
def masked_data(tmp_path, small_data):
    folder = tmp_path / "masked"
    shutil.copytree(small_data, folder)
    images = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    for image in images:  # every mask black: nothing to train on
        Image.new("L", (32, 32), 0).save(image.with_name(image.stem + data.MASK_SUFFIX))
    return folder, images


def test_mask_files_are_not_examples_and_load_as_their_grey_levels(masked_data, tmp_path):
    folder, images = masked_data
    assert len(data.find_examples(folder)) == len(images)  # the -masklabel files are masks, not images
    half = Image.new("L", (32, 32), 0)
    half.paste(255, (0, 0, 16, 32))
    half.save(images[0].with_name(images[0].stem + data.MASK_SUFFIX))
    mask = data.load_mask(images[0], 32)
    assert mask.shape == (1, 32, 32) and mask[0, :, :16].min() == 1.0 and mask[0, :, 16:].max() == 0.0
    rgba = tmp_path / "alpha.png"
    image = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    image.putalpha(Image.new("L", (32, 32), 128))
    image.save(rgba)
    assert torch.allclose(data.load_mask(rgba, 32), torch.full((1, 32, 32), 128 / 255))
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert data.load_mask(tmp_path / "plain.png", 8) is None  # no mask file, no alpha: no mask


def train(tmp_path, folder, preset_text, **options):
    preset = tmp_path / "p.toml"
    preset.write_text(preset_text)
    config = TrainConfig(
        preset=str(preset), output=tmp_path / "out", data=folder, steps=2, batch_size=4, samples=False, progress=False, **options
    )
    trainer = Trainer(config)
    return trainer, trainer.run()


@pytest.mark.parametrize("normalize", [False, True])
def test_an_all_black_mask_trains_on_nothing(tmp_path, masked_data, normalize):
    folder, images = masked_data
    preset = f'[loss]\ntype = "mse"\nnormalize_by_mask_area = {str(normalize).lower()}\n'
    trainer, report = train(tmp_path, folder, preset, masked_loss=True)
    assert report["masked_loss"]["images_with_mask"] == len(images) and report["masked_loss"]["mean_mask"] == 0.0
    assert trainer.losses == [0.0, 0.0]  # every pixel masked out: no loss, and no NaN from the area


def test_unmasked_weight_keeps_a_share_of_the_masked_out_loss(tmp_path, masked_data):
    folder, _ = masked_data
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, _ = train(tmp_path / "a", folder, '[loss]\ntype = "mse"\n')
    masked, _ = train(tmp_path / "b", folder, '[loss]\ntype = "mse"\nunmasked_weight = 0.5\n', masked_loss=True)
    # the same draws; every pixel masked out but weighted 0.5: half the first step's loss
    assert masked.losses[0] == pytest.approx(0.5 * plain.losses[0], rel=1e-5)


def test_mask_options_without_masks_and_masks_that_are_not_there_are_refused(tmp_path, small_data):
    with pytest.raises(OptionError, match=r"\[loss\] sets mask options, and this run has no masks: add --masked-loss"):
        train(tmp_path, small_data, '[loss]\ntype = "mse"\nunmasked_weight = 0.1\n')
    with pytest.raises(data.DataError, match="none of the .* images has a mask"):
        train(tmp_path, small_data, '[loss]\ntype = "l1"\n', masked_loss=True)
