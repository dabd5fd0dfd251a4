"""Checkpoints that resume with the same random streams as an uninterrupted run, or refuse.

Saving and loading go through accelerate's ``save_state`` / ``load_state``: the optimizer, the
global random states of every rank and the objects registered for checkpointing (the plan, the
batch samplers and the run's records, each holding every rank's state) are accelerate's files.
Two things are sdplug's own:

- the weights: only the trainable ones (LoRA, or what DreamBooth trains), as
  ``trainable.safetensors``, through accelerate's model-state hooks -- accelerate would store
  every weight of the model (about 3.4 GB per LoRA checkpoint on SD 1.5);
- ``checkpoint.json``, written last: the run's identity (the options and preset that shape its
  state), the step and the SHA-256 of every file. Everything is written into
  ``checkpoint-N.partial/`` and renamed to ``checkpoint-N/`` only when complete, so a run
  killed while saving leaves no folder that looks finished.

Loading is safe against files someone else made: before accelerate reads a pickle (it loads
registered objects with ``weights_only=False``), every pickle in the folder must load with
``weights_only=True``, which never runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.trainer.files import follow_umask

MANIFEST = "checkpoint.json"
MANIFEST_CHECKSUM = "manifest_sha256"
PARTIAL = ".partial"
_NAME = re.compile(r"^checkpoint-(\d+)$")

# identity key -> how the user sets it (named in a mismatch error)
IDENTITY_OPTIONS = {
    "preset": "the preset (resolved)",
    "model": "--model",
    "prediction_type": "--prediction-type",
    "resolution": "--resolution",
    "examples": "--data (number of images)",
    "class_examples": "--class-data (number of images)",
    "mode": "--mode",
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    "train_text_encoder": "--train-text-encoder",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "prior_loss_weight": "--prior-loss-weight",
    "processes": "the number of processes",
}


class CheckpointError(SdplugError):
    """A --resume target that is missing, incomplete, corrupt, unsafe or of another run."""


def trainable_state(*modules: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    state = {}
    for index, module in enumerate(modules):
        if module is None:
            continue
        for name, param in module.named_parameters():
            if param.requires_grad:
                state[f"{index}.{name}"] = param.detach().cpu().clone()
    return state


def load_trainable_state(state: dict[str, torch.Tensor], *modules: torch.nn.Module | None) -> None:
    for index, module in enumerate(modules):
        if module is None:
            continue
        for name, param in module.named_parameters():
            key = f"{index}.{name}"
            if param.requires_grad:
                if key not in state:
                    raise CheckpointError(f"the checkpoint has no weights for {name}; it was saved by a run with other options.")
                with torch.no_grad():
                    param.copy_(state[key].to(param.device, param.dtype))


# -- writing -----------------------------------------------------------------------------------
def partial_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + PARTIAL)


def seal(directory: Path, *, identity: dict[str, Any], step: int) -> None:
    """Main process, after every rank wrote its part: the manifest last, then the rename."""
    work = partial_dir(directory)
    files = sorted(p.name for p in work.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest: dict[str, Any] = {"step": step, "identity": identity, "files": {name: _sha256(work / name) for name in files}}
    manifest[MANIFEST_CHECKSUM] = _manifest_checksum(manifest)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    follow_umask(work)  # safetensors and torch create their files 0600
    if directory.exists():  # a re-run that saves the same step again replaces the old folder
        shutil.rmtree(directory)
    os.replace(work, directory)


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without this field: a changed byte in checkpoint.json itself shows."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- finding and checking ------------------------------------------------------------------------
def complete_checkpoints(output: Path) -> list[Path]:
    """The complete checkpoints in ``output``, oldest step first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _NAME.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def read_step(directory: Path) -> int | None:
    """The step a complete checkpoint holds (None when its manifest cannot be read)."""
    try:
        step = json.loads((directory / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def resolve(reference: Path, output: Path) -> Path:
    """``--resume`` as a checkpoint folder: ``latest`` is the newest complete one in ``output``."""
    if str(reference) == "latest":
        complete = complete_checkpoints(output)
        if not complete:
            raise CheckpointError(f"--resume latest: {output} holds no complete checkpoint (checkpoint-N/ with {MANIFEST}).")
        return complete[-1]
    return Path(reference)


def _newest_before(directory: Path) -> str:
    complete = [p for p in complete_checkpoints(directory.parent) if p.resolve() != directory.resolve()]
    if not complete:
        return f"{directory.parent} holds no complete checkpoint to resume from instead."
    return f"The newest complete checkpoint there is {complete[-1]} (or use --resume latest)."


def check_complete(directory: Path) -> None:
    """Refuse a ``--resume`` folder that is missing or was never finished (cheap: reads no file)."""
    if not directory.is_dir():
        raise CheckpointError(f"--resume {directory}: no such checkpoint folder. {_newest_before(directory)}")
    manifest_path = directory / MANIFEST
    if directory.name.endswith(PARTIAL) or not manifest_path.is_file():
        raise CheckpointError(
            f"--resume {directory}: an incomplete checkpoint (a run stopped while writing it, or not a checkpoint "
            f"at all: it has no {MANIFEST}). {_newest_before(directory)}"
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    check_complete(directory)
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        well_formed = isinstance(manifest["step"], int) and isinstance(manifest["identity"], dict) and isinstance(files, dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"--resume {directory}: {MANIFEST} is corrupt: unreadable ({exc}). {_newest_before(directory)}"
        ) from None
    # written by sdplug since the field exists; an older manifest is checked for its shape only
    recorded = manifest.get(MANIFEST_CHECKSUM)
    if not well_formed or (recorded is not None and recorded != _manifest_checksum(manifest)):
        raise CheckpointError(
            f"--resume {directory}: {MANIFEST} is corrupt: it does not match its own checksum (changed since it was "
            f"written), so its record of the run cannot be trusted. {_newest_before(directory)}"
        )
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or _sha256(path) != expected:
            raise CheckpointError(
                f"--resume {directory}: corrupt checkpoint: {name} is missing or does not match its recorded "
                f"checksum (truncated or changed since it was written). {_newest_before(directory)}"
            )
    return manifest


def check_identity(directory: Path, manifest: dict[str, Any], identity: dict[str, Any], steps: int) -> None:
    """Refuse a resume whose options would not continue the checkpoint's run."""
    saved = manifest.get("identity", {})
    for key, option in IDENTITY_OPTIONS.items():
        if saved.get(key) != identity.get(key):
            if key == "preset":
                detail = "the resolved preset differs from the checkpoint's (compare with preset.toml of the first run)"
            else:
                detail = f"the checkpoint was made with {option} = {saved.get(key)!r}, this run has {identity.get(key)!r}"
            raise CheckpointError(
                f"--resume {directory}: {detail}. Resume with the checkpoint's options, or start a new run without --resume."
            )
    if steps <= manifest["step"]:
        raise CheckpointError(
            f"--resume {directory}: the checkpoint is at step {manifest['step']} and --steps is {steps}: nothing to train. "
            f"Allowed: --steps > {manifest['step']}."
        )


# the files accelerate unpickles; everything else is safetensors or JSON
_PICKLES = (".pkl", ".bin", ".pt")


def check_pickles(directory: Path) -> None:
    """Refuse a checkpoint with a pickle that holds more than tensors and plain data: accelerate
    loads registered objects with ``weights_only=False``, so each is tried first with
    ``weights_only=True`` (numpy's random state allowed, as accelerate allows it)."""
    from accelerate.utils import load as weights_only_load

    for path in sorted(p for p in directory.iterdir() if p.suffix in _PICKLES):
        try:
            weights_only_load(path, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"--resume {directory}: {path.name} holds more than tensors and plain data, so sdplug does not load it "
                f"(unpickling it could run code). Resume only from checkpoints a sdplug run wrote. ({str(exc).splitlines()[0]})"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(
                f"--resume {directory}: {path.name} cannot be read ({exc}). {_newest_before(directory)}"
            ) from None
