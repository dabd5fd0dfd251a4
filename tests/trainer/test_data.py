"""Training data: caption files as written by real editors, and each sample's own epoch."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sdplug.plan import bind
from sdplug.preset import parse_preset
from sdplug.trainer.batches import TrainingInputs
from sdplug.trainer.data import BatchSampler, DataError, Example, find_examples
from sdplug.trainer.loop import Trainer


def folder_with_caption(tmp_path: Path, caption: bytes) -> Path:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(caption)
    return tmp_path


def test_a_latin1_caption_names_the_file(tmp_path):
    folder_with_caption(tmp_path, "caf\xe9, dog".encode("latin-1"))
    with pytest.raises(DataError) as info:
        find_examples(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "a.txt") in message and "not UTF-8" in message and "\n" not in message


def test_a_caption_bom_is_not_part_of_the_caption(tmp_path):
    folder_with_caption(tmp_path, b"\xef\xbb\xbfsks dog, grass\n")
    assert [e.caption for e in find_examples(tmp_path)] == ["sks dog, grass"]


def test_batch_sampler_gives_each_sample_its_own_epoch():
    sampler = BatchSampler(3, 2, torch.Generator().manual_seed(0))
    batches = [sampler.next() for _ in range(3)]
    assert [epochs for epochs, _ in batches] == [[0, 0], [0, 1], [1, 1]]  # the second batch straddles
    first_epoch = batches[0][1] + batches[1][1][:1]
    assert sorted(first_epoch) == [0, 1, 2]


def every_second_epoch_plan(sd_alphas):
    preset = parse_preset({"caption": [{"type": "dropout", "rate": 0.0, "every_n_epochs": 2}]}, path="p.toml")
    return bind(preset, alphas_cumprod=sd_alphas, prediction_type="epsilon")


def inputs_for(plan, **fields):
    """TrainingInputs with only what text() reads (the rest of a run is not needed here)."""
    inputs = TrainingInputs.__new__(TrainingInputs)
    inputs.plan, inputs.device = plan, "cpu"
    for name, value in fields.items():
        setattr(inputs, name, value)
    return inputs


def test_cached_text_decides_dropout_with_each_samples_epoch(sd_alphas):
    inputs = inputs_for(every_second_epoch_plan(sd_alphas), text_cache={"": torch.zeros(3), "a": torch.ones(3)})
    states, dropped = inputs.text(None, ["a", "a"], [0, 1], train_text_encoder=False)  # epoch 1: every_n_epochs = 2 drops
    assert dropped == [False, True]
    assert states[:, 0].tolist() == [1.0, 0.0]


def test_encoded_text_decides_dropout_with_each_samples_epoch(sd_alphas):
    seen = []

    def tokenizer(texts, **_):
        seen.extend(texts)
        return SimpleNamespace(input_ids=torch.zeros(len(texts), 4, dtype=torch.long))

    tokenizer.model_max_length = 4
    inputs = inputs_for(every_second_epoch_plan(sd_alphas), text_cache=None, bundle=SimpleNamespace(tokenizer=tokenizer))
    encoder = lambda tokens: (torch.zeros(tokens.shape[0], 4, 8),)  # noqa: E731
    _, dropped = inputs.text(encoder, ["a", "b", "c"], [1, 2, 3], train_text_encoder=False)
    assert dropped == [True, False, True] and seen == ["", "b", ""]


def test_loss_passes_each_samples_epoch_to_the_captions():
    class Stop(Exception):
        pass

    def text(encoder, captions, epochs, **_):
        raise Stop(epochs)

    sampler = BatchSampler(3, 2, torch.Generator().manual_seed(0))
    sampler.next()  # the next batch straddles epochs 0 and 1
    host = SimpleNamespace(inputs=SimpleNamespace(text=text), text_encoder=None, config=SimpleNamespace(train_text_encoder=False))
    with pytest.raises(Stop) as info:
        Trainer._loss(host, sampler, [Example(Path("x.png"), "c")] * 3, None)
    assert info.value.args[0] == [0, 1]
