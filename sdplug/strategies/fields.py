"""Spatially correlated noise fields: pink (1/f) and Perlin noise.

Both are named as further options by J. Whitaker, "Multi-Resolution Noise for Diffusion Model
Training" (2023).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field

from sdplug.errors import PresetError
from sdplug.params import strategy_params
from sdplug.strategies._tensor import Normalize, fresh_gaussian, normalize_, work_dtype
from sdplug.strategies.base import NoiseStrategy


def radial_frequency(height: int, width: int, device, dtype) -> torch.Tensor:
    """|f| in cycles per pixel on the ``rfft2`` grid of an (height, width) image."""
    fy = torch.fft.fftfreq(height, device=device, dtype=dtype).view(-1, 1)
    fx = torch.fft.rfftfreq(width, device=device, dtype=dtype).view(1, -1)
    return torch.sqrt(fy**2 + fx**2)


@strategy_params
class PinkNoise(NoiseStrategy):
    """Pink (1/f^alpha) noise: Gaussian noise whose power spectrum falls as ``|f|**-alpha``.

    The noise so far is filtered in the Fourier domain by amplitude ``|f|**(-alpha/2)``; the
    zero frequency gets the amplitude of the lowest non-zero one (1/0 has no value). ``alpha``
    1 is pink, 2 is brown, 0 is white. Then rescaled to unit std over the batch or per sample.
    """

    processes = frozenset({"ddpm", "flow"})  # the noise's law, whatever process mixes it in

    alpha: Annotated[float, Field(ge=0.0, le=4.0)] = 1.0
    normalize: Normalize = "batch"

    def transform(self, noise, latents, generator):
        noise = fresh_gaussian(latents, generator) if noise is None else noise.to(work_dtype(latents))
        height, width = latents.shape[-2:]
        freq = radial_frequency(height, width, latents.device, noise.dtype)
        lowest = freq[freq > 0].min()
        amplitude = torch.where(freq > 0, freq, lowest).pow(-self.alpha / 2)
        shaped = torch.fft.irfft2(torch.fft.rfft2(noise) * amplitude, s=(height, width))
        return normalize_(shaped, self.normalize).to(latents.dtype)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)  # Perlin's 2002 quintic


def perlin_field(batch: int, height: int, width: int, cells: int, generator, device, dtype) -> torch.Tensor:
    """Gradient (Perlin) noise, ``cells`` lattice cells along the shorter side, per map."""
    cells_h = max(1, round(cells * height / min(height, width)))
    cells_w = max(1, round(cells * width / min(height, width)))
    angles = torch.rand(batch, cells_h + 1, cells_w + 1, generator=generator, device=device, dtype=dtype) * (2 * math.pi)
    grad_y, grad_x = torch.sin(angles), torch.cos(angles)
    ys = torch.arange(height, device=device, dtype=dtype) * (cells_h / height)
    xs = torch.arange(width, device=device, dtype=dtype) * (cells_w / width)
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - y0).view(-1, 1), (xs - x0).view(1, -1)

    def corner(dy: int, dx: int) -> torch.Tensor:
        gy = grad_y[:, y0 + dy][:, :, x0 + dx]
        gx = grad_x[:, y0 + dy][:, :, x0 + dx]
        return gy * (fy - dy) + gx * (fx - dx)

    sy, sx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - sx) + corner(0, 1) * sx
    bottom = corner(1, 0) * (1 - sx) + corner(1, 1) * sx
    return top * (1 - sy) + bottom * sy


@strategy_params
class PerlinNoise(NoiseStrategy):
    """Gaussian noise plus fractal Perlin noise (K. Perlin, "Improving Noise", SIGGRAPH 2002).

    Each sample and channel gets ``octaves`` layers of gradient noise, the first with ``cells``
    lattice cells along the shorter side, each next one with twice as many and ``persistence``
    times the amplitude. The fractal field is scaled to unit std, added with weight
    ``strength``, and the sum is rescaled to unit std (batch or per sample).

    An octave with as many cells as the latent has pixels along its shorter side puts every
    pixel on a lattice point, where gradient noise is exactly 0: such octaves (and finer ones)
    are left out, so 3 octaves from 4 cells use 2 on a 16x16 latent (4 and 8 cells) and 3 on
    64x64; ``octave_cells`` says which, and the audit records them per latent size. A latent
    too small for even the first octave is refused.
    """

    processes = frozenset({"ddpm", "flow"})  # the noise's law, whatever process mixes it in

    strength: Annotated[float, Field(gt=0.0, le=10.0)] = 0.5
    cells: Annotated[int, Field(ge=1, le=256)] = 4
    octaves: Annotated[int, Field(ge=1, le=8)] = 3
    persistence: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    normalize: Normalize = "batch"

    def octave_cells(self, height: int, width: int) -> list[int]:
        """The lattice cells of each octave used on a ``height`` x ``width`` latent: those with
        fewer cells than pixels along the shorter side (the others would add exactly 0)."""
        return [n for n in (self.cells * 2**octave for octave in range(self.octaves)) if n < min(height, width)]

    def audit_facts(self, height: int, width: int) -> dict[str, Any]:
        """What the audit records of this strategy for one latent size."""
        cells = self.octave_cells(height, width)
        return {"octaves_used": len(cells), "octave_cells": cells}

    def transform(self, noise, latents, generator):
        height, width = latents.shape[-2:]
        octaves = self.octave_cells(height, width)
        if not octaves:
            raise PresetError(
                f"perlin noise: {self.cells} reaches the latent's {height}x{width} pixels along its shorter "
                "side, so every pixel lands on a lattice point, where gradient noise is 0, and no octave adds "
                f"anything. Allowed for this latent: cells below {min(height, width)}.",
                key="cells",
            )
        noise = fresh_gaussian(latents, generator) if noise is None else noise.to(work_dtype(latents))
        maps = latents.shape[0] * latents.shape[1]
        field = torch.zeros(maps, height, width, device=latents.device, dtype=noise.dtype)
        for octave, cells in enumerate(octaves):
            field += self.persistence**octave * perlin_field(maps, height, width, cells, generator, latents.device, noise.dtype)
        field /= field.std().clamp_min(torch.finfo(field.dtype).tiny)
        return normalize_(noise + self.strength * field.view_as(noise), self.normalize).to(latents.dtype)
