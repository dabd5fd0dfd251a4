"""The plan: a preset's strategies bound to one model's schedule, called by every host.

Every host -- the reference trainer, kohya sd-scripts, a loop of one's own -- calls the same
methods at the same moments of a training step, so a preset behaves the same everywhere::

    plan = preset.build(noise_scheduler, seed=0, rank=rank)   # once
    plan.attention(unet); optimizer = plan.optimizer(params, default=...)
    text = plan.caption(caption, epoch=epoch)                  # per sample, when loaded
    noise = plan.noise(latents); t = plan.timesteps(len(latents), device=latents.device)
    x_t = plan.noisy_input(latents, noise, t); target = plan.target(latents, noise, t)
    loss = plan.loss(model_pred, target, t).mean()             # per-sample, weighted
    plan.step()                                                # once per optimizer step
    plan.write_audit(output_dir, host={"name": ...})           # at the end

The plan owns the random streams (``sdplug.streams``: one per seed, rank and purpose), its
audit, and the learned state of learned strategies; ``state_dict`` holds all three.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from sdplug.audit import Audit
from sdplug.errors import PresetError, SdplugError
from sdplug.pipelines import CaptionDraw, CaptionPipeline, NoiseDraw, NoisePipeline
from sdplug.preset_checks import check_against_schedule
from sdplug.presets import Preset, StrategySpec
from sdplug.runs_here import choose_attention, choose_optimizer
from sdplug.schedule import check_prediction_type
from sdplug.strategies.base import LossWeighting, TimestepStrategy
from sdplug.strategies.learned import LearnedWeighting
from sdplug.strategies.timesteps import UniformTimesteps
from sdplug.streams import Streams

__all__ = ["CaptionDraw", "CaptionPipeline", "NoiseDraw", "NoisePipeline", "Plan"]

_UNIFORM = UniformTimesteps()


class Plan:
    """A preset's strategies, built and bound to a noise schedule and prediction type."""

    def __init__(
        self,
        preset: Preset,
        *,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        seed: int = 0,
        rank: int = 0,
        default_timesteps: TimestepStrategy | None = None,
    ):
        self.preset = preset
        self.streams = Streams(seed, rank)
        self.steps = 0
        self._validating = False
        self.prediction_type = check_prediction_type(prediction_type)
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32).cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        check_against_schedule(preset, self.num_train_timesteps)  # file and key, before any training
        self.noise_pipeline = NoisePipeline([spec.create() for spec in preset.noise])
        self.caption_pipeline = CaptionPipeline([spec.create() for spec in preset.caption])
        # the host's own draw (kohya's --min/max_timestep range) when the preset names none
        self.timestep_sampler: TimestepStrategy | None = preset.timesteps.create() if preset.timesteps else default_timesteps
        self.loss_weighting: LossWeighting | None = preset.loss_weighting.create() if preset.loss_weighting else None
        self.optimizer_strategy, self.optimizer_fell_back = choose_optimizer(preset)
        self.attention_strategy = choose_attention(preset)
        self.audit = Audit(
            {
                "noise": [s.type for s in preset.noise],
                "caption": [s.type for s in preset.caption],
                "timesteps": [preset.timesteps.type] if preset.timesteps else [],
                "loss_weighting": [preset.loss_weighting.type] if preset.loss_weighting else [],
                "optimizer": [spec.type] if (spec := self._optimizer_spec()) is not None else [],
                "attention": [preset.attention.type] if preset.attention else [],
            },
            self.num_train_timesteps,
            tag_dropout_rates={i: s.create().rate for i, s in enumerate(preset.caption) if s.type == "tag_dropout"},
        )

    def noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoiseDraw:
        """The step's noise: ``target`` for the loss, ``model_input`` for ``x_t``; drawn from the
        plan's ``noise`` stream on the latents' device unless ``generator`` is given."""
        stream = "validation-noise" if self._validating else "noise"
        draw = self.noise_pipeline(latents, generator or self.streams.generator(stream, latents.device))
        if not self._validating:
            self.audit.record_noise(draw.target, draw.model_input)
        return draw

    @contextlib.contextmanager
    def validation(self) -> Iterator[Plan]:
        """Calls inside draw from streams of their own and are not audited: a validation pass
        neither shifts the training draws nor counts as training."""
        previous, self._validating = self._validating, True
        try:
            yield self
        finally:
            self._validating = previous

    def matches_schedule(self, alphas_cumprod: torch.Tensor) -> bool:
        """Whether a host's schedule is the one this plan was bound to."""
        theirs = alphas_cumprod.detach().float().cpu()
        return theirs.shape == self.alphas_cumprod.shape and bool(torch.allclose(theirs, self.alphas_cumprod, atol=1e-5))

    def caption(self, caption: str, *, epoch: int = 0, rng: random.Random | None = None) -> CaptionDraw:
        """One caption through the transforms (call once per sample, when it is loaded): the new
        text, a ``str`` that also tells ``.dropped``. Draws from the plan's ``captions`` stream
        unless ``rng`` is given."""
        stream = "validation-captions" if self._validating else "captions"
        draw = self.caption_pipeline(caption, epoch=epoch, rng=rng or self.streams.random(stream))
        if self.caption_pipeline.transforms and not self._validating:
            self.audit.record_caption(
                dropped=draw.dropped,
                drop_probability=self.caption_pipeline.drop_probability(epoch),
                tag_counts=draw.tag_counts,
            )
        return draw

    def caption_dropped(self, *, epoch: int = 0, rng: random.Random | None = None) -> bool:
        """The dropout decision alone, for hosts with cached text-encoder outputs: when True,
        the host substitutes the empty caption's embedding."""
        dropped = self.caption_pipeline.dropped(epoch=epoch, rng=rng or self.streams.random("captions"))
        if self.caption_pipeline.transforms:
            self.audit.record_caption(
                dropped=dropped, drop_probability=self.caption_pipeline.drop_probability(epoch), substituted=dropped
            )
        return dropped

    def _optimizer_spec(self) -> StrategySpec | None:
        """The preset's optimizer table, or its fallback's when the plan had to use it."""
        return self.preset.optimizer_fallback if self.optimizer_fell_back else self.preset.optimizer

    def timesteps(
        self, batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """One timestep per sample (uniform over the schedule when the preset names none), drawn
        on the CPU from the plan's ``timesteps`` stream unless ``generator`` is given, then moved
        to ``device``."""
        sampler = self.timestep_sampler or _UNIFORM
        stream = "validation-timesteps" if self._validating else "timesteps"
        generator = generator or self.streams.generator(stream, "cpu")
        t = sampler(batch_size, self.num_train_timesteps, generator=generator, device=device)
        if not self._validating:
            self.audit.record_timesteps(t)
        return t

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype)
        shape = (-1, *([1] * (like.dim() - 1)))
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def noisy_input(self, latents: torch.Tensor, noise: NoiseDraw, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from the model-input noise (input perturbation acts here, never on the target)."""
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise.model_input

    def target(self, latents: torch.Tensor, noise: NoiseDraw, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should predict, from the clean target noise."""
        if self.prediction_type == "epsilon":
            return noise.target
        if self.prediction_type == "sample":
            return latents
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * noise.target - sigma * latents

    def loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-sample loss ``(B,)``: the loss type, then the preset's weighting."""
        return self.weight(self.unweighted_loss(model_pred, target, mask), timesteps)

    def unweighted_loss(self, model_pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss type alone, per sample ``(B,)``: MSE in float32, the mean over every non-batch
        dimension. ``mask`` is reserved for masked loss."""
        if mask is not None:
            raise SdplugError("plan.loss(mask=...): masked loss is not available in this sdplug version.")
        if model_pred.shape != target.shape:
            raise SdplugError(f"plan.loss: the prediction has shape {tuple(model_pred.shape)}, the target {tuple(target.shape)}.")
        return F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.dim())))

    def step(self) -> None:
        """Once per optimizer step: counts the steps the audit compares every strategy's calls with."""
        self.steps += 1
        self.audit.step()

    def weight(self, loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss in, weighted per-sample loss out."""
        if self.loss_weighting is None:
            return loss
        if not self._validating:
            self.audit.record_weights(
                timesteps, self.loss_weighting.weights(timesteps, self.alphas_cumprod, self.prediction_type)
            )
        return self.loss_weighting.apply(loss, timesteps, self.alphas_cumprod, self.prediction_type)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Plan:
        """Move every tensor a strategy holds (a learned weighting's parameters and buffers) in
        place, so optimizer references stay valid. Hosts call this once, before building the
        optimizer, with the training device."""
        if self.loss_weighting is not None:
            self.loss_weighting.to(device=device, dtype=dtype)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of learned strategies, which the host's optimizer must also train."""
        return self.loss_weighting.parameters() if self.loss_weighting is not None else []

    def optimizer(
        self,
        params: Iterable[Any],
        default: Callable[[list[Any]], torch.optim.Optimizer] | None = None,
    ) -> torch.optim.Optimizer:
        """The preset's optimizer over ``params`` (tensors or parameter groups), or
        ``default(groups)`` when the preset names none. A learned weighting's parameters join
        as a group of their own, so they train with the model."""
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        learned = self.trainable_parameters()
        if learned:
            groups = [*groups, {"params": learned}]
        if self.optimizer_strategy is None:
            if default is None:
                raise SdplugError("the preset names no optimizer and the host gave no default= to use instead.")
            return default(groups)
        return self.optimizer_strategy.build(groups)

    # -- resume and audit ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The random streams, the step count, the audit and any learned strategy state: a run
        resumed from it draws what an uninterrupted run would. Tensors and plain data only."""
        learned = (
            {k: v.detach().cpu() for k, v in self._learned_network().state_dict().items()} if self.trainable_parameters() else {}
        )
        return {"streams": self.streams.state_dict(), "steps": self.steps, "audit": self.audit.state_dict(), "learned": learned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streams.load_state_dict(state["streams"])
        self.steps = int(state["steps"])
        self.audit.load_state_dict(state["audit"])
        if state["learned"]:
            network = self._learned_network()
            with torch.no_grad():
                for key, value in network.state_dict().items():
                    value.copy_(state["learned"][key].to(value.device, value.dtype))

    def _learned_network(self) -> torch.nn.Module:
        # Learned state lives in the learned weighting's network; only LearnedWeighting has
        # parameters, and callers ask only when trainable_parameters() is not empty.
        return cast(LearnedWeighting, self.loss_weighting).network

    def report(self) -> dict[str, Any]:
        """What ``audit.json`` holds for this plan, with the problems found."""
        report = self.audit.report()
        report["problems"] = self.audit.problems()
        return report

    def write_audit(self, output_dir: str | Path, host: dict[str, Any] | None = None) -> Path:
        """Write ``audit.json`` into ``output_dir`` (created if needed); returns its path."""
        report = self.report()
        report["host"] = {**report.get("host", {}), **(host or {})}
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        path = output / "audit.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        return path

    def attention(self, model: torch.nn.Module) -> int:
        """Install the preset's attention in ``model``; the number of modules changed."""
        if self.attention_strategy is None:
            return 0
        try:
            return self.attention_strategy.apply(model)
        except PresetError as exc:
            if exc.path is not None:
                raise
            # a parameter that only the model can judge (sliced slice_size against its heads):
            # the strategy knows the key, the plan knows the file
            spec = self.preset.attention  # not None: it made attention_strategy
            raise PresetError(exc.problem, path=(spec.path if spec else None) or self.preset.path, key=exc.key) from None
