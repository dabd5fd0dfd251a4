"""Spatially correlated noise fields: pink (1/f) and Perlin noise.

Both are named as further options by J. Whitaker, "Multi-Resolution Noise for Diffusion Model
Training" (2023).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

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
    """

    strength: Annotated[float, Field(gt=0.0, le=10.0)] = 0.5
    cells: Annotated[int, Field(ge=1, le=256)] = 4
    octaves: Annotated[int, Field(ge=1, le=8)] = 3
    persistence: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    normalize: Normalize = "batch"

    def transform(self, noise, latents, generator):
        noise = fresh_gaussian(latents, generator) if noise is None else noise.to(work_dtype(latents))
        maps = latents.shape[0] * latents.shape[1]
        height, width = latents.shape[-2:]
        field = torch.zeros(maps, height, width, device=latents.device, dtype=noise.dtype)
        for octave in range(self.octaves):
            cells = min(self.cells * 2**octave, min(height, width))
            field += self.persistence**octave * perlin_field(maps, height, width, cells, generator, latents.device, noise.dtype)
        field /= field.std().clamp_min(torch.finfo(field.dtype).tiny)
        return normalize_(noise + self.strength * field.view_as(noise), self.normalize).to(latents.dtype)
