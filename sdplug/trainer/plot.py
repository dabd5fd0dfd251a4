"""A PNG bar chart of training loss per timestep bin (drawn with Pillow: no plotting dependency)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def loss_per_timestep_plot(
    path: Path, bin_edges: list[int], raw: list[float | None], weighted: list[float | None], title: str
) -> None:
    width, height, margin = 720, 360, 50
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    values = [v for v in (*raw, *weighted) if v is not None]
    top = max(values, default=1.0) * 1.1 or 1.0
    bins = len(raw)
    slot = (width - 2 * margin) / bins
    pen.text((margin, 10), title, fill=(0, 0, 0))
    pen.text((margin, 26), "grey: mean loss (unweighted)   blue: mean weighted loss", fill=(60, 60, 60))
    pen.line((margin, height - margin, width - margin, height - margin), fill=(0, 0, 0))
    pen.line((margin, margin, margin, height - margin), fill=(0, 0, 0))
    pen.text((4, margin - 6), f"{top:.3g}", fill=(0, 0, 0))
    pen.text((20, height - margin - 6), "0", fill=(0, 0, 0))
    for i in range(bins):
        x0 = margin + i * slot
        for offset, series, colour in ((0.1, raw, (160, 160, 160)), (0.5, weighted, (40, 90, 220))):
            value = series[i]
            if value is None:
                continue
            bar = (height - 2 * margin) * value / top
            pen.rectangle((x0 + offset * slot, height - margin - bar, x0 + (offset + 0.4) * slot, height - margin), fill=colour)
        pen.text((x0 + 2, height - margin + 4), f"{bin_edges[i]}", fill=(0, 0, 0))
    pen.text((width - margin - 80, height - margin + 20), "timestep", fill=(0, 0, 0))
    image.save(path)
