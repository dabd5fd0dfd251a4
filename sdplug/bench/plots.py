"""PNG charts for the evidence benches, drawn with Pillow (no plotting dependency), in the style
of ``sdplug.trainer.plot``: lines with a mean ± spread band, bars with error whiskers, sample grids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 760, 400, 70, 180, 50, 50
BLACK, GREY = (0, 0, 0), (200, 200, 200)
PALETTE = [(40, 90, 220), (220, 70, 40), (30, 160, 60), (160, 60, 200), (230, 160, 20), (20, 170, 180), (120, 120, 120)]


Bounds = tuple[float, float]
_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)  # tick steps: these times a power of ten


def ticks(lo: float, hi: float, count: int = 6, bounds: Bounds | None = None) -> list[float]:
    """Round tick values, about ``count`` of them and 1, 2, 2.5 or 5 times a power of ten
    apart, from at or below ``lo`` to at or above ``hi``: the axis runs from the first to the
    last. ``bounds`` clips the range to what the quantity can take (a share: 0 to 1)."""
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if not hi - lo > 1e-12:  # one value (or none inside the bounds): a unit-wide axis around it
        lo, hi = (lo - 0.5, lo + 0.5) if bounds is None else bounds
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in _STEPS if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    digits = _decimals(step)
    values = [round(i * step, digits) + 0.0 for i in range(first, last + 1)]  # + 0.0: never "-0"
    if bounds is not None:  # a bound off the step's grid: the axis still ends inside it
        values = [v for v in values if bounds[0] - 1e-9 <= v <= bounds[1] + 1e-9] or values
    return values


def _decimals(step: float) -> int:
    """Decimal places that write ``step`` exactly (0.25: 2; 5: 0)."""
    return next(d for d in range(12) if abs(round(step, d) - step) <= 1e-9 * step)


def tick_label(value: float, values: Sequence[float]) -> str:
    """``value`` with as many decimals as the ticks' step needs, and no more."""
    step = values[1] - values[0] if len(values) > 1 else 1.0
    return f"{value:.{_decimals(step)}f}"


def _frame(
    title: str, xlabel: str, ylabel: str, y_ticks: list[float], width: int = WIDTH
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, HEIGHT), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    bottom, right = HEIGHT - BOTTOM, width - RIGHT
    lo, hi = y_ticks[0], y_ticks[-1]
    pen.text((LEFT, 12), title, fill=BLACK)
    pen.line((LEFT, bottom, right, bottom), fill=BLACK)
    pen.line((LEFT, TOP, LEFT, bottom), fill=BLACK)
    for value in y_ticks:
        y = bottom - (value - lo) / (hi - lo) * (bottom - TOP)
        pen.line((LEFT - 4, y, LEFT, y), fill=BLACK)
        pen.line((LEFT + 1, y, right, y), fill=(238, 238, 238))
        tick = tick_label(value, y_ticks)
        pen.text((LEFT - 8 - 6 * len(tick), y - 6), tick, fill=BLACK)
    strip = Image.new("RGB", (7 * len(ylabel) + 4, 14), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), ylabel, fill=BLACK)
    strip = strip.rotate(90, expand=True)
    image.paste(strip, (2, (TOP + bottom) // 2 - strip.height // 2))
    pen.text((right - 7 * len(xlabel), bottom + 26), xlabel, fill=BLACK)
    return image, pen


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
    bounds: Bounds | None = None,
) -> None:
    """One line per series (its mean) with a shaded band of ± its spread; ``bounds``: the
    values the quantity can take (an accuracy: 0 to 1), which the axis and the band keep to."""
    values = [v for mean, spread in series.values() for m, s in zip(mean, spread, strict=True) for v in (m - s, m + s)]
    y_ticks = ticks(min(values), max(values), bounds=bounds)
    lo, hi = y_ticks[0], y_ticks[-1]
    image, pen = _frame(title, xlabel, ylabel, y_ticks)
    bottom, span = HEIGHT - BOTTOM, WIDTH - LEFT - RIGHT
    x_ticks = ticks(min(x), max(x))
    x0, x1 = x_ticks[0], x_ticks[-1]

    def point(xv: float, yv: float) -> tuple[float, float]:
        yv = min(max(yv, lo), hi)  # a band past a bound (accuracy 0.98 ± 0.05) stops at the bound
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
    for value in x_ticks:
        px = LEFT + span * (value - x0) / (x1 - x0)
        pen.line((px, bottom, px, bottom + 4), fill=BLACK)
        label = tick_label(value, x_ticks)
        pen.text((px - 3 * len(label), bottom + 6), label, fill=BLACK)
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
    values.append(0.0)  # bars start at 0, so the axis shows it
    y_ticks = ticks(min(values), max(values))
    lo, hi = y_ticks[0], y_ticks[-1]
    width_px = max(WIDTH, LEFT + RIGHT + 80 * len(groups))  # room for each group's label
    image, pen = _frame(title, "", ylabel, y_ticks, width_px)
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
            pen.rectangle((left, min(y(mean[g]), y(0.0)), left + width - 2, max(y(mean[g]), y(0.0))), fill=colour)
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
