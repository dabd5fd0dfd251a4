"""What a patched diffusers training script calls, at the moments every host calls the plan.

Each function takes the script's own value as its last argument and returns it unchanged when
the script runs without ``--sdplug_preset``; with one, it returns the plan's. The session is
one per process (a script trains one model), held in ``_current``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.hosts.diffusers_scripts import flags
from sdplug.hosts.diffusers_scripts.flow_edits import FLOW_SCRIPTS
from sdplug.hosts.diffusers_scripts.flow_session import FlowScriptRun
from sdplug.hosts.diffusers_scripts.script_run import HOST_NAME, ScriptRun
from sdplug.preset import load_preset

__all__ = ["HOST_NAME", "LAUNCHED", "ScriptRun", "activate", "current"]

LAUNCHED = False  # set by the launcher: it records failures and writes the audit itself
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
