"""to_tensor, pil_to_tensor, normalize, gaussian_blur with torchvision's semantics."""

import numpy as np
import torch
import torch.nn.functional as F


def _as_array(pic):
    arr = np.asarray(pic)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def to_tensor(pic):
    arr = _as_array(pic)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if t.dtype == torch.uint8:
        return t.to(torch.get_default_dtype()).div(255)
    return t


def pil_to_tensor(pic):
    arr = _as_array(pic)
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def normalize(tensor, mean, std, inplace=False):
    if not inplace:
        tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def _kernel1d(ksize, sigma):
    half = (ksize - 1) * 0.5
    x = torch.linspace(-half, half, steps=ksize)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(img, kernel_size, sigma=None):
    if isinstance(kernel_size, int):
        kernel_size = [kernel_size, kernel_size]
    if sigma is None:
        sigma = [ks * 0.15 + 0.35 for ks in kernel_size]
    if isinstance(sigma, (int, float)):
        sigma = [float(sigma), float(sigma)]
    kx = _kernel1d(kernel_size[0], sigma[0]).to(img)
    ky = _kernel1d(kernel_size[1], sigma[1]).to(img)
    kernel = ky[:, None] * kx[None, :]
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    c = x.shape[-3]
    lead = x.shape[:-3]
    x = x.reshape(-1, c, *x.shape[-2:])
    weight = kernel.expand(c, 1, *kernel.shape)
    pad = [kernel_size[0] // 2, kernel_size[0] // 2, kernel_size[1] // 2, kernel_size[1] // 2]
    x = F.pad(x, pad, mode="reflect")
    x = F.conv2d(x, weight, groups=c)
    x = x.reshape(*lead, c, *x.shape[-2:])
    return x[0] if squeeze else x


def resize(img, size, interpolation=None, antialias=None):
    mode = getattr(interpolation, "value", interpolation) or "bilinear"
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    x = F.interpolate(x, size=list(size), mode=mode)
    return x[0] if squeeze else x
