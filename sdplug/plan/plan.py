"""The plan: a preset's strategies bound to one model's schedule, called by every host.

Every host -- the reference trainer, kohya sd-scripts, a loop of one's own -- calls the same
methods at the same moments of a training step, so a preset behaves the same everywhere::

    plan = preset.build(noise_scheduler, seed=0, rank=rank)   # once
    plan.attention(unet); optimizer = plan.optimizer(params, default=...)
    text = plan.caption(caption, epoch=epoch)                  # per sample, when loaded
    t = plan.timesteps(len(latents), device=latents.device); noise = plan.noise(latents, timesteps=t)
    x_t = plan.noisy_input(latents, noise, t); target = plan.target(latents, noise, t)
    model_pred = plan.prediction(model_output, x_t, t)         # the output as the loss reads it
    loss = plan.loss(model_pred, target, t).mean()             # per-sample, weighted
    plan.step()                                                # once per optimizer step
    plan.write_audit(output_dir, host={"name": ...})           # at the end

The plan owns the random streams (``sdplug.plan.streams``: one per seed, rank and purpose), its
audit, and the learned state of learned strategies; ``state_dict`` holds all three.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sdplug import schedule
from sdplug.errors import PresetError, SdplugError
from sdplug.plan import audit_file, problems
from sdplug.plan.attention import AttentionChoice
from sdplug.plan.audit import Audit
from sdplug.plan.divergence import DivergedRun, DivergenceWatch, optimizer_watch
from sdplug.plan.ema import EMA
from sdplug.plan.optimizer import OptimizerChoice
from sdplug.plan.optimizer_groups import LearnedGroup
from sdplug.plan.pipelines import CaptionDraw, CaptionPipeline, NoiseDraw, NoisePipeline
from sdplug.plan.streams import Streams, stream_seed
from sdplug.preset import Preset, StrategySpec
from sdplug.process import Flow, Process
from sdplug.strategies import registry
from sdplug.strategies.base import LossWeighting, TimestepStrategy
from sdplug.strategies.timesteps import UniformTimesteps

_UNIFORM = UniformTimesteps()


class Plan:
    """A preset's strategies, built and bound to a noise schedule and prediction type: made by
    ``sdplug.plan.bind`` (``Preset.build``), which checks the preset against the schedule first."""

    def __init__(
        self,
        preset: Preset,
        *,
        process: Process,
        seed: int = 0,
        rank: int = 0,
        default_timesteps: TimestepStrategy | None = None,
    ):
        self.preset = preset
        self.streams = Streams(seed, rank)
        self.steps = 0
        self._validating = False
        self.process = process  # DDPM or rectified flow (sdplug.process)
        self.prediction_type = process.prediction_type
        self._loss_space = process.loss_space  # what a weighting converts into (x0 for a sigma-scaled flow output)
        # what every strategy reads: a flow process's is the table of the same SNR (float64)
        self.alphas_cumprod = process.alphas_cumprod.detach().cpu()
        self.num_train_timesteps = process.num_train_timesteps
        self.noise_pipeline = NoisePipeline([spec.create() for spec in preset.noise], self.alphas_cumprod)
        self.caption_pipeline = CaptionPipeline([spec.create() for spec in preset.caption])
        # the host's own draw (kohya's --min/max_timestep range) when the preset names none
        self.timestep_sampler: TimestepStrategy | None = preset.timesteps.create() if preset.timesteps else default_timesteps
        self.loss_weighting: LossWeighting | None = preset.loss_weighting.create() if preset.loss_weighting else None
        self.loss_type = (preset.loss or StrategySpec("loss", "mse", {}, "the default loss type")).create()
        self.optimizer_choice = OptimizerChoice(preset)  # checked on this machine now
        self.attention_choice = AttentionChoice(preset)
        self.failure: str | None = None  # what stopped the host, when something did
        self.ema_average: EMA | None = None  # the moving average ema() keeps (None before it, or without [ema])
        sigmas = getattr(process, "sigmas", None)  # a flow process's: its audit bins sigma
        self.audit = Audit.for_preset(preset, self.num_train_timesteps, optimizer=self.optimizer_spec, sigmas=sigmas)
        if preset.timesteps is None and default_timesteps is not None:  # the audit names the host's own draw
            self.audit.host_default_timesteps = _strategy_name("timesteps", default_timesteps)
        self.divergence = DivergenceWatch()  # non-finite losses and weights, kept on the device (sdplug.plan.divergence)

    def noise(
        self, latents: torch.Tensor, generator: torch.Generator | None = None, *, timesteps: torch.Tensor | None = None
    ) -> NoiseDraw:
        """The step's noise (``.target``, ``.model_input``) from the plan's stream; ``timesteps``: the step's (time-dependent noise)."""
        _check_noise_timesteps(self, latents, timesteps)
        stream = "validation-noise" if self._validating else "noise"
        # what a strategy decides on the host (pyramid's level sizes) from a Python stream: no sync
        host_rng = self.streams.random(stream + "-host") if generator is None else None
        try:
            draw = self.noise_pipeline(
                latents, generator or self.streams.generator(stream, latents.device), host_rng, timesteps=timesteps
            )
        except PresetError as exc:
            raise _in_preset_file(exc, self.preset.noise) from None
        if not self._validating:
            self.audit.record_noise(draw.target, draw.model_input)
        return draw

    @contextlib.contextmanager
    def validation(self) -> Iterator[Plan]:
        """Calls inside draw from streams of their own, unaudited: validation never shifts or counts as training."""
        previous, self._validating = self._validating, True
        try:
            yield self
        finally:
            self._validating = previous

    def matches_schedule(self, alphas_cumprod: torch.Tensor) -> bool:
        """Whether a host's schedule is the one this plan was bound to."""
        return schedule.same_schedule(alphas_cumprod, self.alphas_cumprod)

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
                encoders_dropped=draw.dropped_encoders,
            )
        return draw

    def caption_dropped(self, *, epoch: int = 0, rng: random.Random | None = None) -> bool:
        """The dropout decision alone, for hosts with cached text-encoder outputs: when True,
        the host substitutes the empty caption's embedding (``dropped_encoders``, for a model
        whose preset drops its text encoders one by one)."""
        return self._drop_decisions(epoch, rng)[0]

    def dropped_encoders(self, encoders: Sequence[str], *, epoch: int = 0, rng: random.Random | None = None) -> frozenset[str]:
        """Of the host's text ``encoders``, those whose cached output this sample replaces by
        the empty caption's: all of them when a dropout drops the caption whole, else those the
        dropouts naming them drop. Draws as ``caption_dropped`` does (call one of them per sample)."""
        whole, named = self._drop_decisions(epoch, rng)
        return frozenset(encoders) if whole else named & frozenset(encoders)

    def _drop_decisions(self, epoch: int, rng: random.Random | None) -> tuple[bool, frozenset[str]]:
        stream = "validation-captions" if self._validating else "captions"
        whole, named = self.caption_pipeline.dropped(epoch=epoch, rng=rng or self.streams.random(stream))
        if self.caption_pipeline.transforms and not self._validating:
            self.audit.record_caption(
                dropped=whole,
                drop_probability=self.caption_pipeline.drop_probability(epoch),
                substituted=whole,
                encoders_dropped=named,
            )
        return whole, named

    def deferred_captions(self) -> contextlib.AbstractContextManager[list[dict[str, Any]]]:
        """Caption decisions made inside are held in the list yielded, not counted (a loader that
        fetches ahead, samples that never train); ``count_captions(held)`` counts them."""
        return self.audit.holding_captions()

    def count_captions(self, held: list[dict[str, Any]]) -> None:
        """Count caption decisions held by ``deferred_captions``: their batch trains now."""
        self.audit.count_captions(held)

    @property
    def optimizer_spec(self) -> StrategySpec | None:
        """The preset's optimizer table, or its fallback's when the named one cannot run here."""
        return self.optimizer_choice.spec

    @property
    def built_optimizer(self) -> torch.optim.Optimizer | None:
        """What ``optimizer()`` returned (None before it)."""
        return self.optimizer_choice.built

    def timesteps(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One timestep per sample (uniform over the schedule when the preset names none), drawn
        on the CPU from the plan's ``timesteps`` stream unless ``generator`` is given, then moved
        to ``device``. ``latent_size`` ``(H, W)``: the step's latents, for a flow process that
        shifts by resolution."""
        sampler = self.timestep_sampler or _UNIFORM
        stream = "validation-timesteps" if self._validating else "timesteps"
        generator = generator or self.streams.generator(stream, "cpu")
        if isinstance(self.process, Flow):  # a position along the schedule, mapped by the process
            t = _flow_timesteps(self, sampler, batch_size, generator, latent_size)
            t = t.to(device) if device is not None else t
        else:
            t = sampler(batch_size, self.num_train_timesteps, generator=generator, device=device)
        if not self._validating:
            self.audit.record_timesteps(t)
        return t

    def noisy_input(self, latents: torch.Tensor, noise: NoiseDraw, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from the model-input noise (input perturbation acts here, never on the target)."""
        return self.process.noisy_input(latents, noise.model_input, timesteps)

    def target(self, latents: torch.Tensor, noise: NoiseDraw, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should predict, from the clean target noise."""
        return self.process.target(latents, noise.target, timesteps)

    def prediction(self, model_output: torch.Tensor, noisy_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the loss compares with ``target``: the model's output, read as the process says
        (on a flow whose output is ``sigma_scaled``, the x0 it implies; ``sdplug.process``)."""
        return self.process.prediction(model_output, noisy_input, timesteps)

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The time value the model takes for ``timesteps``: the index on DDPM, ``sigma * 1000``
        on rectified flow (``(1 - sigma) * 1000`` for the reversed convention)."""
        return self.process.model_time(timesteps)

    def loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-sample loss ``(B,)``: the loss type, then the preset's weighting."""
        return self.weight(self.unweighted_loss(model_pred, target, mask, timesteps=timesteps), timesteps)

    def unweighted_loss(
        self,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss type alone, per sample ``(B,)`` in float32: the preset's ``[loss]`` (MSE when it
        names none) elementwise, times ``mask`` (broadcastable to the prediction, 1 = train) with
        the loss type's mask options, then the mean over every non-batch dimension. ``timesteps``
        gives scheduled thresholds (pseudo_huber, smooth_l1) each sample's own ``c_t``."""
        _check_loss_inputs(self, model_pred, target, timesteps)
        loss = self.loss_type.per_sample(model_pred, target, timesteps, self.alphas_cumprod, mask)
        if not self._validating:
            self.audit.record_loss()
            self.divergence.observe_loss(loss, self._training_step())
        return loss

    def elementwise_loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss type of every element (float32), before any mask or mean: for hosts that mask
        and reduce it themselves (kohya's ``apply_masked_loss``), then call ``weight``."""
        _check_loss_inputs(self, model_pred, target, timesteps)
        loss = self.loss_type.elementwise(model_pred.float(), target.float(), timesteps, self.alphas_cumprod)
        if not self._validating:
            self.audit.record_loss()
            self.divergence.observe_loss(loss, self._training_step())
        return loss

    def step(self) -> None:
        """Once per optimizer step: counts the steps the audit compares every strategy's calls with."""
        self.steps += 1
        self.audit.step()

    def weight(self, loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss in, weighted per-sample loss out."""
        if self.loss_weighting is None:
            return loss
        weighted = self.loss_weighting.apply(loss, timesteps, self.alphas_cumprod, self._loss_space)
        if not self._validating:
            self.audit.record_weights(timesteps, self.loss_weighting.weights(timesteps, self.alphas_cumprod, self._loss_space))
            self.divergence.observe_loss(weighted, self._training_step())
        return weighted

    def sample_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """One weight per sample (float32, on ``timesteps``' device) in the loss's space, for hosts
        that multiply their own elementwise loss by it (kohya's and diffusers' flow scripts: ``loss
        * weighting``); recorded in the audit as ``weight`` records it. Ones without a
        ``[loss_weighting]``. A learned weighting is a function of the loss itself, not a factor:
        it is refused here (such hosts call ``weight`` on the per-sample loss)."""
        if self.loss_weighting is None:
            return torch.ones(len(timesteps), device=timesteps.device)
        if self.loss_weighting.parameters():
            named = self.preset.loss_weighting.type if self.preset.loss_weighting is not None else "?"
            raise SdplugError(
                f"{self.preset.path or self.preset.name}: loss_weighting {named!r} learns its "
                "weight from the loss itself, so it is no factor a host can multiply its loss by; this host applies "
                "weights that way. Allowed here: a fixed weighting (min_snr, soft_min_snr, debiased, p2, cosmap, ...)."
            )
        weights = self.loss_weighting.weights(timesteps, self.alphas_cumprod, self._loss_space).float().to(timesteps.device)
        if not self._validating:
            self.audit.record_weights(timesteps, weights)
        return weights

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Show the plan a training loss it did not compute (a host's own loss type and weighting),
        so a run that goes non-finite is caught there too; no device sync."""
        if not self._validating:
            self.divergence.observe_loss(loss, self._training_step())

    def first_nonfinite_step(self) -> int | None:
        """The first training step whose loss or trained weights were non-finite, or None. Reads
        the device: call it where the host already waits for it (logging, saving, the end)."""
        return self.divergence.first_step()

    def stop_if_diverged(self, consequence: str) -> None:
        """Raise ``DivergedRun`` once a loss or the trained weights went non-finite: the step, the
        losses before it and the likely cause, then ``consequence`` (what the host does about it).
        Reads the device, as ``first_nonfinite_step`` does."""
        record = self.divergence.record()
        if record is not None:
            raise DivergedRun(f"{problems.divergence_problem(record, _likely_divergence_cause(self))} {consequence}")

    def _training_step(self) -> int:
        # the optimizer step a loss belongs to, counted the same in every host (hosts call
        # plan.step() at the start or the end of their step); the plan's own count otherwise
        if self.divergence.watching_optimizer:
            return self.divergence.optimizer_steps + 1
        return max(self.steps, 1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Plan:
        """Move every tensor a strategy holds (a learned weighting's parameters and buffers) in
        place, so optimizer references stay valid (``optimizer`` does it for the model's device)."""
        if self.loss_weighting is not None:
            self.loss_weighting.to(device=device, dtype=dtype)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of learned strategies, which the host's optimizer must also train."""
        return self.loss_weighting.parameters() if self.loss_weighting is not None else []

    def ema(self, parameters: Iterable[torch.nn.Parameter]) -> EMA | None:
        """The preset's ``[ema]`` of ``parameters`` (None when it has none): call after
        ``optimizer``; it updates after every step of that optimizer (``sdplug.plan.ema``)."""
        if self.preset.ema.decay is None:
            return None
        if self.built_optimizer is None:
            raise SdplugError("plan.ema: call plan.optimizer first; the average follows the steps of the optimizer it builds.")
        self.ema_average = EMA.following(self.built_optimizer, list(parameters), self.preset.ema)
        return self.ema_average

    def optimizer(
        self,
        params: Iterable[Any],
        default: Callable[[list[Any]], torch.optim.Optimizer] | None = None,
        *,
        host_lr: float | None = None,
        learned_group: LearnedGroup = "own",
    ) -> torch.optim.Optimizer:
        """The preset's optimizer over ``params`` (tensors or parameter groups), or
        ``default(params)`` when the preset names none (``sdplug.plan.optimizer_groups``):

        - the preset's ``lr`` is every group's lr except groups at lr 0; with no ``lr`` in the
          preset, ``host_lr`` (the host's own learning-rate option) when given -- except for an
          optimizer that adapts its own step size (Prodigy, D-Adaptation): its lr is a
          multiplier, the preset's or its default 1.0, for every trained group however the
          host passes its groups;
        - a learned weighting's parameters (and buffers) move to the first trained parameter's
          device and join as a group of their own, or into the first trained group
          (``learned_group="first"``).

        Recorded in the audit; call it once."""
        optimizer = self.optimizer_choice.build(list(params), default, host_lr, learned_group, self.loss_weighting)
        self.watch_optimizer(optimizer)
        return optimizer

    def watch_optimizer(self, optimizer: torch.optim.Optimizer, *, counts_steps: bool = True) -> None:
        """Watch the weights ``optimizer`` trains for non-finite values after each of its steps
        (no sync: ``sdplug.plan.divergence``). ``optimizer()`` does it for what it builds; a host
        whose own optimizer trains (no ``[optimizer]``, built outside the plan) calls it once
        per optimizer, ``counts_steps`` false for all but one when a step steps several."""
        optimizer.register_step_post_hook(optimizer_watch(self.divergence, counts_steps=counts_steps))

    # -- resume and audit ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The random streams, the step count, the audit and any learned strategy state: a run
        resumed from it draws what an uninterrupted run would. Tensors and plain data only."""
        learned = self.loss_weighting.state_dict() if self.loss_weighting is not None else {}
        ema = self.ema_average.state_dict() if self.ema_average is not None else None
        return {
            "streams": self.streams.state_dict(),
            "steps": self.steps,
            "audit": self.audit.state_dict(),
            "learned": learned,
            "ema": ema,
            "divergence": self.divergence.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streams.load_state_dict(state["streams"])
        self.steps = int(state["steps"])
        self.audit.load_state_dict(state["audit"])
        if state["learned"] and self.loss_weighting is not None:
            self.loss_weighting.load_state_dict(state["learned"])
        if state.get("ema") is not None and self.ema_average is not None:
            self.ema_average.load_state_dict(state["ema"])
        self.divergence.load_state_dict(state.get("divergence", {}))

    def record_failure(self, exc: BaseException) -> None:
        """What stopped the host's run: ``report()`` then says the run did not complete, and
        why -- refused before training (an sdplug error before the first step) or stopped."""
        self.failure = problems.failure(exc, self.steps)

    # -- what a host reads of the plan (sdplug.hosts) ------------------------------------------
    @property
    def rank(self) -> int:
        """The process rank the plan was bound to (its audit's file name, its streams)."""
        return self.streams.rank

    def stream_generator(self, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        """The plan's own stream named ``purpose`` (a host's data order, say): drawn from the
        plan's seed and rank, and kept in ``state_dict`` so a resumed run continues it."""
        return self.streams.generator(purpose, device)

    @property
    def training_noise(self) -> NoisePipeline:
        """The preset's noise, callable as ``(latents, generator) -> NoiseDraw`` outside the
        audit: what sampling starts from when it draws the training noise family."""
        return self.noise_pipeline

    def stream_seed(self, purpose: str) -> int:
        """The seed of a host's own stream named ``purpose``, independent of the plan's streams
        and of every other seed, rank and purpose (a host's fixed validation generators)."""
        return stream_seed(self.streams.seed, self.streams.rank, purpose)

    @property
    def optimizer_adapts_step_size(self) -> bool:
        """Whether the optimizer in use (a fallback's, when the plan fell back) estimates its own
        step size (Prodigy, D-Adaptation): its lr is a multiplier near 1.0."""
        return self.optimizer_choice.adapts_step_size

    @property
    def optimizer_is_schedule_free(self) -> bool:
        """Whether the optimizer in use must be switched to its evaluation weights around
        sampling and saving (a schedule-free optimizer)."""
        return self.optimizer_choice.schedule_free

    def preset_lr(self) -> float | None:
        """The lr the preset gives every trained group (``[optimizer]`` lr, or the default
        multiplier of an optimizer that adapts its step size); None: the host's lr stands."""
        return self.optimizer_choice.preset_lr()

    def divergence_record(self) -> dict[str, Any] | None:
        """Where the run first went non-finite (the audit's ``divergence``), or None. Reads the
        device, as ``first_nonfinite_step`` does."""
        return self.divergence.record()

    def record_host(self, **facts: Any) -> None:
        """Facts only the host knows, into the audit's ``host`` section."""
        self.audit.record_host(**facts)

    def extend_host_record(self, section: str, **facts: Any) -> None:
        """Add facts to one entry of the audit's ``host`` section (``ema_files``, ``memory``, ...)."""
        self.audit.extend_host(section, **facts)

    def summary(self) -> str:
        """The report as a short table a person reads at a glance (the end of a run)."""
        return self.audit.summary(self.report())

    def report(self) -> dict[str, Any]:
        """What ``audit.json`` holds for this plan: every family's record, ``completed``, and the
        ``problems`` -- the one policy of every host (``sdplug.plan.problems``)."""
        data = self.audit.records()
        if self.built_optimizer is not None:
            data["optimizer"] = self.optimizer_choice.record(self.loss_weighting)
        # on the CPU: no device sync
        data["schedule"] = {"zero_terminal_snr": self.preset.schedule.zero_terminal_snr, **self.process.record()}
        if self.ema_average is not None:
            data["ema"] = self.ema_average.record()
        diverged = self.divergence.record()
        if diverged is not None:
            data["divergence"] = diverged
        data["completed"] = self.failure is None and diverged is None
        cause = _likely_divergence_cause(self) if diverged is not None else ""
        data["problems"] = problems.problems(self.preset, data, self.failure, cause)
        return data

    def write_audit(
        self,
        output_dir: str | Path,
        host: dict[str, Any] | None = None,
        *,
        audit_name: str | None = None,
        announce: bool = True,
        **sections: Any,
    ) -> Path:
        """Write the report into ``output_dir`` (created if needed): ``audit.json`` on rank 0,
        ``audit-rank<R>.json`` on the others, or ``audit_name``; ``sections`` are added at the
        top level. Problems are also logged (unless ``announce`` is false: the host says why it
        stopped itself). Returns the path."""
        data = self.report()
        data["host"] = {**data.get("host", {}), **(host or {})}
        data.update(sections)
        return audit_file.write(data, Path(output_dir), self.rank, name=audit_name, announce=announce)

    def attention(self, model: torch.nn.Module, install: Callable[[str], dict[str, Any]] | None = None) -> int:
        """Install the preset's attention in ``model`` and record it (``attention`` in the audit:
        the processors before and after, so a change is shown, not claimed). A host whose model
        takes no diffusers processors (kohya's UNet) passes ``install(type) -> record``, which
        switches it the host's way and says what changed (``changed``: a module count).
        Returns the number of modules changed."""
        record = self.attention_choice.install(model, install)
        self.audit.record_host(attention=record)
        return int(record["changed"])


def _strategy_name(family: str, strategy: object) -> str:
    """The name ``strategy``'s class is registered under (its class name when it is not)."""
    chosen = registry(family)
    return next((name for name in chosen.names() if chosen.get(name).cls is type(strategy)), type(strategy).__name__)


def _in_preset_file(exc: PresetError, specs: Sequence[StrategySpec]) -> PresetError:
    """A strategy's refusal that only the step's tensors could reveal (Perlin octaves against the
    latent size), pointed at the file and table that named the strategy."""
    index = getattr(exc, "strategy_index", None)
    if exc.path is not None or index is None or not 0 <= index < len(specs):
        return exc
    spec = specs[index]
    key = f"{spec.key}.{exc.key}" if exc.key else spec.key
    return PresetError(exc.problem, path=spec.path or "<preset>", key=key)


def _check_noise_timesteps(plan: Plan, latents: torch.Tensor, timesteps: torch.Tensor | None) -> None:
    needing = plan.noise_pipeline.timestep_strategies
    if timesteps is None:
        if needing:
            raise SdplugError(
                f"the preset's noise {', '.join(needing)} scales by each sample's timestep: draw the timesteps first "
                "and call plan.noise(latents, timesteps=t)."
            )
        return
    if tuple(timesteps.shape) != (latents.shape[0],):
        raise SdplugError(
            f"plan.noise got timesteps of shape {tuple(timesteps.shape)} for {latents.shape[0]} latents; one per sample."
        )


def _check_loss_inputs(plan: Plan, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor | None) -> None:
    if model_pred.shape != target.shape:
        raise SdplugError(f"plan.loss: the prediction has shape {tuple(model_pred.shape)}, the target {tuple(target.shape)}.")
    if timesteps is None and plan.loss_type.needs_timesteps():
        spec = plan.preset.loss
        raise SdplugError(
            f"plan.loss: loss type {spec.type if spec else 'mse'!r} computes a threshold per sample from "
            "its timestep; pass timesteps= (plan.loss passes them)."
        )


def _likely_divergence_cause(plan: Plan) -> str:
    """What in the preset most likely made the run diverge (``problems.likely_divergence_cause``)."""
    spec, weighting = plan.optimizer_spec, plan.preset.loss_weighting
    weights = None
    if plan.loss_weighting is not None and weighting is not None:
        t = torch.arange(plan.num_train_timesteps)
        weights = plan.loss_weighting.weights(t, plan.alphas_cumprod, plan._loss_space)
    return problems.likely_divergence_cause(
        optimizer=repr(spec.type) if spec is not None else "the host's optimizer",
        learning_rates=plan.optimizer_choice.learning_rates(),
        adapts_step_size=plan.optimizer_adapts_step_size,
        weighting=weighting.type if weighting is not None else None,
        weights=weights,
    )


def _flow_timesteps(
    plan: Plan, sampler: TimestepStrategy, batch_size: int, generator: torch.Generator, latent_size: tuple[int, int] | None
) -> torch.Tensor:
    """The flow process's table indices of the sampler's positions; a dynamic shift's ``mu`` for
    each latent size is recorded once (audit ``timesteps.mu_per_latent_size``)."""
    process = plan.process
    assert isinstance(process, Flow)
    t = process.index(sampler.position(batch_size, plan.num_train_timesteps, generator=generator), latent_size)
    if process.dynamic is not None and latent_size is not None and not plan._validating:
        plan.audit.record_flow_shift(latent_size, process.dynamic.mu(*latent_size))
    return t
