"""PNG charts for the evidence benches, drawn with Pillow (no plotting dependency), in the style
of ``sdplug.trainer.plot``: lines with a mean ± spread band, bars with error whiskers, sample grids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 760, 400, 70, 180, 50, 50
BLACK, GREY = (0, 0, 0), (200, 200, 200)
PALETTE = [(40, 90, 220), (220, 70, 40), (30, 160, 60), (160, 60, 200), (230, 160, 20), (20, 170, 180), (120, 120, 120)]


def _frame(
    title: str, xlabel: str, ylabel: str, lo: float, hi: float, width: int = WIDTH
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, HEIGHT), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    bottom, right = HEIGHT - BOTTOM, width - RIGHT
    pen.text((LEFT, 12), title, fill=BLACK)
    pen.line((LEFT, bottom, right, bottom), fill=BLACK)
    pen.line((LEFT, TOP, LEFT, bottom), fill=BLACK)
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - fraction * (bottom - TOP)
        pen.line((LEFT - 4, y, LEFT, y), fill=BLACK)
        pen.line((LEFT + 1, y, right, y), fill=(238, 238, 238))
        tick = f"{lo + fraction * (hi - lo):.3g}"
        pen.text((LEFT - 8 - 6 * len(tick), y - 6), tick, fill=BLACK)
    strip = Image.new("RGB", (7 * len(ylabel) + 4, 14), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), ylabel, fill=BLACK)
    strip = strip.rotate(90, expand=True)
    image.paste(strip, (2, (TOP + bottom) // 2 - strip.height // 2))
    pen.text((right - 7 * len(xlabel), bottom + 26), xlabel, fill=BLACK)
    return image, pen


def _limits(values: list[float], floor: float | None = None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if floor is not None:
        lo = min(lo, floor)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    pad = 0.05 * (hi - lo)
    return lo - (0 if floor is not None and lo == floor else pad), hi + pad


def _legend(pen: ImageDraw.ImageDraw, names: Sequence[str], width: int = WIDTH) -> None:
    for i, name in enumerate(names):
        y = TOP + 16 * i
        pen.rectangle((width - RIGHT + 12, y + 2, width - RIGHT + 24, y + 12), fill=PALETTE[i % len(PALETTE)])
        pen.text((width - RIGHT + 30, y), name, fill=BLACK)


def lines(
    path: Path,
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> None:
    """One line per series (its mean) with a shaded band of ± its spread."""
    values = [v for mean, spread in series.values() for m, s in zip(mean, spread, strict=True) for v in (m - s, m + s)]
    lo, hi = _limits(values)
    image, pen = _frame(title, xlabel, ylabel, lo, hi)
    bottom, span = HEIGHT - BOTTOM, WIDTH - LEFT - RIGHT
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1

    def point(xv: float, yv: float) -> tuple[float, float]:
        return LEFT + span * (xv - x0) / (x1 - x0), bottom - (bottom - TOP) * (yv - lo) / (hi - lo)

    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    for i, (mean, spread) in enumerate(series.values()):
        colour = PALETTE[i % len(PALETTE)]
        upper = [point(a, m + s) for a, m, s in zip(x, mean, spread, strict=True)]
        lower = [point(a, m - s) for a, m, s in zip(x, mean, spread, strict=True)]
        if len(upper) > 1:
            shade.polygon(upper + lower[::-1], fill=(*colour, 40))
    image.paste(overlay, mask=overlay)
    pen = ImageDraw.Draw(image)
    for i, (mean, _) in enumerate(series.values()):
        colour = PALETTE[i % len(PALETTE)]
        points = [point(a, m) for a, m in zip(x, mean, strict=True)]
        if len(points) > 1:
            pen.line(points, fill=colour, width=2)
        for px, py in points:
            pen.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    for fraction in (0.0, 0.5, 1.0):
        pen.text((LEFT + fraction * span - 8, bottom + 6), f"{x0 + fraction * (x1 - x0):.4g}", fill=BLACK)
    _legend(pen, list(series))
    image.save(path, format="PNG")


def _wrap(text: str, width: int) -> str:
    """Words on up to three lines of ``width`` characters (bar labels under narrow slots)."""
    out: list[str] = []
    for word in text.split():
        if out and len(out[-1]) + 1 + len(word) <= width:
            out[-1] += " " + word
        else:
            out.append(word[:width])
    return "\n".join(out[:3])


def bars(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    ylabel: str,
    reference: float | None = None,
) -> None:
    """Grouped bars (one colour per series) with ± spread whiskers; ``reference`` a dashed level."""
    values = [v for mean, spread in series.values() for m, s in zip(mean, spread, strict=True) for v in (m - s, m + s)]
    if reference is not None:
        values.append(reference)
    lo, hi = _limits(values, floor=0.0 if min(values) >= 0 else None)
    width_px = max(WIDTH, LEFT + RIGHT + 80 * len(groups))  # room for each group's label
    image, pen = _frame(title, "", ylabel, lo, hi, width_px)
    bottom, span = HEIGHT - BOTTOM, width_px - LEFT - RIGHT
    slot = span / max(len(groups), 1)
    width = 0.8 * slot / max(len(series), 1)

    def y(v: float) -> float:
        return bottom - (bottom - TOP) * (v - lo) / (hi - lo)

    for g, group in enumerate(groups):
        pen.multiline_text((LEFT + g * slot + 4, bottom + 4), _wrap(group, max(4, int(slot / 6.5))), fill=BLACK, spacing=1)
        for i, (mean, spread) in enumerate(series.values()):
            left = LEFT + g * slot + 0.1 * slot + i * width
            colour = PALETTE[i % len(PALETTE)]
            pen.rectangle(
                (left, min(y(mean[g]), y(max(lo, 0.0))), left + width - 2, max(y(mean[g]), y(max(lo, 0.0)))), fill=colour
            )
            centre = left + width / 2 - 1
            pen.line((centre, y(mean[g] - spread[g]), centre, y(mean[g] + spread[g])), fill=BLACK, width=1)
    if reference is not None:
        for start in range(LEFT, width_px - RIGHT, 12):
            pen.line((start, y(reference), start + 6, y(reference)), fill=(90, 90, 90))
    _legend(pen, list(series), width_px)
    image.save(path, format="PNG")


def grid(path: Path, rows: Sequence[tuple[str, torch.Tensor]], *, title: str, zoom: int = 3, label_width: int = 200) -> None:
    """Rows of images (label, (N, 3, S, S) in [-1, 1], clamped for display)."""
    tile = rows[0][1].shape[-1] * zoom
    columns = max(len(images) for _, images in rows)
    image = Image.new("RGB", (label_width + columns * (tile + 2), 22 + len(rows) * (tile + 2)), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    pen.text((4, 4), title, fill=BLACK)
    for r, (label, images) in enumerate(rows):
        top = 22 + r * (tile + 2)
        pen.text((4, top + tile // 2 - 6), label, fill=BLACK)
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for c, array in enumerate(pixels):
            tile_image = Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST)
            image.paste(tile_image, (label_width + c * (tile + 2), top))
    image.save(path, format="PNG")
