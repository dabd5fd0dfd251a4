"""Validation loss: held-out images, a fixed timestep grid and fixed noise, every N steps.

The draws never change -- not between evaluations, runs, seeds or presets: every held-out image
is noised at each of ``GRID`` timesteps (the centres of equal bins of the schedule) with
Gaussian noise from a generator of its own fixed seed, and the loss is the plain MSE in the
model's prediction space, unweighted. The preset's own noise and weighting shape training,
not this measurement, so two presets' curves can be laid side by side. Held out: a folder
(``--validation-data``) or a share of the training images chosen with the same fixed seed
(``--validation-split``), never trained on.
"""

from __future__ import annotations

import torch

from sdplug.process import Process
from sdplug.trainer import data
from sdplug.trainer.sampling import encode_prompts

VALIDATION_SEED = 2_024_1201  # one seed for every run: the curve's draws never depend on --seed
GRID = 10


def hold_out(examples: list, share: float) -> tuple[list, list]:
    """The training and the held-out examples: ``share`` of them, at least one, by a fixed seed."""
    count = max(1, round(share * len(examples)))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class ValidationLoss:
    """The fixed validation batch of a run, and its loss for the model as it is now."""

    def __init__(self, bundle, examples, process: Process, device):
        self.bundle, self.device, self.process = bundle, device, process
        images = torch.stack([data.load_image(e.image, bundle.resolution) for e in examples])
        with torch.no_grad():
            if bundle.vae is None:  # pixel space
                latents = images
            else:  # the posterior's mean: no draw
                latents = bundle.vae.encode(images.to(device)).latent_dist.mean.cpu() * bundle.latent_scale
        steps = process.num_train_timesteps  # a flow process's grid: tenths of sigma
        self.grid = [(2 * i + 1) * steps // (2 * GRID) for i in range(GRID)]
        self.latents = latents.repeat_interleave(GRID, dim=0)
        self.timesteps = torch.tensor(self.grid).repeat(len(examples))
        self.noise = torch.randn(self.latents.shape, generator=torch.Generator().manual_seed(VALIDATION_SEED))
        self.captions = [e.caption for e in examples for _ in range(GRID)]
        self.count = len(examples)

    @torch.no_grad()
    def __call__(self, unet, batch_size: int = 16) -> float:
        total, seen = 0.0, 0
        for start in range(0, len(self.latents), batch_size):
            latents = self.latents[start : start + batch_size].to(self.device)
            noise = self.noise[start : start + batch_size].to(self.device)
            t = self.timesteps[start : start + batch_size].to(self.device)
            states = encode_prompts(self.bundle, self.captions[start : start + batch_size], self.device)
            x_t = self.process.noisy_input(latents, noise, t)
            target = self.process.target(latents, noise, t)
            prediction = unet(x_t, self.process.model_time(t), encoder_hidden_states=states).sample
            total += float(((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).sum())
            seen += len(latents)
        return total / seen

    def record(self, every: int, curve: list[tuple[int, float]]) -> dict:
        """The audit's ``validation`` section."""
        return {
            "every": every,
            "images": self.count,
            "timesteps": self.grid,
            "seed": VALIDATION_SEED,
            "loss": "unweighted MSE in the prediction space, Gaussian noise (comparable across presets)",
            "steps": [step for step, _ in curve],
            "values": [value for _, value in curve],
        }


def maybe_validate(trainer, *, final: bool = False) -> None:
    """Measure the validation loss at this step if it is due (main process; every N steps, and
    before and after training)."""
    validator, every, step = trainer.validator, trainer.config.validate_every, trainer.step
    if validator is None or not trainer.accelerator.is_main_process:
        return
    done = {s for s, _ in trainer.validation_curve}
    due = step == 0 or final or (every and step % every == 0)
    if not due or step in done:
        return
    from sdplug.strategies.optimizer_modes import evaluating

    with evaluating(trainer.optimizer):  # a schedule-free optimizer's evaluation weights
        value = validator(trainer.accelerator.unwrap_model(trainer.unet))
    trainer.validation_curve.append((step, value))
    if trainer.config.log_with:
        trainer.accelerator.log({"validation_loss": value}, step=step)
