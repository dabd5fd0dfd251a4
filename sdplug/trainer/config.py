"""The reference trainer's options, checked for conflicts before anything loads."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sdplug.errors import SdplugError

# the embedded model's processes: DDPM's three prediction types, or rectified flow (velocity)
EMBEDDED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "velocity")
SAMPLE_PROMPTS = (
    "a red circle on a black background",
    "a blue square on a white background",
    "a yellow triangle on a dark background",
    "a green circle on a light background",
)


class OptionError(SdplugError):
    """Options that conflict or are out of range."""


@dataclasses.dataclass
class TrainConfig:
    preset: str
    model: Path | None = None
    data: Path | None = None
    mode: str = "lora"
    output: Path = Path("output")
    steps: int = 400
    batch_size: int = 16
    seed: int = 0
    resolution: int | None = None
    prediction_type: str | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    train_text_encoder: bool = False
    class_data: Path | None = None
    prior_loss_weight: float = 1.0
    save_every: int = 0
    stop_after: int | None = None
    resume: Path | None = None
    log_with: str | None = None
    # None: the lines of sample_prompts_file, else captions of --data, else SAMPLE_PROMPTS
    sample_prompts: tuple[str, ...] | None = None
    sample_prompts_file: Path | None = None
    sample_seeds: tuple[int, ...] = (0, 1)
    guidance_scales: tuple[float, ...] = (1.0, 3.0, 7.5)
    sample_steps: int = 25
    samples: bool = True
    progress: bool = True
    validation_data: Path | None = None  # held-out images with captions
    validation_split: float = 0.0  # or this share of --data, held out
    validate_every: int = 0  # 0: before and after training only
    masked_loss: bool = False  # loss masks from -masklabel.png files or the images' alpha channel
    record_draws: bool = False  # keep every step's draws (tests of resume and multi-process runs)

    def check(self) -> None:
        if self.mode not in ("lora", "dreambooth"):
            raise OptionError(f"--mode {self.mode!r}: allowed: lora, dreambooth.")
        for name in ("steps", "batch_size", "lora_rank", "sample_steps"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"--seed must be a whole number from 0 to 2**63 - 1, got {self.seed}.")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise OptionError(f"--lora-alpha must be a number > 0 (the LoRA's scale is alpha / rank), got {self.lora_alpha:g}.")
        if not math.isfinite(self.prior_loss_weight):
            raise OptionError(f"--prior-loss-weight must be a finite number, got {self.prior_loss_weight}.")
        if self.save_every < 0:
            raise OptionError(f"--save-every must be >= 0 (0: no checkpoints; N: one every N steps), got {self.save_every}.")
        if self.sample_prompts_file is not None:
            if self.sample_prompts is not None:
                raise OptionError("give the sample prompts either as a list or as --sample-prompts FILE, not both.")
            read_prompts_file(self.sample_prompts_file)
        if self.prediction_type is not None and self.model is not None:
            raise OptionError("--prediction-type applies to the embedded model only; a --model's scheduler config sets its own.")
        if self.prediction_type not in (None, *EMBEDDED_PREDICTION_TYPES):
            raise OptionError(f"--prediction-type {self.prediction_type!r}: allowed: {', '.join(EMBEDDED_PREDICTION_TYPES)}.")
        if self.class_data is not None and self.mode != "dreambooth":
            raise OptionError("--class-data (prior preservation) needs --mode dreambooth.")
        if self.prior_loss_weight < 0:
            raise OptionError("--prior-loss-weight must be >= 0.")
        if self.mode == "dreambooth" and (self.lora_alpha is not None):
            raise OptionError("--lora-alpha applies to --mode lora only.")
        if self.stop_after is not None and not 0 < self.stop_after < self.steps:
            raise OptionError(f"--stop-after must be between 1 and --steps - 1 ({self.steps - 1}).")
        if self.validate_every < 0:
            raise OptionError(f"--validate-every must be >= 0 (0: before and after training), got {self.validate_every}.")
        if not 0.0 <= self.validation_split <= 0.5:
            raise OptionError(f"--validation-split {self.validation_split}: allowed: a share from 0 to 0.5 of --data.")
        if self.validation_data is not None and self.validation_split:
            raise OptionError("give the held-out images either as --validation-data DIR or as --validation-split, not both.")
        if self.validate_every and self.validation_data is None and not self.validation_split:
            raise OptionError("--validate-every needs held-out images: --validation-data DIR or --validation-split SHARE.")
        if self.log_with not in (None, "tensorboard"):
            raise OptionError(f"--log-with {self.log_with!r}: allowed: tensorboard.")


def read_prompts_file(path: Path) -> tuple[str, ...]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(
            f"--sample-prompts {path}: cannot read it ({exc}). Give a UTF-8 text file, one prompt a line."
        ) from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise OptionError(f"--sample-prompts {path}: no prompts in it (one prompt a line; '#' starts a comment line).")
    return prompts


def preflight(preset: Any, config: TrainConfig) -> None:
    """Refuse every preset entry or option that could not take effect together."""
    memory = preset.memory
    if memory.cache_text_encoder_outputs and config.train_text_encoder:
        raise OptionError(
            f"{preset.path}: memory.cache_text_encoder_outputs = true conflicts with --train-text-encoder "
            "(a trained text encoder's outputs change every step)."
        )


def check_before_loading(config: TrainConfig) -> None:
    """Everything the command line decides, checked before torch's models and diffusers load and
    before anything is created: the options, the preset, the data folders and ``--output``."""
    from sdplug.preset import load_preset
    from sdplug.trainer import data
    from sdplug.trainer.run_folder import check_output

    config.check()
    preflight(load_preset(config.preset), config)
    for folder in (config.data, config.class_data, config.validation_data):
        if folder is not None:
            data.find_examples(folder)
    if config.resume is not None and str(config.resume) != "latest":
        # before the folder is opened: opening it removes an unfinished checkpoint-N.partial/
        from sdplug.trainer.checkpoint import check_complete

        check_complete(Path(config.resume))
    if config.model is not None and not Path(config.model).exists():
        raise OptionError(f"--model {config.model}: no such file or folder.")
    check_output(Path(config.output))
