"""Recognise an sd-scripts tree, and refuse one the adapter does not know.

A version is recognised by the source of the functions the adapter hooks, not by a version
string (sd-scripts has none): each known version has a fingerprint, and every hook the
adapter needs must be present before anything is patched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts import fingerprints

SCRIPTS = ("train_network.py", "sdxl_train_network.py", "train_db.py", "fine_tune.py")
# the flow scripts the adapter runs (sd-scripts main), and the library modules whose draw, output
# reading or weighting it hooks (``flow_runtime``)
FLOW_ROUTES: dict[str, tuple[str, ...]] = {
    "flux_train_network.py": ("library.flux_train_utils",),
    "sd3_train_network.py": ("library.sd3_train_utils",),
    "lumina_train_network.py": ("library.lumina_train_util",),
    "hunyuan_image_train_network.py": ("library.flux_train_utils",),
    "anima_train_network.py": ("library.flux_train_utils", "library.anima_train_utils"),
}


class KohyaVersionError(SdplugError):
    """An sd-scripts tree (or script) the adapter does not support."""


@dataclasses.dataclass(frozen=True)
class KohyaVersion:
    name: str
    noise_returns: int  # the tuple length get_noise_noisy_latents_and_timesteps returns
    text_cache_method: str  # the BaseDataset method that caches text-encoder outputs
    fingerprints: tuple[tuple[str, str], ...]  # (file, text that must be in it)


KNOWN = (
    KohyaVersion(
        "main",
        3,
        "new_cache_text_encoder_outputs",
        (
            ("library/train_util.py", "def get_huber_threshold_if_needed("),
            ("library/train_util.py", "return noise, noisy_latents, timesteps\n"),
            ("train_network.py", "def get_noise_pred_and_target("),
            ("train_network.py", "def post_process_loss("),
        ),
    ),
    KohyaVersion(
        # the inline-loop layout: v0.8.7, and v0.8.8-v0.9.1, whose hooks are the same
        "v0.8.7",
        4,
        "cache_text_encoder_outputs",
        (
            ("library/train_util.py", "def get_timesteps_and_huber_c("),
            ("library/train_util.py", "return noise, noisy_latents, timesteps, huber_c\n"),
        ),
    ),
)

# (module, attribute) the adapter replaces or wraps; all must exist in a supported tree.
HOOKS = (
    ("library.train_util", "get_noise_noisy_latents_and_timesteps"),
    ("library.train_util", "read_config_from_file"),
    ("library.train_util", "get_optimizer"),
    ("library.train_util", "replace_unet_modules"),
    ("library.train_util", "get_sai_model_spec"),
    ("library.train_util", "conditional_loss"),
    ("library.train_util", "BaseDataset.process_caption"),
    ("library.train_util", "BaseDataset.__getitem__"),
    ("library.custom_train_functions", "apply_snr_weight"),
)


def detect(root: Path) -> KohyaVersion:
    """The known version ``root`` is, or a ``KohyaVersionError`` naming what is missing."""
    root = Path(root)
    if not (root / "library" / "train_util.py").is_file():
        raise KohyaVersionError(f"{root}: not an sd-scripts tree (no library/train_util.py). Pass --sd-scripts DIR.")
    return fingerprints.identify(
        root,
        KNOWN,
        lambda version: fingerprints.missing_texts(root, version.fingerprints),
        unknown="an sd-scripts version the sdplug adapter does not know",
        advice="Nothing was patched; train with sd-scripts main or v0.8.7, or without sdplug.",
        error=KohyaVersionError,
    )


def check_hooks(modules: dict[str, object], version: KohyaVersion) -> None:
    """Every hook the adapter needs, present in the imported modules (else refuse, untouched)."""
    for module_name, attribute in (*HOOKS, ("library.train_util", f"BaseDataset.{version.text_cache_method}")):
        if fingerprints.lookup(modules, module_name, attribute) is None:
            raise KohyaVersionError(
                f"sd-scripts {version.name}: hook {module_name}.{attribute} is missing, so sdplug cannot apply the preset "
                "completely; refusing before training rather than applying part of it."
            )


# the source each flow script must have for the table to hold: the overrides that make the SD
# scripts' tricks dead there, and the draw function that reads the flow flags
FLOW_FINGERPRINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "flux_train_network.py": (
        ("flux_train_network.py", "def post_process_loss(self, loss, args, timesteps, noise_scheduler):\n        return loss\n"),
        ("flux_train_network.py", "noise = torch.randn_like(latents)"),
        ("library/flux_train_utils.py", "def apply_model_prediction_type(args, model_pred, noisy_model_input, sigmas):"),
    ),
    "sd3_train_network.py": (
        ("sd3_train_network.py", "def post_process_loss(self, loss, args, timesteps, noise_scheduler):\n        return loss\n"),
        ("library/sd3_train_utils.py", "def get_noisy_model_input_and_timesteps(args, latents, noise, device, dtype)"),
    ),
    "lumina_train_network.py": (
        (
            "lumina_train_network.py",
            "def post_process_loss(self, loss, args, timesteps, noise_scheduler):\n        return loss\n",
        ),
        ("library/lumina_train_util.py", "def get_noisy_model_input_and_timesteps("),
    ),
    "hunyuan_image_train_network.py": (
        (
            "hunyuan_image_train_network.py",
            "def post_process_loss(self, loss, args, timesteps, noise_scheduler):\n        return loss\n",
        ),
        ("library/flux_train_utils.py", "def get_noisy_model_input_and_timesteps("),
    ),
    "anima_train_network.py": (
        ("anima_train_network.py", "def post_process_loss(self, loss, args, timesteps, noise_scheduler):\n        return loss\n"),
        ("library/anima_train_utils.py", "def compute_loss_weighting_for_anima("),
    ),
}


def check_flow_script(script: str, root: Path, version: KohyaVersion, consequence: str) -> None:
    """A flow script of ``root`` is the one sdplug's tables were read from (sd-scripts main at
    48d368f, ``FLOW_FINGERPRINTS``); an SD script passes unchecked (``detect`` recognised it)."""
    if script not in FLOW_FINGERPRINTS:
        return
    missing = fingerprints.missing_texts(root, FLOW_FINGERPRINTS[script])
    if version.name != "main" or missing:
        what = f"missing {missing[0]}" if missing else f"sd-scripts {version.name}"
        raise KohyaVersionError(
            f"{script} in {root} is not the one sdplug's table describes (sd-scripts main at 48d368f): {what}. {consequence}"
        )
