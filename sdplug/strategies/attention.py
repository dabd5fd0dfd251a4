"""Attention implementations for diffusers models, swapped in through attention processors."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from sdplug.errors import MissingDependencyError
from sdplug.optional import require
from sdplug.params import strategy_params
from sdplug.strategies.base import AttentionStrategy


@strategy_params
class SDPAAttention(AttentionStrategy):
    """PyTorch ``scaled_dot_product_attention`` (memory-efficient / flash kernels where available; diffusers' default on torch 2)."""

    def processor(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()


@strategy_params
class DefaultAttention(AttentionStrategy):
    """The classic attention: explicit softmax(QK^T)V, memory quadratic in tokens (diffusers' ``AttnProcessor``)."""

    def processor(self):
        from diffusers.models.attention_processor import AttnProcessor

        return AttnProcessor()


@strategy_params
class XFormersAttention(AttentionStrategy):
    """xformers' memory-efficient attention kernels (Lefaudeux et al., xformers; Rabe & Staats, 2021). Needs CUDA."""

    def check_available(self) -> None:
        require("xformers", feature="attention 'xformers'")
        if not torch.cuda.is_available():
            raise MissingDependencyError(
                "attention 'xformers' needs a CUDA GPU and this machine has none; "
                "use attention 'sdpa' (PyTorch's memory-efficient attention, which also runs on CPU)."
            )

    def processor(self):
        from diffusers.models.attention_processor import XFormersAttnProcessor

        return XFormersAttnProcessor()


@strategy_params
class SlicedAttention(AttentionStrategy):
    """Sliced attention: computes attention a few heads at a time to cap peak memory (diffusers' ``SlicedAttnProcessor``).

    ``slice_size``: heads per slice, or ``"auto"`` (half the heads) / ``"max"`` (one at a time).
    """

    slice_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto", "max"] = "auto"

    def apply(self, model: torch.nn.Module) -> int:
        from diffusers.models.attention_processor import SlicedAttnProcessor

        super().check_available()
        if not hasattr(model, "set_attention_slice"):
            return super().apply(model)  # reports the model as unsupported
        model.set_attention_slice(self.slice_size)
        changed = sum(isinstance(p, SlicedAttnProcessor) for p in model.attn_processors.values())
        if changed == 0:
            from sdplug.errors import SdplugError

            raise SdplugError(f"sliced attention found no attention module to slice in {type(model).__name__}.")
        return changed
