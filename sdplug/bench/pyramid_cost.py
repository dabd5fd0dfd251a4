"""Cost of pyramid noise relative to ``torch.randn_like``, measured side by side.

Run: ``sdplug bench pyramid`` (or ``python -m sdplug.bench.pyramid_cost``). Every method is
timed in the same loop, interleaved, on one thread, and the median of each is divided by the
median of ``randn_like`` of the same shape, so machine load cancels out of the ratios.

References, for comparison only:
  seed-code: the article's loop as published (seed 000): upsample every level to full size
    with ``nn.Upsample``, ``w, h`` overwritten inside the loop.
  per-level-upsample: the same loop with the intended sizes, the pattern trainers commonly
    use (one full-size ``F.interpolate`` per level).
"""

from __future__ import annotations

import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from sdplug.strategies.pyramid import PyramidNoise

SHAPES = ((4, 4, 64, 64), (4, 4, 128, 128))
ACCEPT_RATIO = 2.5


def seed_code_reference(x: torch.Tensor, discount: float = 0.8) -> torch.Tensor:
    """The seed article's algorithm, as published (sizes shrink from the shrunk size)."""
    b, c, w, h = x.shape
    noise = torch.randn_like(x)
    for i in range(10):
        r = random.random() * 2 + 2
        w, h = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += F.interpolate(torch.randn(b, c, w, h).to(x), size=x.shape[-2:], mode="bilinear") * discount**i
        if w == 1 or h == 1:
            break
    return noise / noise.std()


def per_level_upsample_reference(x: torch.Tensor, discount: float = 0.8) -> torch.Tensor:
    """Intended level sizes, one full-size bilinear upsample per level."""
    b, c, height, width = x.shape
    noise = torch.randn_like(x)
    for i in range(1, 11):
        r = random.random() * 2 + 2
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        noise += F.interpolate(torch.randn(b, c, h, w), size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def measure(repeats: int = 200, warmup: int = 10) -> dict[tuple[int, ...], dict[str, float]]:
    """Per shape, the median over rounds of (method time / randn_like time in that round).

    Each round times ``randn_like`` and every method back to back, so a slow spell of a
    shared machine slows both sides of a ratio alike.
    """
    intended = PyramidNoise(discount=0.8)
    seed_exact = PyramidNoise(discount=0.8, variant="seed-exact")
    results: dict[tuple[int, ...], dict[str, float]] = {}
    for shape in SHAPES:
        x = torch.randn(shape)
        methods = {
            "sdplug pyramid (intended)": lambda x=x: intended(x),
            "sdplug pyramid (seed-exact)": lambda x=x: seed_exact(x),
            "seed-code reference": lambda x=x: seed_code_reference(x),
            "per-level-upsample reference": lambda x=x: per_level_upsample_reference(x),
        }
        ratios: dict[str, list[float]] = {name: [] for name in methods}
        for step in range(warmup + repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                torch.randn_like(x)
                middle = time.perf_counter()
                fn()
                end = time.perf_counter()
                if step >= warmup:
                    ratios[name].append((end - middle) / (middle - start))
        results[shape] = {name: statistics.median(values) for name, values in ratios.items()}
    return results


def main(repeats: int = 200, threads: int = 1) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    results = measure(repeats=repeats)
    print(
        f"pyramid-noise cost / randn_like cost (median over {repeats} rounds of time / randn_like time in the same round, {threads} thread(s), CPU)"
    )
    worst = 0.0
    for shape, medians in results.items():
        print(f"\nshape {shape}:")
        for name, ratio in medians.items():
            print(f"  {name:<30} {ratio:6.2f}x")
        worst = max(worst, medians["sdplug pyramid (intended)"], medians["sdplug pyramid (seed-exact)"])
    verdict = "within" if worst <= ACCEPT_RATIO else "OVER"
    print(f"\nworst sdplug ratio {worst:.2f}x: {verdict} the {ACCEPT_RATIO}x budget (aim: 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
