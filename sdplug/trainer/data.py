"""Training data: a kohya-style folder of images with same-named ``.txt`` captions.

Accepted layouts: images and captions directly in the folder, or in subfolders named
``<repeats>_<name>`` (kohya's convention: each image counts ``repeats`` times per epoch).
Every problem (no images, an image without a caption, an unreadable image) is reported
before training, naming the files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdplug.errors import SdplugError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# a loss mask beside its image, OneTrainer's naming: photo.png -> photo-masklabel.png (white = train)
MASK_SUFFIX = "-masklabel.png"
_REPEATS = re.compile(r"^(\d+)_(.+)$")


class DataError(SdplugError):
    """A --data folder that cannot be trained on."""


@dataclasses.dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def _listing(paths: Sequence[Path | str], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def find_examples(folder: Path) -> list[Example]:
    """Every (image, caption) pair of ``folder``, repeated per kohya's ``N_name`` subfolders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data {folder}: not a folder. Give a folder of images with same-named .txt captions.")
    groups: list[tuple[Path, int]] = [(folder, 1)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _REPEATS.match(sub.name)
        if match:
            groups.append((sub, int(match.group(1))))
    images: list[tuple[Path, int]] = []
    for directory, repeats in groups:
        images += [
            (p, repeats)
            for p in sorted(directory.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX)
        ]
    if not images:
        raise DataError(
            f"--data {folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in the folder and in "
            "kohya-style '<repeats>_<name>' subfolders)."
        )
    missing = [p for p, _ in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DataError(f"--data {folder}: {len(missing)} image(s) have no caption file (same name, .txt): {_listing(missing)}.")
    unreadable = []
    for path, _ in images:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError):
            unreadable.append(path)
    if unreadable:
        raise DataError(f"--data {folder}: {len(unreadable)} image(s) cannot be read: {_listing(unreadable)}.")
    captions, undecodable = {}, []
    for path, _ in images:
        try:
            captions[path] = read_caption(path.with_suffix(".txt"))
        except UnicodeDecodeError as exc:
            undecodable.append(f"{path.with_suffix('.txt')} (byte {exc.start})")
    if undecodable:
        raise DataError(
            f"--data {folder}: {len(undecodable)} caption file(s) are not UTF-8 text: {_listing(undecodable)}. "
            "Save them as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        )
    examples = []
    for path, repeats in images:
        examples += [Example(path, captions[path])] * repeats
    return examples


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, a leading byte-order mark dropped (Windows Notepad writes one,
    and it would otherwise become part of the first tag), surrounding whitespace stripped."""
    return path.read_text(encoding="utf-8-sig").strip()


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: centre crop to square, then resize."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample)


def load_mask(path: Path, size: int) -> torch.Tensor | None:
    """The loss mask of an image, ``(1, size, size)`` in [0, 1] (1 = train), cropped and resized
    as the image is: its ``-masklabel.png`` file (grey levels), else its alpha channel; None when
    it has neither."""
    mask_file = path.with_name(path.stem + MASK_SUFFIX)
    with Image.open(mask_file if mask_file.is_file() else path) as image:
        if mask_file.is_file():
            grey = image.convert("L")
        elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            grey = image.convert("RGBA").getchannel("A")
        else:
            return None
        array = np.asarray(_square(grey, size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] to a PIL image."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class BatchSampler:
    """Shuffled batches, a new permutation each epoch, from a generator of this rank's own."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order: list[int] = []
        self.position = 0
        self.epoch = -1

    def next(self) -> tuple[list[int], list[int]]:
        """``(epochs, indices)``: each sample's own epoch, since a batch can straddle two epochs
        (per-epoch caption rules such as dropout's ``every_n_epochs`` follow the sample)."""
        epochs: list[int] = []
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.size, generator=self.generator).tolist()
                self.position = 0
                self.epoch += 1
            epochs.append(self.epoch)
            batch.append(self.order[self.position])
            self.position += 1
        return epochs, batch

    def state_dict(self):
        return {"order": self.order, "position": self.position, "epoch": self.epoch, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.order, self.position, self.epoch = state["order"], state["position"], state["epoch"]
        self.generator.set_state(state["generator"])
