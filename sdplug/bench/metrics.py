"""The evidence benches' measures, each a pure function of tensors or lists (unit-tested on known
distributions): 1-D Wasserstein, kernel MMD (and ``FeatureMMD``, which scores samples by it on a
classifier's features), range coverage, out-of-range share, high-frequency residue, curve
smoothing and the steps-to-quality speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def wasserstein_1d(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """W1 between two empirical 1-D distributions: the area between their quantile functions
    (exact for equal sizes; otherwise on the merged grid of both CDFs' jumps)."""
    x, y = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if len(x) == 0 or len(y) == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    x, y = x.sort().values, y.sort().values
    grid = torch.cat([torch.arange(1, len(x) + 1) / len(x), torch.arange(1, len(y) + 1) / len(y)]).unique().sort().values
    widths = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), grid]))
    mids = grid - widths / 2  # inside each constant piece of both quantile functions
    qx = x[(mids * len(x)).floor().long().clamp(max=len(x) - 1)]
    qy = y[(mids * len(y)).floor().long().clamp(max=len(y) - 1)]
    return float(((qx - qy).abs() * widths).sum())


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> float:
    """Unbiased squared MMD of ``x`` (n, d) and ``y`` (m, d) with a sum of Gaussian kernels
    ``exp(-|a - b|^2 / (2 s^2))`` over ``bandwidths`` (Gretton et al., 2012). Near 0 for samples
    of one distribution (it can dip slightly below 0), larger the further apart they are."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd2 needs at least two samples on each side")

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)  # type: ignore[return-value]

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def median_distance(x: torch.Tensor) -> float:
    """The median pairwise distance of ``x`` (the usual kernel-bandwidth heuristic)."""
    d = torch.pdist(x.double().flatten(1))
    return float(d.median()) if len(d) else 1.0


class FeatureMMD:
    """Sample quality: MMD^2 between ``embed`` features of samples and of held-out ``reference``
    images (features standardised by the reference's; Gaussian kernels at 0.5, 1 and 2 x the
    median distance). Lower is better."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor):
        self.embed = embed
        features = embed(reference)
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6
        self.reference = (features - self.mean) / self.std
        median = median_distance(self.reference)
        self.bandwidths = [0.5 * median, median, 2 * median]

    def __call__(self, samples: torch.Tensor) -> float:
        features = (self.embed(samples) - self.mean) / self.std
        return mmd2(features, self.reference, self.bandwidths)


def range_share(samples: torch.Tensor | Sequence[float], data: torch.Tensor | Sequence[float], q: float = 0.01) -> float:
    """The share of the data's [q, 1-q] quantile range that the samples' own [q, 1-q] range covers."""
    s, d = torch.as_tensor(samples, dtype=torch.float64).flatten(), torch.as_tensor(data, dtype=torch.float64).flatten()
    lo_d, hi_d = float(d.quantile(q)), float(d.quantile(1 - q))
    lo_s, hi_s = float(s.quantile(q)), float(s.quantile(1 - q))
    if hi_d <= lo_d:
        return 1.0
    return max(0.0, min(hi_s, hi_d) - max(lo_s, lo_d)) / (hi_d - lo_d)


def out_of_range_share(images: torch.Tensor, limit: float = 1.5) -> float:
    """The share of values with ``|x| > limit`` (pixels in [-1, 1] space, before any clamping);
    a non-finite value counts as out of range."""
    x = images.detach().double()
    return float(((x.abs() > limit) | ~torch.isfinite(x)).double().mean())


def high_frequency_residue(images: torch.Tensor) -> float:
    """The std of what a 2x2 box blur removes: leftover pixel noise shows here."""
    x = images.detach().float().clamp(-1, 1)
    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
    return float((x - blurred).std())


def smooth(values: Sequence[float], window: int = 3) -> list[float]:
    """Centred moving average (the window shrinks at the ends), to tame checkpoint-to-checkpoint noise."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def steps_to_reach(steps: Sequence[int], curve: Sequence[float], level: float) -> float | None:
    """The first step at which a lower-is-better ``curve`` reaches ``level``, linearly
    interpolated between checkpoints; None when it never does."""
    for i, value in enumerate(curve):
        if value <= level:
            if i == 0:
                return float(steps[0])
            previous = curve[i - 1]
            fraction = (previous - level) / (previous - value) if previous != value else 1.0
            return steps[i - 1] + fraction * (steps[i] - steps[i - 1])
    return None


def speedup(steps: Sequence[int], baseline: Sequence[float], variant: Sequence[float], tail: int = 2) -> tuple[float, bool]:
    """(speed-up, reached): the steps the baseline needs to reach its final quality (the mean of
    its last ``tail`` points) over the steps the variant needs to reach it. When the variant
    never reaches it, the bound ``baseline steps / last step`` (an upper bound) and False."""
    final = sum(baseline[-tail:]) / len(baseline[-tail:])
    needed = steps_to_reach(steps, baseline, final)
    needed = float(steps[-1]) if needed is None else needed
    variant_needed = steps_to_reach(steps, variant, final)
    if variant_needed is None:
        return needed / steps[-1], False
    return needed / max(variant_needed, 1e-9), True


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
