"""Optional packages (bitsandbytes, xformers): found, imported and explained in one place.

A package counts as available only when its import spec AND its installed distribution are
present; a missing one is a ``MissingDependencyError`` carrying the exact install command.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from types import ModuleType

from sdplug.errors import MissingDependencyError

# Import-time notices about pieces sdplug never uses, printed on every run by packages that
# diffusers and peft import whenever they are installed: bitsandbytes' CPU 4-bit matmul kernel
# (sdplug uses only its 8-bit optimizers) and transformers' torchvision image processors (for the
# safety checker, which sdplug never loads). Each filter drops exactly one message of one logger.
QUIET_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    # torchao (the torchao_adamw8bit extra): its CUDA-only kernels, and what diffusers and torch say of it on import
    "torchao": "Failed to load",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def quiet_import_notices() -> None:
    """Install the filters (once); sdplug's import does it, before diffusers is imported."""
    for name, text in QUIET_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNotice(text))


quiet_import_notices()

# import name -> (distribution name, how to install it without touching the user's torch)
INSTALL_HINTS = {
    "bitsandbytes": ("bitsandbytes", 'pip install "sdplug[bnb]"  (or: pip install bitsandbytes)'),
    "xformers": (
        "xformers",
        "pip install xformers==<the release built for your torch> --no-deps  "
        "(xformers wheels pin one torch build; check https://github.com/facebookresearch/xformers#installing-xformers "
        "and never let it replace your torch)",
    ),
}


def is_available(package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    distribution = INSTALL_HINTS.get(package, (package, ""))[0]
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require(package: str, *, feature: str) -> ModuleType:
    """Import ``package`` for ``feature`` or raise an error that says how to install it."""
    hint = INSTALL_HINTS.get(package, (package, f"pip install {package}"))[1]
    if not is_available(package):
        raise MissingDependencyError(f"{feature} needs the package {package!r}, which is not installed. Install it with: {hint}")
    try:
        return importlib.import_module(package)
    except Exception as exc:  # a broken native build fails in many ways; all mean "cannot use it"
        raise MissingDependencyError(
            f"{feature} needs {package!r}, which is installed but fails to import here "
            f"({type(exc).__name__}: {exc}). Reinstall it with: {hint}"
        ) from exc
