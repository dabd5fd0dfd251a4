"""The embedded dataset: coloured shapes on backgrounds from near-black to near-white.

Captions name the shape's colour, the shape and the background's brightness, e.g.
"a red circle on a black background", so a trained model's samples can be checked by
measuring their colours and brightness against the prompt.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 215, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"black": 8, "dark": 60, "grey": 128, "light": 195, "white": 247}
VOCABULARY = ("a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS)


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def draw(colour: str, shape: str, background: str, size: int, rng: random.Random) -> Image.Image:
    level = BACKGROUNDS[background] + rng.randint(-6, 6)
    image = Image.new("RGB", (size, size), (level, level, level))
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    fill = tuple(int(np.clip(c + rng.randint(-15, 15), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def write_dataset(directory: Path, *, per_combination: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Write PNG + .txt caption pairs (a kohya-style folder); returns ``directory``."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    index = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                for _ in range(per_combination):
                    stem = directory / f"{index:04d}"
                    draw(colour, shape, background, size, rng).save(stem.with_suffix(".png"))
                    stem.with_suffix(".txt").write_text(caption_for(colour, shape, background) + "\n")
                    index += 1
    return directory
