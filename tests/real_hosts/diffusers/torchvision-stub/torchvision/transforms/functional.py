def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


def hflip(img):
    from PIL import Image

    return img.transpose(Image.FLIP_LEFT_RIGHT)


def pil_to_tensor(img):
    import numpy as np
    import torch

    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def to_pil_image(x):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.asarray(x.permute(1, 2, 0).cpu()))


def to_tensor(img):
    import numpy as np
    import torch

    return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def normalize(x, mean, std):
    import torch

    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def resize(img, size, interpolation=None):
    from . import Resize

    return Resize(size)(img)
