"""Caption dropout on sd-scripts' cached text-encoder outputs (its SDXL scripts can cache).

A cached batch carries no caption text, so sd-scripts asserts that no caption dropout is set.
sdplug keeps dropout working instead: the empty caption is encoded once, by sd-scripts' own
caching code right after it cached the dataset (same encoders, dtype, autocast and token
length as every cached row), and a dropped sample's rows are replaced by it.

Where the cached tensors live in a batch differs by version:
- main: ``example["text_encoder_outputs_list"]``, a list of batched tensors (SDXL: hidden
  states of both encoders and the pooled output), filled by the caching strategy;
- v0.8.7: ``example["text_encoder_outputs1_list"]``, ``["text_encoder_outputs2_list"]`` and
  ``["text_encoder_pool2_list"]``.
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace
from typing import cast

import numpy as np
import torch

from sdplug.errors import SdplugError

BATCH_KEYS = {
    "main": ("text_encoder_outputs_list",),
    "v0.8.7": ("text_encoder_outputs1_list", "text_encoder_outputs2_list", "text_encoder_pool2_list"),
}


def cached_tensors(example: dict, version: str) -> list[torch.Tensor] | None:
    """The batch's cached text-encoder tensors (first dimension = sample), or None if uncached."""
    if version == "main":
        outputs = example.get("text_encoder_outputs_list")
        return list(outputs) if outputs is not None else None
    tensors = [example.get(key) for key in BATCH_KEYS[version]]
    # cached batches carry every key of their version (None only when nothing was cached)
    return cast("list[torch.Tensor]", tensors) if tensors[0] is not None else None


def encode_empty_main(train_util, models) -> list[torch.Tensor]:
    """The empty caption through main's caching strategy, exactly as a cached dataset row."""
    tokenize = train_util.TokenizeStrategy.get_strategy()
    encoding = train_util.TextEncodingStrategy.get_strategy()
    caching = train_util.TextEncoderOutputsCachingStrategy.get_strategy()
    with tempfile.TemporaryDirectory(prefix="sdplug-empty-caption-") as folder:
        # a stand-in image entry; with caching to disk its outputs go to this temporary file
        info = SimpleNamespace(
            caption="",
            text_encoder_outputs=None,
            text_encoder_outputs_npz=os.path.join(folder, "empty_caption_te_outputs.npz"),
        )
        caching.cache_batch_outputs(tokenize, models, encoding, [info])
        outputs = info.text_encoder_outputs
        if outputs is None:
            outputs = caching.load_outputs_npz(info.text_encoder_outputs_npz)
        return [torch.as_tensor(np.asarray(o)).clone() for o in outputs]


def encode_empty_v087(train_util, dataset, tokenizers, text_encoders, weight_dtype) -> list[torch.Tensor]:
    """The empty caption through v0.8.7's batch caching function, exactly as a cached row."""
    info = SimpleNamespace(caption="", text_encoder_outputs1=None, text_encoder_outputs2=None, text_encoder_pool2=None)
    ids1 = dataset.get_input_ids("", tokenizers[0]).unsqueeze(0)
    ids2 = dataset.get_input_ids("", tokenizers[1]).unsqueeze(0)
    train_util.cache_batch_text_encoder_outputs(
        [info], tokenizers, text_encoders, dataset.max_token_length, False, ids1, ids2, weight_dtype
    )
    return [info.text_encoder_outputs1, info.text_encoder_outputs2, info.text_encoder_pool2]


def substitute_row(tensors: list[torch.Tensor], row: int, empty: list[torch.Tensor]) -> None:
    """Put the empty caption's outputs in place of sample ``row`` (the batch tensors are fresh stacks)."""
    if len(tensors) != len(empty):
        raise SdplugError(
            f"sd-scripts' cached batch has {len(tensors)} text-encoder tensors but the empty caption encoded to "
            f"{len(empty)}; cannot substitute it."
        )
    for tensor, value in zip(tensors, empty, strict=True):
        if tuple(tensor.shape[1:]) != tuple(value.shape):
            raise SdplugError(
                f"sd-scripts' cached text-encoder rows have shape {tuple(tensor.shape[1:])} but the empty caption's "
                f"has {tuple(value.shape)}; cannot substitute it for a dropped caption."
            )
        tensor[row] = value.to(device=tensor.device, dtype=tensor.dtype)
