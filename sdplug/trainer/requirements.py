"""The reference trainer needs newer libraries than the adapters; say so instead of failing deep inside."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

from sdplug.errors import MissingDependencyError

# diffusers: PeftAdapterMixin (unet.add_adapter) and kohya-format LoRA loading through peft;
# transformers: CLIPTokenizer from in-memory vocab/merges; peft: LoraConfig as used here.
TRAINER_NEEDS = {"diffusers": "0.27", "transformers": "4.40", "peft": "0.10", "accelerate": "0.30"}


def check_trainer_requirements() -> None:
    for package, minimum in TRAINER_NEEDS.items():
        try:
            found = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is None or Version(found) < Version(minimum):
            raise MissingDependencyError(
                f"sdplug train needs {package}>={minimum} (found {found or 'none'}); the adapters work with older "
                f"versions, the reference trainer does not. Install it with: pip install 'sdplug[train]' (or '{package}>={minimum}')"
            )
