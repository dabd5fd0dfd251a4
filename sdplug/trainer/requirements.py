"""The reference trainer needs newer libraries than the adapters; say so instead of failing deep inside.

Only importlib.metadata is read here, never the packages themselves: a bad pair fails when
diffusers or peft is imported, so this check has to be able to run before that import.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from sdplug.errors import MissingDependencyError

# diffusers: UNet2DConditionModel and kohya-format LoRA loading through peft;
# transformers: CLIPTokenizer from in-memory vocab/merges; peft: LoraConfig + inject_adapter_in_model.
TRAINER_NEEDS = {"diffusers": "0.27", "transformers": "4.40", "peft": "0.10", "accelerate": "0.30"}

# The peft that the `train` extra asks for (pyproject.toml; a test keeps the two equal): one
# that works with the newest diffusers and transformers, which is what pip resolves when they
# are not installed yet. The check itself accepts any peft not in a known-bad pair below, so an
# older environment (diffusers < 0.40, transformers 4) keeps the peft it has.
TRAIN_EXTRA_PEFT = "peft>=0.15,!=0.16.*,!=0.17.*"


@dataclasses.dataclass(frozen=True)
class BadPair:
    """Two installed versions that break the trainer together, each of them fine on its own."""

    package: str
    versions: str
    other: str
    other_versions: str
    reason: str
    fix: str = TRAIN_EXTRA_PEFT  # what to pip install: a version of ``other`` outside every bad pair


# Found by running sdplug train in each environment. Not listed: transformers >= 5.24 with
# peft <= 0.21 (transformers' add_adapter demands a peft 0.22 that is not released), since
# lora.add_lora injects through peft directly and so never meets that gate.
KNOWN_BAD_PAIRS = (
    BadPair(
        "transformers", ">=5", "peft", ">=0.16,<0.18",
        "peft 0.16 and 0.17 import transformers.HybridCache, which transformers 5 removed",
    ),
    BadPair(
        "diffusers", ">=0.40", "peft", "<0.15",
        "diffusers 0.40 and later import peft.helpers.disable_input_dtype_casting, new in peft 0.15",
    ),
)  # fmt: skip


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _within(found: str, versions: str) -> bool:
    try:
        # prereleases: a dev or rc build of a bad release is just as bad
        return SpecifierSet(versions).contains(Version(found), prereleases=True)
    except InvalidVersion:
        return False  # a version string packaging cannot read says nothing about a pair


def check_trainer_requirements() -> None:
    for package, minimum in TRAINER_NEEDS.items():
        found = _installed(package)
        if found is None or Version(found) < Version(minimum):
            raise MissingDependencyError(
                f"sdplug train needs {package}>={minimum} (found {found or 'none'}); the adapters work with older "
                f"versions, the reference trainer does not. Install it with: pip install 'sdplug[train]' (or '{package}>={minimum}')"
            )
    for pair in KNOWN_BAD_PAIRS:
        found, other_found = _installed(pair.package), _installed(pair.other)
        if found and other_found and _within(found, pair.versions) and _within(other_found, pair.other_versions):
            raise MissingDependencyError(
                f"sdplug train cannot run with {pair.package} {found} and {pair.other} {other_found} installed "
                f"together: {pair.reason}. Install a {pair.other} that works with both: pip install '{pair.fix}'"
            )
