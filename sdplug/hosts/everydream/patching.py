"""``sdplug patch everydream DIR`` / ``sdplug unpatch everydream DIR``: what a plugin cannot reach.

EveryDream2 computes its loss inline in train.py's step closure (MSE, Huber or their blend by
timestep, with min-SNR folded into ``loss_scale``), and no plugin hook sees it. The patch
(``patches/everydream/<version>/train.py.patch``) adds three things to train.py:

- after the plugins are loaded (before EveryDream2's plugin runner takes them), a plugin's ``sdplug_loss`` (the sdplug plugin's, when the preset
  sets ``[loss]``) is picked up; the closure then returns that loss instead of its own:
  ``sdplug_loss(model_pred, target, timesteps, loss_scale)``, the preset's loss type and
  weighting per sample, times EveryDream2's ``loss_scale`` (image multipliers), mean over the batch;
- a ``--sdplug_preset PATH`` option (or the ``sdplug_preset`` train.json key, which unpatched
  trees read too); with it the sdplug plugin is loaded even if ``plugins`` does not list it;
- nothing else: without a preset the patched train.py runs EveryDream2's own code unchanged.

Applied, checked and reversed byte for byte by ``sdplug.hosts.patch_files``.
"""

from __future__ import annotations

from pathlib import Path

from sdplug.hosts.everydream.version import EverydreamVersionError, detect
from sdplug.hosts.patch_files import PatchSet, tree_folder

# what the patch inserts, before LOAD_ANCHOR, LOSS_ANCHOR and after the --plugins option
# (tests/hosts/make_everydream_patches.py writes the shipped patch from these)
LOAD_ANCHOR = "    plugin_runner = PluginRunner(plugins=plugins)\n"
LOAD_LINES = (
    '    if getattr(args, "sdplug_preset", None) and not any(type(p).__module__.startswith("sdplug.") for p in plugins):\n'
    '        plugins.append(load_plugin("sdplug.hosts.everydream.Plugin"))  # sdplug patch: --sdplug_preset alone\n'
    '    sdplug_loss = next((p.sdplug_loss for p in plugins if getattr(p, "sdplug_loss", None)), None)  # sdplug patch\n'
)
LOSS_ANCHOR = "        if return_loss:\n"
LOSS_LINES = (
    "        if return_loss and sdplug_loss is not None:  # sdplug patch: the preset's loss type and weighting\n"
    "            return model_pred, target, sdplug_loss(model_pred, target, timesteps, loss_scale)\n"
)
OPTION_LINE = (
    '    argparser.add_argument("--sdplug_preset", type=str, default=None, '
    'help="sdplug preset (TOML): its tricks replace EveryDream2\'s own (loads the sdplug plugin)")\n'
)
PATCHED_FILE = "train.py"


def patches_dir() -> Path:
    from sdplug.resources import shipped_dir

    return shipped_dir("patches") / "everydream"


def is_patched(root: Path) -> bool:
    """train.py routes its loss through a plugin's ``sdplug_loss`` (every inserted line present)."""
    path = Path(root) / PATCHED_FILE
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return all(line in text for line in (*LOAD_LINES.splitlines(True), *LOSS_LINES.splitlines(True)))


def _patches(directory: Path, command: str) -> tuple[Path, PatchSet]:
    root = tree_folder(
        directory, usage=f"sdplug {command} everydream DIR", what="the EveryDream2 folder", error=EverydreamVersionError
    )
    version = detect(root)
    return root, PatchSet(f"EveryDream2 {version.name}", patches_dir(), version.name)


def apply(directory: Path) -> list[str]:
    """Patch train.py; returns what was done, one line per file."""
    root, patches = _patches(directory, "patch")
    return patches.apply(root) + [f"{patches.host} in {root}: train.py accepts --sdplug_preset PATH and takes a preset's [loss]"]


def revert(directory: Path) -> list[str]:
    """Undo ``apply``: train.py back to the original bytes."""
    root, patches = _patches(directory, "unpatch")
    return patches.revert(root)
