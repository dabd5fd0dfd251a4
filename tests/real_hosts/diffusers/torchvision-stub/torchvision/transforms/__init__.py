import enum
import random

import numpy as np
import torch
from PIL import Image

from . import functional  # noqa: F401


class InterpolationMode(enum.Enum):
    NEAREST = 0
    NEAREST_EXACT = 10
    BILINEAR = 2
    BICUBIC = 3
    LANCZOS = 1
    BOX = 4
    HAMMING = 5


class Compose:
    def __init__(self, ops):
        self.ops = ops

    def __call__(self, x):
        for op in self.ops:
            x = op(x)
        return x


class Lambda:
    def __init__(self, f):
        self.f = f

    def __call__(self, x):
        return self.f(x)


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, int):
            scale = self.size / min(w, h)
            new = (max(1, round(w * scale)), max(1, round(h * scale)))
        else:
            new = (self.size[1], self.size[0])
        mode = self.interpolation.value if isinstance(self.interpolation, InterpolationMode) else self.interpolation
        return img.resize(new, 0 if mode == 10 else mode)


def _size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class CenterCrop:
    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, img):
        th, tw = self.size
        w, h = img.size
        top, left = (h - th) // 2, (w - tw) // 2
        return img.crop((left, top, left + tw, top + th))


class RandomCrop:
    def __init__(self, size):
        self.size = _size(size)

    @staticmethod
    def get_params(img, output_size):
        w, h = img.size
        th, tw = output_size
        return random.randint(0, h - th), random.randint(0, w - tw), th, tw

    def __call__(self, img):
        top, left, th, tw = self.get_params(img, self.size)
        return img.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class ToTensor:
    def __call__(self, img):
        return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x):
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std
