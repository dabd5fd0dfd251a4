"""One diffusers script's run with a preset: the plan bound to its scheduler, the script's flags,
and what its step takes from the plan (``session`` holds the one of the process)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.hosts.diffusers_scripts import flags
from sdplug.hosts.diffusers_scripts.edits import VERSION
from sdplug.hosts.lifecycle import HostLifecycle
from sdplug.log import logger
from sdplug.plan import Plan
from sdplug.plan import bind as bind_plan
from sdplug.plan.pipelines import NoiseDraw
from sdplug.preset import Preset

HOST_NAME = "diffusers examples"


class ScriptRun:
    """One script's run with a preset: the plan, the script's flags and what the step used."""

    def __init__(self, preset: Preset, script: str, args: Any, flag_states: dict[str, Any]):
        self.preset, self.script, self.args, self.flag_states = preset, script, args, flag_states
        self.lifecycle = HostLifecycle(HOST_NAME)  # the plan, its failure watch and audit
        self.output_dir = getattr(args, "output_dir", None)
        self.draws_noise = bool(preset.noise) or preset.timesteps is not None
        self.draw: NoiseDraw | None = None
        self.empty_caption: Any = None
        self.written: Path | None = None
        self.rules: list[str] = []  # what the run changed of the script's own behaviour, for the audit
        self.pending_failure: BaseException | None = None

    @property
    def plan(self) -> Plan | None:
        return self.lifecycle.plan

    def bound(self) -> Plan:
        if self.plan is None:
            raise SdplugError(f"{self.script}: the step ran before the noise scheduler was bound (a patch out of order).")
        return self.plan

    def bind(self, noise_scheduler: Any, args: Any) -> None:
        if getattr(args, "do_edm_style_training", False):  # the flag, or an EDM scheduler in the model
            raise flags.DiffusersConflictError(
                f"{self.script}: EDM-style training (--do_edm_style_training, or the model's EDM scheduler) preconditions "
                "inputs, outputs and loss with its own sigmas, which sdplug's noise, timesteps, target and weighting do "
                "not know. Allowed with a preset: a DDPM-scheduled model, without --do_edm_style_training."
            )
        rank = self.lifecycle.rank
        prediction_type = getattr(args, "prediction_type", None) or noise_scheduler.config.prediction_type
        plan = bind_plan(self.preset, noise_scheduler, seed=args.seed or 0, rank=rank, prediction_type=prediction_type)
        self.lifecycle.bind(plan)
        self.lifecycle.check_schedule(
            torch.as_tensor(noise_scheduler.alphas_cumprod),
            f"{self.preset.path or self.preset.name}: schedule.zero_terminal_snr rescales the schedule, but the "
            f"model's scheduler (used by {self.script}'s validation) is not rescaled. Allowed: a scheduler with "
            "rescale_betas_zero_snr = true, or no schedule.zero_terminal_snr.",
            error=flags.DiffusersConflictError,
        )
        logger.info(f"preset {self.preset.name!r} bound to {self.script} ({prediction_type}, rank {rank})")

    def optimizer(self, host_optimizer: torch.optim.Optimizer, args: Any) -> torch.optim.Optimizer:
        groups = [{"params": list(group["params"]), "lr": group["lr"]} for group in host_optimizer.param_groups]
        return self.bound().optimizer(groups, default=lambda _groups: host_optimizer, host_lr=args.learning_rate)

    def noise_and_timesteps(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.bound()
        if not self.draws_noise:
            self.draw = NoiseDraw(noise, noise)
            return noise, timesteps
        drawn = plan.timesteps(len(latents), device=latents.device)
        self.draw = plan.noise(latents, timesteps=drawn)
        return self.draw.target, drawn

    def drop_captions(self, batch: dict[str, Any], epoch: int, empty: Callable[[], Any], key: str = "input_ids") -> None:
        plan = self.bound()
        if not self.preset.caption:
            return
        rows = batch[key]
        dropped = [plan.caption_dropped(epoch=epoch) for _ in range(len(rows))]
        if not any(dropped):
            return
        if self.empty_caption is None:
            self.empty_caption = empty()  # the script's own tokenization (or encoding) of ""
        replacement = self.empty_caption
        fields = replacement if isinstance(replacement, Mapping) else {key: replacement}
        for name, value in fields.items():
            if name in batch:
                target = batch[name]
                row = torch.as_tensor(value)[0]
                for index, drop in enumerate(dropped):
                    if drop and isinstance(target, list):  # a list of (1, L) rows (dreambooth's attention mask)
                        target[index] = row[None].to(target[index].device, target[index].dtype)
                    elif drop:
                        target[index] = row.to(target.device, target.dtype)

    def drop_embeddings(
        self, epoch: int, embeds: torch.Tensor, pooled: torch.Tensor, empty: Callable[[], Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dropout on precomputed SDXL prompt embeddings (one row per sample): a dropped row gets
        the script's own encoding of ``""`` (embeddings and pooled embedding)."""
        plan = self.bound()
        dropped = [plan.caption_dropped(epoch=epoch) for _ in range(len(embeds))]
        if not any(dropped):
            return embeds, pooled
        if self.empty_caption is None:
            self.empty_caption = empty()
        empty_embeds, empty_pooled = self.empty_caption
        rows = torch.tensor(dropped, device=embeds.device)
        embeds = torch.where(rows[:, None, None], empty_embeds.to(embeds.device, embeds.dtype), embeds)
        return embeds, torch.where(rows[:, None], empty_pooled.to(pooled.device, pooled.dtype), pooled)

    def loss(self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, prior: Any) -> torch.Tensor:
        plan = self.bound()
        if prior is None:
            return plan.loss(model_pred, target, timesteps).mean()
        pred_prior, target_prior, prior_weight = prior
        instance_t, prior_t = timesteps.chunk(2)
        return (
            plan.loss(model_pred, target, instance_t).mean() + prior_weight * plan.loss(pred_prior, target_prior, prior_t).mean()
        )

    def write_audit(self) -> Path | None:
        if self.plan is None or self.output_dir is None or self.written is not None:
            return self.written
        host: dict[str, Any] = {"script": self.script, "version": VERSION, "script_flags": self.flag_states}
        if self.rules:
            host["rules"] = self.rules
        self.written = self.lifecycle.write_audit(self.output_dir, host)
        return self.written
