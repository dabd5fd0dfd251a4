"""Compose / ToTensor / Normalize / RandomHorizontalFlip with torchvision's semantics (the subset sd-scripts and EveryDream2 use)."""

import enum

from . import functional  # noqa: F401


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    """PIL image or HxWxC numpy array -> CxHxW float tensor; uint8 input is scaled to [0, 1]."""

    def __call__(self, pic):
        return functional.to_tensor(pic)


class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor):
        return functional.normalize(tensor, self.mean, self.std, self.inplace)


class RandomHorizontalFlip:
    """EveryDream2's augmentation: mirror a PIL image with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        import random

        from PIL import ImageOps

        return ImageOps.mirror(image) if random.random() < self.p else image
