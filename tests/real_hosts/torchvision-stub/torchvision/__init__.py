"""A minimal torchvision stand-in for running kohya sd-scripts on a CPU-only machine.

sd-scripts imports torchvision at start-up but, for SD 1.x LoRA/DreamBooth training, only uses
transforms.Compose, ToTensor, Normalize, functional.pil_to_tensor and functional.gaussian_blur.
No dist-info is installed for this package, so transformers/diffusers' is_torchvision_available()
(which reads package metadata) still reports False and never takes torchvision code paths.
"""

__version__ = "0.0.0+sdplug-stub"

from . import transforms  # noqa: F401,E402
