"""What a patched diffusers training script calls, at the moments every host calls the plan.

Each function takes the script's own value as its last argument and returns it unchanged when
the script runs without ``--sdplug_preset``; with one, it returns the plan's. The session is
one per process (a script trains one model), held in ``_current``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.hosts.diffusers_scripts import flags
from sdplug.hosts.diffusers_scripts.edits import VERSION
from sdplug.hosts.diffusers_scripts.flow_edits import FLOW_SCRIPTS
from sdplug.hosts.lifecycle import HostLifecycle
from sdplug.log import logger
from sdplug.plan import Plan
from sdplug.plan import bind as bind_plan
from sdplug.plan.pipelines import NoiseDraw
from sdplug.preset import Preset, load_preset

HOST_NAME = "diffusers examples"
LAUNCHED = False  # set by the launcher: it records failures and writes the audit itself


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


_current: ScriptRun | None = None


def current() -> ScriptRun | None:
    return _current


def activate(args: Any, parser: Any, script: str) -> None:
    """After the script parsed its arguments: with ``--sdplug_preset``, check the flags against the
    preset (before any model loads) and start the session."""
    global _current
    path = getattr(args, "sdplug_preset", None)
    if not path:
        return
    preset = load_preset(path)
    stood = flags.check(preset, script, args, parser)
    if script in FLOW_SCRIPTS:
        from sdplug.hosts.diffusers_scripts.flow_session import FlowScriptRun  # it builds on ScriptRun

        _current = FlowScriptRun(preset, script, args, stood)
    else:
        _current = ScriptRun(preset, script, args, stood)
    if not LAUNCHED:  # the patched script started directly: the audit also when it stops
        _current.lifecycle.watch(at_exit=_write_at_exit)


def record_failure(exc: BaseException) -> bool:
    """What stopped the run, for the audit; False when no plan was bound yet."""
    return _current is not None and _current.lifecycle.record_failure(exc)


def _write_at_exit() -> None:
    if _current is not None:
        _current.write_audit()


def bind(noise_scheduler: Any, args: Any) -> None:
    if _current is not None:
        _current.bind(noise_scheduler, args)


def attention(unet: torch.nn.Module) -> None:
    if _current is not None:
        _current.bound().attention(unet)


def optimizer(host_optimizer: torch.optim.Optimizer, args: Any) -> torch.optim.Optimizer:
    return host_optimizer if _current is None else _current.optimizer(host_optimizer, args)


def noise_and_timesteps(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (noise, timesteps) if _current is None else _current.noise_and_timesteps(latents, noise, timesteps)


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, host_noisy: torch.Tensor) -> torch.Tensor:
    if _current is None or not _current.draws_noise or _current.draw is None:
        return host_noisy
    return _current.bound().noisy_input(latents, _current.draw, timesteps).to(host_noisy.dtype)


def target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, host_target: torch.Tensor) -> torch.Tensor:
    if _current is None or _current.draw is None:
        return host_target
    return _current.bound().target(latents, _current.draw, timesteps).to(host_target.dtype)


def drop_captions(batch: dict[str, Any], epoch: int, empty: Callable[[], Any], key: str = "input_ids") -> None:
    if _current is not None:
        _current.drop_captions(batch, epoch, empty, key)


def drop_embeddings(
    epoch: int, embeds: torch.Tensor, pooled: torch.Tensor, repeat: int, empty: Callable[[], Any]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """train_dreambooth_lora_sdxl.py's precomputed prompt embeddings with caption dropout: its rows
    repeated as its step would (``repeat``), then dropped per sample; returns them and the repeat
    left to apply (1). Unchanged without a preset caption dropout."""
    if _current is None or not _current.preset.caption:
        return embeds, pooled, repeat
    per_sample = _current.drop_embeddings(epoch, embeds.repeat(repeat, 1, 1), pooled.repeat(repeat, 1), empty)
    return (*per_sample, 1)


def loss(
    model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, host_loss: torch.Tensor, prior: Any = None
) -> torch.Tensor:
    return host_loss if _current is None else _current.loss(model_pred, target, timesteps, prior)


def bind_flow(noise_scheduler: Any, args: Any) -> None:
    if _current is not None:
        _flow().bind_flow(noise_scheduler, args)


def flow_draw(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor, noisy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flow script's noise, timesteps, sigmas and noisy input: the plan's (the script's own without a preset)."""
    return (noise, timesteps, sigmas, noisy) if _current is None else _flow().flow_draw(latents, noise, timesteps, sigmas, noisy)


def flow_weighting(host_weighting: torch.Tensor) -> torch.Tensor:
    return host_weighting if _current is None else _flow().flow_weighting(host_weighting)


def flow_loss(model_pred: torch.Tensor, target: torch.Tensor, host_loss: torch.Tensor, prior: Any = None) -> torch.Tensor:
    return host_loss if _current is None else _flow().flow_loss(model_pred, target, prior)


def drop_rows(epoch: int, samples: int, rows: Any, empty: Callable[[], Any]) -> Any:
    return None if _current is None else _flow().drop_rows(epoch, samples, rows, empty)


def drop_encoder_rows(epoch: int, samples: int, rows: Mapping[str, torch.Tensor], empty: Callable[[], Any]) -> tuple:
    return tuple(rows.values()) if _current is None else _flow().drop_encoder_rows(epoch, samples, rows, empty)


def encode_empty_caption(encode: Callable[[], Any]) -> None:
    if _current is not None:
        _flow().encode_empty_caption(encode)


def drop_caption_rows(epoch: int, samples: int, rows: tuple) -> tuple:
    return rows if _current is None else _flow().drop_caption_rows(epoch, samples, rows)


def drop_caption_pairs(epoch: int, pairs: list) -> list:
    return pairs if _current is None else _flow().drop_caption_pairs(epoch, pairs)


def drop_caption_list(epoch: int, samples: int, entries: list) -> list:
    return entries if _current is None else _flow().drop_caption_list(epoch, samples, entries)


def drop_sd3_encoders(
    epoch: int, samples: int, embeds: torch.Tensor, pooled: torch.Tensor, t5_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return (embeds, pooled) if _current is None else _flow().drop_sd3_encoders(epoch, samples, embeds, pooled, t5_tokens)


def _flow() -> Any:
    """The flow session (the patch calls these only from a flow script's step)."""
    if _current is None or not hasattr(_current, "flow_draw"):
        raise SdplugError("a flow script's step called sdplug's flow hooks in a run that is not a flow script's.")
    return _current


def step() -> None:
    if _current is not None:
        _current.bound().step()


def finish(output_dir: str) -> None:
    if _current is not None:
        _current.output_dir = output_dir
        _current.write_audit()
