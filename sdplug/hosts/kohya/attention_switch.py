"""The preset's attention inside sd-scripts' own UNet, through kohya's ``replace_unet_modules``.

kohya's UNets (``library.original_unet``, ``sdxl_original_unet``) do not take diffusers'
attention processors: their ``CrossAttention`` picks its kernel from three switches in its
forward (xformers, mem_eff, sdpa; none is kohya's plain softmax attention). The record says
what every attention module ran before and after the switch, so an audit shows a real change,
or that the modules ran so already, never just a count.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from sdplug.errors import SdplugError

# preset attention -> replace_unet_modules(unet, mem_eff_attn, xformers, sdpa), and what kohya's
# attention modules then run
ATTENTION_FLAGS = {"default": (False, False, False), "xformers": (False, True, False), "sdpa": (False, False, True)}
ATTENTION_IMPL = {"default": "vanilla", "xformers": "xformers", "sdpa": "sdpa"}


def attention_impl(module: torch.nn.Module) -> str:
    """What one of kohya's attention modules runs, by the switches its forward checks, in order."""
    if getattr(module, "processor", None) is not None:
        return f"processor {type(module.processor).__name__}"
    for attribute, name in (
        ("use_memory_efficient_attention_xformers", "xformers"),
        ("use_memory_efficient_attention_mem_eff", "mem_eff"),
        ("use_sdpa", "sdpa"),
    ):
        if getattr(module, attribute, False):
            return name
    return "vanilla"


def _census(modules: list[torch.nn.Module]) -> list[str]:
    return [f"{type(m).__name__}: {attention_impl(m)}" for m in modules]


def switch_attention(replace, unet: torch.nn.Module, kind: str) -> dict[str, Any]:
    """Switch ``unet`` to the preset's ``kind`` with kohya's ``replace``; the audit's record."""
    if kind not in ATTENTION_FLAGS:
        raise SdplugError(
            f"attention {kind!r} is not available inside sd-scripts' own UNet; allowed there: {', '.join(ATTENTION_FLAGS)}."
        )
    modules = [m for m in unet.modules() if hasattr(m, "to_q") and hasattr(m, "to_k")]  # attention layers
    if not modules:
        raise SdplugError(f"attention {kind!r}: found no attention module in {type(unet).__name__} to switch")
    before = _census(modules)
    replace(unet, *ATTENTION_FLAGS[kind])
    after = _census(modules)
    wrong = sorted({a for a in after if not a.endswith(f": {ATTENTION_IMPL[kind]}")})
    if wrong:
        raise SdplugError(
            f"attention {kind!r}: after sd-scripts' switch, attention modules still run {', '.join(wrong)}; "
            f"expected {ATTENTION_IMPL[kind]!r} in all {len(modules)}."
        )
    return {
        "strategy": kind,
        "before": dict(collections.Counter(before)),
        "after": dict(collections.Counter(after)),
        "modules": len(modules),
        "changed": sum(b != a for b, a in zip(before, after, strict=True)),
    }
