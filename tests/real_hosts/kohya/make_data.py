"""Write OUTDIR/1_sks/: 4 images 256x256 (PNG) with .txt captions, deterministic, offline.

python make_data.py OUTDIR
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

CAPTIONS = [
    "a photo of sks dog",
    "a picture of sks dog on the red background",
    "a photo of sks dog with a blue background",
    "a picture of sks dog in the green background",
]
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40)]


def main(out: Path) -> None:
    folder = out / "1_sks"  # kohya DreamBooth layout: <repeats>_<class token>
    folder.mkdir(parents=True, exist_ok=True)
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS, strict=True)):
        image = Image.new("RGB", (256, 256), tuple(255 - c for c in colour))
        draw = ImageDraw.Draw(image)
        draw.ellipse((40 + 10 * i, 40, 200, 200 - 10 * i), fill=colour)
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption + "\n")
    print(f"data OK: {folder} ({len(CAPTIONS)} images)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
