"""Checkpoints that resume with the same random streams as an uninterrupted run, or refuse.

A checkpoint holds the trainable weights, the optimizer, the step, the audit and loss records
(``shared.pt``, written once: they are identical across data-parallel ranks), every random
stream of each rank (``rank<R>.pt``) and, written last, ``checkpoint.json``: the run's
identity (the options and preset that shape its state), the step, and the SHA-256 of every
file. Everything is written into ``checkpoint-N.partial/`` and renamed to ``checkpoint-N/``
only when complete, so a run killed while saving leaves no folder that looks finished.

Loading is safe against files someone else made: the tensors and plain data are read with
``torch.load(weights_only=True)``, which never runs code from the file.
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

MANIFEST = "checkpoint.json"
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


def write_part(directory: Path, *, rank: int, shared: dict | None, streams: dict) -> None:
    """This rank's files, into the folder's ``.partial`` twin (every rank calls this first)."""
    work = partial_dir(directory)
    work.mkdir(parents=True, exist_ok=True)
    if shared is not None:
        torch.save(shared, work / "shared.pt")
    torch.save(streams, work / f"rank{rank}.pt")


def seal(directory: Path, *, identity: dict[str, Any], step: int) -> None:
    """Main process, after every rank wrote its part: the manifest last, then the rename."""
    work = partial_dir(directory)
    files = sorted(p.name for p in work.iterdir() if p.suffix == ".pt")
    manifest = {"step": step, "identity": identity, "files": {name: _sha256(work / name) for name in files}}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if directory.exists():  # a re-run that saves the same step again replaces the old folder
        shutil.rmtree(directory)
    os.replace(work, directory)


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


def read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CheckpointError(f"--resume {directory}: no such checkpoint folder. {_newest_before(directory)}")
    manifest_path = directory / MANIFEST
    if directory.name.endswith(PARTIAL) or not manifest_path.is_file():
        raise CheckpointError(
            f"--resume {directory}: an incomplete checkpoint (a run stopped while writing it, or not a checkpoint "
            f"at all: it has no {MANIFEST}). {_newest_before(directory)}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--resume {directory}: {MANIFEST} is unreadable ({exc}). {_newest_before(directory)}") from None
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


def load_part(directory: Path, name: str) -> Any:
    """One part of a checked checkpoint: tensors and plain data only, never code."""
    try:
        return torch.load(directory / name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"--resume {directory}: {name} holds more than tensors and plain data, so sdplug does not load it "
            f"(unpickling it could run code). Resume only from checkpoints a sdplug run wrote. ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"--resume {directory}: {name} cannot be read ({exc}). {_newest_before(directory)}") from None


def load(directory: Path, *, rank: int, identity: dict[str, Any], steps: int) -> tuple[dict, dict]:
    """The shared state and this rank's streams of a complete, matching checkpoint."""
    manifest = read_manifest(directory)
    check_identity(directory, manifest, identity, steps)
    if f"rank{rank}.pt" not in manifest["files"] or "shared.pt" not in manifest["files"]:
        raise CheckpointError(f"--resume {directory}: has no state for rank {rank}.")
    return load_part(directory, "shared.pt"), load_part(directory, f"rank{rank}.pt")


# -- the reference trainer's runs -------------------------------------------------------------
def run_identity(trainer) -> dict[str, Any]:
    """What shapes this run's state: a checkpoint resumes only into a run with the same."""
    config = trainer.config
    return {
        "preset": trainer.preset.to_toml(),
        "model": str(Path(config.model).resolve()) if config.model is not None else trainer.bundle.source,
        "prediction_type": trainer.bundle.prediction_type,
        "resolution": trainer.bundle.resolution,
        "examples": len(trainer.examples),
        "class_examples": len(trainer.class_examples),
        "mode": config.mode,
        "lora_rank": config.lora_rank if config.mode == "lora" else None,
        "lora_alpha": trainer.lora_alpha if config.mode == "lora" else None,
        "train_text_encoder": config.train_text_encoder,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "prior_loss_weight": config.prior_loss_weight if trainer.class_examples else None,
        "processes": trainer.accelerator.num_processes,
    }


def save_run(trainer, directory: Path) -> None:
    """Checkpoint a reference-trainer run: every rank writes its part, the main process seals."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.unet)
    shared = None
    if trainer.accelerator.is_main_process:
        shared = {
            "weights": trainable_state(unwrapped, trainer.bundle.text_encoder),
            "optimizer": trainer.optimizer.state_dict(),
            "step": trainer.step,
            "loss_bins": trainer.loss_bins,
            "losses": trainer.losses,
        }
    streams = {
        "plan": trainer.plan.state_dict(),  # noise, timesteps, caption and latent streams, audit
        "sampler": trainer.sampler.state_dict(),
        "class_sampler": trainer.class_sampler.state_dict() if trainer.class_sampler else None,
        "draw_log": trainer.draw_log,
    }
    write_part(directory, rank=trainer.rank, shared=shared, streams=streams)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        seal(directory, identity=run_identity(trainer), step=trainer.step)
    trainer.accelerator.wait_for_everyone()


def load_run(trainer, directory: Path) -> None:
    """Continue a reference-trainer run from a complete checkpoint of the same run."""
    shared, streams = load(directory, rank=trainer.rank, identity=run_identity(trainer), steps=trainer.config.steps)
    load_trainable_state(shared["weights"], trainer.accelerator.unwrap_model(trainer.unet), trainer.bundle.text_encoder)
    trainer.optimizer.load_state_dict(shared["optimizer"])
    trainer.step, trainer.loss_bins, trainer.losses = shared["step"], shared["loss_bins"], shared["losses"]
    trainer.plan.load_state_dict(streams["plan"])  # also the learned weighting's state
    trainer.sampler.load_state_dict(streams["sampler"])
    if trainer.class_sampler is not None:
        trainer.class_sampler.load_state_dict(streams["class_sampler"])
    trainer.draw_log = streams["draw_log"]
