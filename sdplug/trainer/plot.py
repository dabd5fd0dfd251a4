"""PNG charts of the training loss (drawn with Pillow: no plotting dependency).

``loss_per_timestep_plot``: bars of mean loss per timestep bin; ``loss_curve_plot``: loss per
step with a moving average. Both label their axes and return the labels they drew.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, LEFT, MARGIN = 720, 360, 70, 50
GREY, BLUE, BLACK = (160, 160, 160), (40, 90, 220), (0, 0, 0)


def _vertical_text(image: Image.Image, x: int, y_centre: int, text: str) -> None:
    """``text`` read bottom to top (a y-axis label), centred on ``y_centre``."""
    strip = Image.new("RGB", (8 * len(text) + 4, 14), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), text, fill=BLACK)
    strip = strip.rotate(90, expand=True)
    image.paste(strip, (x, y_centre - strip.height // 2))


def _axes(image: Image.Image, title: str, legend: str, xlabel: str, ylabel: str, top: float) -> dict[str, str]:
    pen = ImageDraw.Draw(image)
    bottom, right = HEIGHT - MARGIN, WIDTH - MARGIN
    pen.text((LEFT, 10), title, fill=BLACK)
    pen.text((LEFT, 26), legend, fill=(60, 60, 60))
    pen.line((LEFT, bottom, right, bottom), fill=BLACK)
    pen.line((LEFT, MARGIN, LEFT, bottom), fill=BLACK)
    for fraction in (0.0, 0.5, 1.0):  # y ticks: 0, half, top
        y = bottom - fraction * (bottom - MARGIN)
        pen.line((LEFT - 4, y, LEFT, y), fill=BLACK)
        pen.text((LEFT - 42, y - 6), f"{fraction * top:.3g}", fill=BLACK)
    _vertical_text(image, 4, (MARGIN + bottom) // 2, ylabel)
    pen.text((right - 8 * len(xlabel), bottom + 24), xlabel, fill=BLACK)
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel}


def _top(values: list[float]) -> float:
    return (max(values, default=1.0) * 1.1) or 1.0


def loss_per_timestep_plot(
    path: Path, bin_edges: list[int], raw: list[float | None], weighted: list[float | None], title: str
) -> dict[str, str]:
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    top = _top([v for v in (*raw, *weighted) if v is not None])
    labels = _axes(
        image, title, "grey: mean loss (unweighted)   blue: mean weighted loss", "timestep", "mean loss per sample", top
    )
    pen = ImageDraw.Draw(image)
    bottom = HEIGHT - MARGIN
    slot = (WIDTH - LEFT - MARGIN) / len(raw)
    for i in range(len(raw)):
        x0 = LEFT + i * slot
        for offset, series, colour in ((0.1, raw, GREY), (0.5, weighted, BLUE)):
            value = series[i]
            if value is None:
                continue
            bar = (bottom - MARGIN) * value / top
            pen.rectangle((x0 + offset * slot, bottom - bar, x0 + (offset + 0.4) * slot, bottom), fill=colour)
        pen.text((x0 + 2, bottom + 4), f"{bin_edges[i]}", fill=BLACK)
    image.save(path, format="PNG")  # the format named: the path may be a temporary name
    return labels


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_plot(path: Path, losses: list[float], title: str) -> dict[str, str]:
    """Loss per step (grey) and its moving average (blue); the y range ignores the top 1% of steps,
    so a few large early losses do not flatten the rest of the curve."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    window = max(1, len(losses) // 20)
    smooth = moving_average(losses, window)
    ranked = sorted(losses)
    top = _top([ranked[min(len(ranked) - 1, int(0.99 * len(ranked)))], *smooth] if ranked else [])
    labels = _axes(image, title, f"grey: loss per step   blue: mean of the last {window} steps", "step", "training loss", top)
    pen = ImageDraw.Draw(image)
    bottom, span = HEIGHT - MARGIN, WIDTH - LEFT - MARGIN
    count = len(losses)
    for series, colour in ((losses, GREY), (smooth, BLUE)):
        points = [
            (LEFT + span * (i / max(count - 1, 1)), bottom - (bottom - MARGIN) * min(v, top) / top) for i, v in enumerate(series)
        ]
        if len(points) == 1:
            pen.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        elif points:
            pen.line(points, fill=colour, width=1 if colour == GREY else 2)
    for fraction in (0.0, 0.5, 1.0):  # x ticks: first, middle and last step
        x = LEFT + fraction * span
        pen.text((x - 4, bottom + 4), str(round(1 + fraction * max(count - 1, 0))), fill=BLACK)
    image.save(path, format="PNG")
    return labels


def validation_curve_plot(path: Path, steps: list[int], values: list[float], title: str) -> dict[str, str]:
    """Validation loss at the steps it was measured (points joined by a line)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    top = _top(values)
    labels = _axes(image, title, "held-out images, fixed timesteps and noise", "step", "validation loss", top)
    pen = ImageDraw.Draw(image)
    bottom, span = HEIGHT - MARGIN, WIDTH - LEFT - MARGIN
    last = max(max(steps, default=1), 1)
    points = [(LEFT + span * s / last, bottom - (bottom - MARGIN) * v / top) for s, v in zip(steps, values, strict=True)]
    if len(points) > 1:
        pen.line(points, fill=BLUE, width=2)
    for x, y in points:
        pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=BLUE)
    for fraction in (0.0, 0.5, 1.0):
        x = LEFT + fraction * span
        pen.text((x - 4, bottom + 4), str(round(fraction * last)), fill=BLACK)
    image.save(path, format="PNG")
    return labels
