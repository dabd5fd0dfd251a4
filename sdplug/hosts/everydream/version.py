"""Recognise an EveryDream2 tree, and refuse one the plugin does not know.

EveryDream2 has no version string the plugin could trust, so a version is recognised by the
source it relies on: the step closure's signature and its ``add_noise`` call, the plugin loader
and its call site (before the dataset and optimizer are built), the batch's ``loss_scale`` and
the optimizer wrapper's ``create_optimizers``. Every fingerprint of a known version must be
present, and every name the plugin reads at run time must exist, before anything is changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts import fingerprints


class EverydreamVersionError(SdplugError):
    """An EveryDream2 tree the plugin does not support."""


@dataclasses.dataclass(frozen=True)
class EverydreamVersion:
    name: str
    fingerprints: tuple[tuple[str, str], ...]  # (file, text that must be in it)
    # the order the step relies on: the noise call comes before the target and the loss scale
    ordered: tuple[str, str, tuple[str, ...]]  # (file, function start, texts in this order after it)


KNOWN = (
    EverydreamVersion(
        "main",
        (
            (
                "train.py",
                "def get_model_prediction_and_target(image, tokens, zero_frequency_noise_ratio=0.0, "
                "return_loss=False, loss_scale=None, embedding_perturbation=0.0):",
            ),
            ("train.py", "noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)"),
            ("train.py", "plugins = [load_plugin(name) for name in args.plugins]"),
            ("train.py", 'loss_scale=batch["loss_scale"]'),
            ("train.py", "ed_optimizer = EveryDreamOptimizer(args,"),
            ("train.py", "plugin_runner.run_on_step_start("),
            ("train.py", "    main(args)\n"),
            ("plugins/plugins.py", "def load_plugin(plugin_path):"),
            ("plugins/plugins.py", "class BasePlugin:"),
            ("data/every_dream.py", '"loss_scale": loss_scale'),
            ("data/every_dream.py", 'example["tokens"] = torch.tensor(example["tokens"])'),
            ("optimizer/optimizers.py", "def create_optimizers(self, args, text_encoder_params, unet_params):"),
        ),
        (
            "train.py",
            "def get_model_prediction_and_target(",
            (
                "timesteps = torch.randint(args.timestep_start, args.timestep_end",
                "noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)",
                "target = noise_scheduler.get_velocity(latents, noise, timesteps)",
                "model_pred = unet(noisy_latents, timesteps, encoder_hidden_states)",
                "loss_scale = loss_scale.view(-1, 1, 1, 1)",
            ),
        ),
    ),
)

# what the plugin reads in train.py's main() when it is built (main's own variables)
MAIN_LOCALS = ("args", "log_folder", "noise_scheduler", "unet", "text_encoder", "tokenizer")
# (module, attribute) it replaces or wraps
HOOKS = (
    ("optimizer.optimizers", "EveryDreamOptimizer.create_optimizers"),
    ("optimizer.optimizers", "EveryDreamOptimizer.get_textenc_lr"),
)


def _missing(root: Path, version: EverydreamVersion) -> list[str]:
    return fingerprints.missing_texts(root, version.fingerprints) + fingerprints.missing_order(root, *version.ordered)


def detect(root: Path) -> EverydreamVersion:
    """The known version ``root`` is, or an ``EverydreamVersionError`` naming what is missing."""
    root = Path(root)
    if not (root / "train.py").is_file() or not (root / "plugins" / "plugins.py").is_file():
        raise EverydreamVersionError(f"{root}: not an EveryDream2 tree (no train.py and plugins/plugins.py).")
    return fingerprints.identify(
        root,
        KNOWN,
        lambda version: _missing(root, version),
        unknown="an EveryDream2 version the sdplug plugin does not know",
        advice="Nothing was changed; train with EveryDream2 main, or without sdplug.",
        error=EverydreamVersionError,
    )


def check_runtime(main_locals: Mapping[str, object] | None, modules: Mapping[str, object], version: EverydreamVersion) -> None:
    """Every name the plugin reads or hooks, present in the running process (else refuse)."""
    if main_locals is None:
        raise EverydreamVersionError(
            'the sdplug plugin must be built by EveryDream2\'s train.py main() (train.json "plugins"); '
            "it found no such caller, so it cannot reach the noise scheduler and models."
        )
    absent = [f"main(): {name}" for name in MAIN_LOCALS if main_locals.get(name) is None]
    for module_name, attribute in HOOKS:
        if fingerprints.lookup(modules, module_name, attribute) is None:
            absent.append(f"{module_name}.{attribute}")
    if absent:
        raise EverydreamVersionError(
            f"EveryDream2 {version.name}: {', '.join(absent)} missing, so sdplug cannot apply the preset completely; "
            "refusing before training rather than applying part of it."
        )
