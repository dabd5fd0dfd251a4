"""Attention implementations for diffusers models, swapped in through attention processors."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, cast

import torch
from pydantic import Field

from sdplug.errors import MissingDependencyError, PresetError, SdplugError
from sdplug.optional import require
from sdplug.params import strategy_params
from sdplug.strategies.base import AttentionStrategy, ProcessorModel


class _SliceableModel(ProcessorModel, Protocol):
    """A diffusers model that can slice its attention (``UNet2DConditionModel`` and others)."""

    def set_attention_slice(self, slice_size: Any) -> None: ...


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
    A number is checked against the model when applied: it can be at most the head count of the
    model's smallest attention layer.
    """

    slice_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto", "max"] = "auto"

    def apply(self, model: torch.nn.Module) -> int:
        from diffusers.models.attention_processor import SlicedAttnProcessor

        super().check_available()
        if not hasattr(model, "set_attention_slice"):
            return super().apply(model)  # reports the model as unsupported
        sliceable = cast(_SliceableModel, model)  # checked just above
        sliceable.set_attention_slice(self._sizes(model))
        changed = sum(isinstance(p, SlicedAttnProcessor) for p in sliceable.attn_processors.values())
        if changed == 0:
            raise SdplugError(f"sliced attention found no attention module to slice in {type(model).__name__}.")
        return changed

    def _sizes(self, model: torch.nn.Module) -> list[int] | int | str:
        """One slice size per sliceable layer, in the order ``set_attention_slice`` takes a list."""
        all_heads = _sliceable_heads(model)
        heads = [h for h in all_heads if h is not None]
        if not heads or len(heads) < len(all_heads):  # not diffusers' Attention layers: let the model decide
            return self.slice_size
        if self.slice_size == "max":
            return [1] * len(heads)
        if self.slice_size == "auto":
            # diffusers' "auto" is heads // 2, which is 0 (a division by zero later) for one head
            return [max(1, h // 2) for h in heads]
        fewest = min(heads)
        if self.slice_size > fewest:
            raise PresetError(
                f"attention 'sliced' slice_size = {self.slice_size} is more than the {fewest} attention heads of "
                f"{type(model).__name__}'s smallest attention layer (a slice is a group of heads). "
                f"Allowed for this model: an integer from 1 to {fewest}, 'auto' or 'max'.",
                key="attention.slice_size",
            )
        return [self.slice_size] * len(heads)


def _sliceable_heads(model: torch.nn.Module) -> list[int | None]:
    """Head counts of the layers ``model.set_attention_slice`` slices: a depth-first walk of its
    children, as diffusers walks them, so a list of sizes lines up with its layers."""
    heads: list[int | None] = []

    def visit(module: torch.nn.Module) -> None:
        if hasattr(module, "set_attention_slice"):
            heads.append(getattr(module, "sliceable_head_dim", None))
        for child in module.children():
            visit(child)

    for child in model.children():
        visit(child)
    return heads
