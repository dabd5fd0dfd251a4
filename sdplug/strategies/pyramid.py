"""Pyramid (multi-resolution) noise.

Source: J. Whitaker, "Multi-Resolution Noise for Diffusion Model Training" (2023). Gaussian noise plus Gaussian noise drawn at random lower
resolutions (each side divided by ``r**i``, ``r ~ U(scale_min, scale_max)``), bilinearly
upsampled and weighted by ``discount**i``, then rescaled to about unit variance.

Cost (about 2x ``randn_like``; ``sdplug bench pyramid`` prints it): each level is upsampled
separably by two small interpolation matrices, exactly what
``F.interpolate(mode="bilinear", align_corners=False)`` computes (see ``bilinear_matrix``), and
added straight into the full-size noise; all levels come from one random draw, and the std
for normalising from one sum and one dot product.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Annotated, Literal

import torch
from pydantic import Field

from sdplug.params import strategy_params
from sdplug.strategies._tensor import Normalize, normalize_, work_dtype
from sdplug.strategies.base import NoiseStrategy


@functools.lru_cache(maxsize=512)
def _bilinear_matrix_cpu(out_size: int, in_size: int) -> torch.Tensor:
    # Same source-index rule as PyTorch's upsample_bilinear2d with align_corners=False.
    scale = in_size / out_size
    dst = torch.arange(out_size, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((dst.long(), lo), 1.0 - frac, accumulate=True)
    matrix.index_put_((dst.long(), hi), frac, accumulate=True)
    return matrix


@functools.lru_cache(maxsize=512)
def bilinear_matrix(out_size: int, in_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """M with ``M @ v`` equal to 1-D bilinear resizing of ``v`` from ``in_size`` to ``out_size``."""
    return _bilinear_matrix_cpu(out_size, in_size).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=1024)
def _widen_matrix(width: int, w: int, weight: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(w, W): bilinear widening of a level's rows, with the level's weight folded in."""
    return (bilinear_matrix(width, w, device, dtype).T * weight).contiguous()


def level_sizes(height: int, width: int, scales: list[float], variant: str) -> list[tuple[int, int]]:
    """The (h, w) of each low-resolution level for the drawn ``scales`` (one r per level).

    ``intended``: level i (from 1) has ``(H / r_i**i, W / r_i**i)``.
    ``seed-exact``: the seed code's loop, which starts at i = 0 and divides the *previous*
    level's size by ``r_i**i`` because it overwrites ``w, h``; its level 0 is full size.
    ``kohya``: sd-scripts' ``multires_noise_*`` loop: the intended sizes, but from i = 0, so
    its level 0 is a second full-size Gaussian.
    All stop after the first level with a side of 1.
    """
    sizes = []
    h, w = height, width
    first = 1 if variant == "intended" else 0
    for i, r in enumerate(scales, start=first):
        base_h, base_w = (h, w) if variant == "seed-exact" else (height, width)
        h, w = max(1, int(base_h / r**i)), max(1, int(base_w / r**i))
        sizes.append((h, w))
        if h == 1 or w == 1:
            break
    return sizes


@strategy_params
class PyramidNoise(NoiseStrategy):
    """Multi-resolution (pyramid) noise: Gaussian noise plus upsampled low-resolution noise (Whitaker 2023).

    Parameters:
      discount: weight ``discount**i`` of level i; the article found 0.8 better than 0.9.
      iterations: at most this many levels (the seed code loops 10 times).
      scale_min, scale_max: each level's ``r`` is drawn from ``U(scale_min, scale_max)``; seed: 2-4.
      variant: ``"intended"`` (level i is ``1/r**i`` of full size), ``"seed-exact"`` (the
        seed code's shrinking ``w, h`` and its full-size level 0) or ``"kohya"`` (sd-scripts'
        ``multires_noise_*``: intended sizes plus a full-size level 0); see ``level_sizes``.
      normalize: divide by the std of the whole batch (seed), of each sample, or ``"none"``,
        which keeps the white component at unit variance.
    """

    processes = frozenset({"ddpm", "flow"})  # the noise's law, whatever process mixes it in

    discount: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    iterations: Annotated[int, Field(ge=1, le=16)] = 10
    scale_min: Annotated[float, Field(gt=1.0, le=16.0)] = 2.0
    scale_max: Annotated[float, Field(gt=1.0, le=16.0)] = 4.0
    variant: Literal["intended", "seed-exact", "kohya"] = "intended"
    normalize: Normalize = "batch"

    def __post_init__(self):
        if self.scale_max < self.scale_min:
            raise ValueError(f"scale_max ({self.scale_max}) must be >= scale_min ({self.scale_min}).")

    uses_host_rng = True

    def transform(self, noise, latents, generator, host_rng: random.Random | None = None):
        if latents.dim() != 4:
            raise ValueError(f"pyramid noise needs (B, C, H, W) latents, got shape {tuple(latents.shape)}")
        b, c, height, width = latents.shape
        maps = b * c
        dtype = work_dtype(latents)
        device = latents.device
        if host_rng is not None:  # the plan's host stream: the sizes are known without reading the device
            unit = [host_rng.random() for _ in range(self.iterations)]
        else:  # one draw for all levels' r: a call per level costs as much as a small level itself
            unit = torch.rand(self.iterations, generator=generator, device=device, dtype=torch.float64).tolist()
        scales = [self.scale_min + (self.scale_max - self.scale_min) * u for u in unit]
        sizes = level_sizes(height, width, scales, self.variant)
        first = 1 if self.variant == "intended" else 0
        low = tuple((i, h, w) for i, (h, w) in enumerate(sizes, start=first) if (h, w) != (height, width))
        has_level0 = len(low) < len(sizes)  # seed-exact: level 0 is one more full-size N(0, 1)

        if noise is None:
            out = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
        else:  # after other strategies: add onto a copy of their noise
            out = noise.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        # seed-exact level 0 (r**0 = 1) is one more full-size N(0, 1). On a fresh draw,
        # N(0,1) + N(0,1) has the law of sqrt(2) N(0,1): the low levels are scaled by
        # 1/sqrt(2) instead (no extra pass), and sqrt(2) is restored only if not normalising.
        level0_scale = 1.0
        if has_level0:
            if noise is None:
                level0_scale = math.sqrt(2.0)
            else:
                out.add_(torch.randn(out.shape, generator=generator, device=device, dtype=dtype))
        if low:
            # Each level is upsampled separably by two small matrices (exactly bilinear, see
            # bilinear_matrix): a 2-D product widens its rows to W, then one batched product
            # adds its H rows straight into ``out``. All levels share one random draw.
            draws = torch.randn(maps * sum(h * w for _, h, w in low), generator=generator, device=device, dtype=dtype)
            target = out.view(maps, height, width)
            offset = 0
            for i, h, w in low:
                level = draws[offset : offset + maps * h * w].view(maps * h, w)
                offset += maps * h * w
                widened = level.mm(_widen_matrix(width, w, self.discount**i / level0_scale, device, dtype))
                rows = bilinear_matrix(height, h, device, dtype)
                target.baddbmm_(rows.expand(maps, height, h), widened.view(maps, h, width))
        if self.normalize == "none":
            return out.mul_(level0_scale).to(latents.dtype)
        return normalize_(out, self.normalize).to(latents.dtype)
