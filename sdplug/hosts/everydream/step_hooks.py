"""The plugin inside EveryDream2's step: the caption rows, the noise call and the loss scale.

EveryDream2's whole step is one closure in train.py (``get_model_prediction_and_target``) that
draws its noise and timesteps, calls ``noise_scheduler.add_noise(latents, noise, timesteps)``,
then builds the target from the same ``noise`` and ``timesteps`` tensors and finally scales
each sample's loss by the batch's ``loss_scale``. It has no hook of its own, so:

- ``on_step_start`` (the batch before the closure): the preset's caption transforms and
  dropout decide every sample here, in the training process (EveryDream2's
  ``transform_caption`` runs in data-loader workers, whose counts never reach it), and the
  batch's token rows are rewritten with EveryDream2's own tokenizer settings; the batch's
  ``loss_scale`` becomes a float tensor the noise call can scale in place;
- the scheduler instance's ``add_noise`` (wrapped): the plan's noise and timesteps are written
  into EveryDream2's ``noise`` and ``timesteps`` tensors in place -- so its target, UNet call
  and any later use see them -- the model input comes from the plan, and the preset's loss
  weighting multiplies ``loss_scale`` by each sample's weight;
- in a patched train.py (``sdplug patch everydream``) with a preset that sets ``[loss]``, the
  closure's loss is ``loss`` below: the weighting then comes with the loss type, not through
  ``loss_scale``;
- a noise call that no ``on_step_start`` announced is validation (EveryDream2 validates through
  the same closure, also once before training starts): the preset's noise and timesteps from
  generators seeded afresh for every validation pass (the same draws each pass, as
  EveryDream2's own validation reseeds), kept out of the audit, and no step.
"""

from __future__ import annotations

from typing import Any

import torch

from sdplug.errors import SdplugError


class StepHooks:
    def __init__(self, host: Any):
        self.host = host
        self.training_call_pending = False  # on_step_start ran; the next noise call trains
        self.loss_scale: torch.Tensor | None = None
        self.validation_generators: tuple[torch.Generator, torch.Generator] | None = None
        self.validation_calls = 0
        self.training_calls = 0

    @property
    def plan(self):
        return self.host.plan

    # -- on_step_start ------------------------------------------------------------------------
    def step_start(self, batch: dict, epoch: int) -> None:
        preset = self.host.preset
        self.plan.step()  # one EveryDream2 training step: one closure call
        self.validation_generators = None  # the next validation pass starts its fixed draws again
        if preset.caption:
            self._captions(batch, epoch)
        if preset.loss_weighting is not None:
            scale = batch.get("loss_scale")
            size = len(batch["captions"])
            scale = torch.ones(size) if scale is None else torch.as_tensor(scale)
            # EveryDream2 collates integer scales (1) as an int64 tensor: a float copy to scale in place
            self.loss_scale = scale.to(torch.float32).clone()
            batch["loss_scale"] = self.loss_scale
        self.training_call_pending = True

    def _captions(self, batch: dict, epoch: int) -> None:
        tokenizer, tokens = self.host.tokenizer, batch["tokens"]
        texts = [str(self.plan.caption(str(caption), epoch=epoch)) for caption in batch["captions"]]
        ids = tokenizer(texts, truncation=True, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        rewritten = torch.as_tensor(ids, dtype=tokens.dtype)
        if rewritten.shape != tokens.shape:
            raise SdplugError(
                f"EveryDream2's batch tokens have shape {tuple(tokens.shape)}, its tokenizer now gives "
                f"{tuple(rewritten.shape)}: the plugin cannot rewrite the caption rows of this data loader."
            )
        tokens.copy_(rewritten)  # every row: a per-image cond_dropout of EveryDream2's never stays
        batch["captions"][:] = texts  # what trained ('' for a dropped caption)

    # -- the scheduler's add_noise ------------------------------------------------------------
    def add_noise(self, original: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        training, self.training_call_pending = self.training_call_pending, False
        preset = self.host.preset
        self.host.check_schedule()
        if training:
            self.training_calls += 1
        else:
            self.validation_calls += 1
        if preset.noise or preset.timesteps:
            draw, drawn = self._draw(latents, training)
            if tuple(timesteps.shape) != (latents.shape[0],):
                raise SdplugError(f"EveryDream2 drew timesteps of shape {tuple(timesteps.shape)}; one per sample expected.")
            noise.copy_(draw.target.to(noise.dtype))  # the closure's target and loss read these tensors
            timesteps.copy_(drawn.to(timesteps.dtype))
            noisy = self.plan.noisy_input(latents, draw, timesteps).to(latents.dtype)
        else:
            noisy = original(latents, noise, timesteps)
        if training and preset.loss_weighting is not None and not self.host.loss_through_patch:
            self._weight(timesteps)
        return noisy

    # -- the patched closure's loss (``sdplug patch everydream``) -------------------------------
    def loss(self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, loss_scale: Any) -> torch.Tensor:
        """The training loss of a patched train.py: the preset's loss type and weighting per
        sample (``plan.loss``), times EveryDream2's ``loss_scale`` (its image multipliers), mean
        over the batch -- EveryDream2's own reduction, whose MSE branch is ``(mse * scale).mean()``."""
        per_sample = self.plan.loss(model_pred, target, timesteps)
        if loss_scale is None:
            return per_sample.mean()
        scale = torch.as_tensor(loss_scale).to(per_sample.device, torch.float32).reshape(-1)
        if scale.shape != per_sample.shape:
            raise SdplugError(
                f"EveryDream2's loss_scale has {scale.numel()} entries for a batch of {per_sample.shape[0]}; "
                "the preset's loss cannot scale it per sample."
            )
        return (per_sample * scale).mean()

    def _draw(self, latents: torch.Tensor, training: bool):
        plan, size = self.plan, latents.shape[0]
        if training:
            drawn = plan.timesteps(size, device=latents.device)
            return plan.noise(latents, timesteps=drawn), drawn
        noise_generator, timestep_generator = self._fixed_generators(latents.device)
        with plan.validation():
            drawn = plan.timesteps(size, generator=timestep_generator, device=latents.device)
            draw = plan.noise(latents, generator=noise_generator, timesteps=drawn)
        return draw, drawn

    def _fixed_generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        if self.validation_generators is None:
            plan = self.plan
            self.validation_generators = (
                torch.Generator(device=device).manual_seed(plan.stream_seed("everydream-validation-noise")),
                torch.Generator(device="cpu").manual_seed(plan.stream_seed("everydream-validation-timesteps")),
            )
        return self.validation_generators

    def _weight(self, timesteps: torch.Tensor) -> None:
        if self.loss_scale is None or self.loss_scale.shape[0] != timesteps.shape[0]:
            raise SdplugError(
                "EveryDream2's noise call came without its batch's loss_scale; the preset's weighting cannot apply."
            )
        # the weighting's per-sample weight (plan.weight of a unit loss), recorded in the audit
        weights = self.plan.weight(torch.ones(timesteps.shape[0], device=timesteps.device), timesteps)
        self.loss_scale.mul_(weights.to(self.loss_scale.device, self.loss_scale.dtype))
