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

A flow script's cached list holds several text encoders' outputs (``ENCODER_SLOTS``), so a
dropout naming one encoder replaces that encoder's part of the row alone, with the same part of
the empty caption's encoding. kohya's own per-encoder dropout (SD3's ``--clip_l_dropout_rate``
and siblings, Anima's) writes zeros instead. sdplug gives the empty caption's encoding because
that is what classifier-free guidance feeds the model as its unconditional input: kohya's and
diffusers' SD3 and FLUX samplers encode the negative prompt ``""`` through every encoder, never
zeros. (SD3's reference code feeds zeros for an absent T5 at inference; a preset that wants that
model's T5-less use is the one case zeros would serve, and sdplug does not offer it.)

Some encoders' cached rows vary in length (HunyuanImage's Qwen2.5-VL rows are as long as their
caption's tokens), and main's collation pads them with zeros to the batch's longest, a zero mask
marking the padding. The empty caption's rows are fitted to a batch the same way, whichever of
the two is shorter; v0.8.7's rows are fixed-length, and a row of another shape there is refused.
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


# each flow script's cached list (its caching strategy's ``load_outputs_npz`` order), by text
# encoder: (tensor index, the columns of the last dimension that are this encoder's, None = all)
_CLIP_L_WIDTH = 768  # SD3 concatenates CLIP-L's 768 columns and CLIP-G's 1280 (kohya splits at 768 too)
ENCODER_SLOTS: dict[str, dict[str, tuple[tuple[int, tuple[int, int | None] | None], ...]]] = {
    # FLUX.1: [l_pooled, t5_out, txt_ids, t5_attn_mask]
    "flux_train_network.py": {"clip_l": ((0, None),), "t5xxl": ((1, None), (3, None))},
    # SD3: [lg_out, t5_out, lg_pooled, l_attn_mask, g_attn_mask, t5_attn_mask]
    "sd3_train_network.py": {
        "clip_l": ((0, (0, _CLIP_L_WIDTH)), (2, (0, _CLIP_L_WIDTH)), (3, None)),
        "clip_g": ((0, (_CLIP_L_WIDTH, None)), (2, (_CLIP_L_WIDTH, None)), (4, None)),
        "t5xxl": ((1, None), (5, None)),
    },
    # Lumina 2: [hidden_state, input_ids, attention_mask]
    "lumina_train_network.py": {"gemma2": ((0, None), (1, None), (2, None))},
    # HunyuanImage 2.1: [vlm_embed, vlm_mask, byt5_embed, byt5_mask, ocr_mask] (the OCR mask marks byT5's glyph text)
    "hunyuan_image_train_network.py": {"qwen2_5_vl": ((0, None), (1, None)), "byt5": ((2, None), (3, None), (4, None))},
    # Anima: [prompt_embeds, attn_mask, t5_input_ids, t5_attn_mask, caption_dropout_rate] (the rate is the
    # subset's, which a preset's [caption] leaves at 0: kohya's own dropout there is refused)
    "anima_train_network.py": {"qwen3": ((0, None), (1, None), (2, None), (3, None))},
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
            image_key="sdplug-empty-caption",  # Lumina's strategy names its cache by it
            caption_dropout_rate=0.0,  # Anima's strategy caches the subset's rate with each row
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


def _fitted(tensors: list[torch.Tensor], index: int, value: torch.Tensor, pad_sequences: bool) -> torch.Tensor | None:
    """``value`` (one row) fitted to the batch tensor ``tensors[index]``, or None if it cannot be.
    With ``pad_sequences`` (main), rows that differ in length alone are padded as main's collation
    pads them (``train_util``'s ``none_or_stack_elements``: zeros after, along the first dimension
    of a row), the batch tensor replaced in ``tensors`` when it is the shorter."""
    batch = tensors[index]
    row_shape, shape = tuple(batch.shape[1:]), tuple(value.shape)
    if row_shape == shape:
        return value
    if not pad_sequences or not shape or len(row_shape) != len(shape) or row_shape[1:] != shape[1:]:
        return None
    length = max(row_shape[0], shape[0])
    if row_shape[0] < length:
        tensors[index] = torch.nn.functional.pad(batch, (0, 0) * (batch.dim() - 2) + (0, length - row_shape[0]))
    if shape[0] < length:
        value = torch.nn.functional.pad(value, (0, 0) * (value.dim() - 1) + (0, length - shape[0]))
    return value


def substitute_row(tensors: list[torch.Tensor], row: int, empty: list[torch.Tensor], pad_sequences: bool = False) -> None:
    """Put the empty caption's outputs in place of sample ``row`` (the batch tensors are fresh stacks;
    one may be replaced by a longer one, see ``_fitted``)."""
    if len(tensors) != len(empty):
        raise SdplugError(
            f"sd-scripts' cached batch has {len(tensors)} text-encoder tensors but the empty caption encoded to "
            f"{len(empty)}; cannot substitute it."
        )
    for index, value in enumerate(empty):
        fitted = _fitted(tensors, index, value, pad_sequences)
        if fitted is None:
            raise SdplugError(
                f"sd-scripts' cached text-encoder rows have shape {tuple(tensors[index].shape[1:])} but the empty caption's "
                f"has {tuple(value.shape)}; cannot substitute it for a dropped caption."
            )
        tensors[index][row] = fitted.to(device=tensors[index].device, dtype=tensors[index].dtype)


def substitute_encoders(
    tensors: list[torch.Tensor],
    row: int,
    empty: list[torch.Tensor],
    slots: dict[str, tuple[tuple[int, tuple[int, int | None] | None], ...]],
    encoders: frozenset[str],
    pad_sequences: bool = False,
) -> None:
    """Put the empty caption's outputs of ``encoders`` alone in place of sample ``row``'s (a batch
    tensor may be replaced by a longer one, see ``_fitted``)."""
    for encoder in sorted(encoders):
        for index, columns in slots[encoder]:
            fitted = _fitted(tensors, index, empty[index], pad_sequences) if index < len(tensors) else None
            if fitted is None:
                raise SdplugError(
                    f"sd-scripts' cached text-encoder outputs do not have the layout sdplug knows for {encoder} (tensor "
                    f"{index}); cannot substitute the empty caption's."
                )
            value = fitted.to(device=tensors[index].device, dtype=tensors[index].dtype)
            if columns is None:
                tensors[index][row] = value
            else:
                tensors[index][row][..., columns[0] : columns[1]] = value[..., columns[0] : columns[1]]
