"""The reference trainer's checkpoints through accelerate's ``save_state`` / ``load_state``.

``register`` (once, after ``accelerator.prepare``) puts the plan, the batch samplers and the
run's records in accelerate's checkpointing, and replaces accelerate's model files by the
trainable weights alone (``trainable.safetensors``); ``save_run`` and ``load_run`` wrap
``save_state`` / ``load_state`` in sdplug's checkpoint format (``sdplug.trainer.checkpoint``:
atomic folder, identity, checksums, no unsafe pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from sdplug.strategies.optimizer_modes import evaluating, train_mode
from sdplug.trainer import checkpoint
from sdplug.trainer.checkpoint import CheckpointError

WEIGHTS = "trainable.safetensors"


class EveryRank:
    """One object's state on every rank, for accelerate's checkpointing.

    accelerate writes a registered object's ``state_dict()`` from the main process only, but the
    plan's random streams and the samplers differ per rank: the state saved is every rank's
    (gathered), and loading takes this rank's."""

    def __init__(self, obj: Any, accelerator: Any, name: str):
        self.obj, self.accelerator, self.name = obj, accelerator, name

    def state_dict(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        return {"name": self.name, "ranks": gather_object([self.obj.state_dict()])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks, rank = state["ranks"], self.accelerator.process_index
        if state.get("name") != self.name or len(ranks) != self.accelerator.num_processes:
            raise CheckpointError(
                f"the checkpoint's {state.get('name')!r} state is for {len(ranks)} process(es), this run has "
                f"{self.accelerator.num_processes} and expects {self.name!r}."
            )
        self.obj.load_state_dict(ranks[rank])


class RunRecords:
    """What the trainer has counted so far: the step, the losses and the first draws."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        curve = [[step, value] for step, value in t.validation_curve]
        return {"step": t.step, "loss_bins": t.loss_bins, "losses": t.losses, "draw_log": t.draw_log, "validation": curve}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        t.step, t.loss_bins, t.losses, t.draw_log = state["step"], state["loss_bins"], state["losses"], state["draw_log"]
        t.validation_curve = [(int(step), float(value)) for step, value in state.get("validation", [])]


def _trained_modules(trainer) -> tuple:
    return trainer.accelerator.unwrap_model(trainer.unet), trainer.bundle.text_encoder


def register(trainer) -> None:
    """Put the run's state in accelerate's checkpointing (after ``accelerator.prepare``)."""
    accelerator = trainer.accelerator

    def save_weights(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_file(checkpoint.trainable_state(*_trained_modules(trainer)), str(Path(output_dir) / WEIGHTS))
        weights.clear()  # accelerate would write every weight of every model

    def load_weights(models: list, input_dir: str) -> None:
        models.clear()  # accelerate's model files are not there: the trainable weights are
        checkpoint.load_trainable_state(load_file(str(Path(input_dir) / WEIGHTS)), *_trained_modules(trainer))

    accelerator.register_save_state_pre_hook(save_weights)
    accelerator.register_load_state_pre_hook(load_weights)
    objects = [EveryRank(trainer.plan, accelerator, "plan"), EveryRank(trainer.sampler, accelerator, "sampler")]
    if trainer.class_sampler is not None:
        objects.append(EveryRank(trainer.class_sampler, accelerator, "class_sampler"))
    objects.append(EveryRank(RunRecords(trainer), accelerator, "records"))
    accelerator.register_for_checkpointing(*objects)


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
    """Every rank saves through accelerate into the ``.partial`` folder; the main process seals it."""
    accelerator = trainer.accelerator
    with evaluating(trainer.optimizer):  # schedule-free: saved as its evaluation weights, resumed exactly
        accelerator.save_state(str(checkpoint.partial_dir(directory)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.seal(directory, identity=run_identity(trainer), step=trainer.step)
    accelerator.wait_for_everyone()


def load_run(trainer, directory: Path) -> None:
    """Continue a run from a complete, intact, safe checkpoint of the same run."""
    manifest = checkpoint.read_manifest(directory)
    checkpoint.check_identity(directory, manifest, run_identity(trainer), trainer.config.steps)
    if WEIGHTS not in manifest["files"]:
        raise CheckpointError(f"--resume {directory}: has no {WEIGHTS}; it was not written by this sdplug version.")
    checkpoint.check_pickles(directory)
    trainer.accelerator.load_state(str(directory))
    train_mode(trainer.optimizer)  # saved in eval mode (schedule-free): steps need the training weights
