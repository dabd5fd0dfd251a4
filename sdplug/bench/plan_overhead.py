"""Per-step cost of the plan's calls against the same step hand-written, side by side.

Run: ``sdplug bench plan-overhead [--preset NAME] [--quick]`` (or ``python -m
sdplug.bench.plan_overhead``). Two sides train the embedded tiny model, interleaved round by
round on one thread:

  plan: the step through ``plan.caption / noise / timesteps / noisy_input / target / loss /
    step`` (the audit on), as README's "Your own training loop".
  hand: the same maths with no plan and no audit: the preset's strategy objects called
    directly with a ``torch.Generator`` / ``random.Random``, ``sqrt(a) x0 + sqrt(1-a) eps``, the
    target of the prediction type, per-sample MSE times the weighting's ``weights(...)``.

Fairness: each side has its own copy of the model, both built from the same seed, and its own
torch AdamW (the preset's optimizer is replaced on both sides, so only the plan calls differ).
The hand side seeds its generators with the plan's stream seeds, so both sides draw the same
noise, timesteps and caption decisions and follow the same trajectory: every step does the
same arithmetic on the same values, and the first step's losses must agree (checked). One
model alternated between the sides would not do: two optimizers would fight over its weights
and the two sides would no longer start a step from the same values. Which side runs first
alternates every round, and a round's two times form one ratio, so machine load cancels out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import sdplug
from sdplug.errors import SdplugError
from sdplug.plan import bind
from sdplug.plan.streams import stream_seed
from sdplug.preset import Preset
from sdplug.preset.settings import MemorySettings

PLAN_CALLS = ("caption", "noise", "timesteps", "noisy_input", "target", "loss", "step")
LR, WEIGHT_DECAY = 1e-3, 1e-2
RTOL = 1e-5
DEFAULTS = {"steps": 5, "rounds": 15, "batch_size": 8}  # short rounds: a pair sees the same load
QUICK = {"steps": 3, "rounds": 3, "batch_size": 4}


class _Clock:
    """Seconds spent inside the wrapped methods of one side (reset every round)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, obj: object, names: tuple[str, ...]) -> None:
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _create(spec):
    """A preset table's strategy through the public factory, as a loop without a plan makes it."""
    return sdplug.create(spec.family, spec.type, **dict(spec.params))


class HandWritten:
    """The plan's per-step maths written out, with the same method names so one step loop
    drives both sides; no plan, no pipelines, no audit."""

    def __init__(self, preset: Preset, scheduler, *, seed: int, rank: int = 0):
        make = _create
        self.noise_strategies = [make(spec) for spec in preset.noise]
        self.captions = [make(spec) for spec in preset.caption]
        self.sampler = make(preset.timesteps) if preset.timesteps else sdplug.create("timesteps", "uniform")
        self.weighting = make(preset.loss_weighting) if preset.loss_weighting else None
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).detach().to(torch.float32).cpu()
        self.prediction_type = scheduler.config.prediction_type
        # the plan's stream seeds: the same draws as the plan, so the two sides can be compared
        self.noise_generator = torch.Generator().manual_seed(stream_seed(seed, rank, "noise"))
        self.timestep_generator = torch.Generator().manual_seed(stream_seed(seed, rank, "timesteps"))
        self.caption_rng = random.Random(stream_seed(seed, rank, "captions"))
        self.noise_host_rng = random.Random(stream_seed(seed, rank, "noise-host"))  # pyramid's level sizes

    def caption(self, text: str, *, epoch: int = 0) -> str:
        for transform in self.captions:
            decide = getattr(transform, "decide", None)
            if decide is not None:
                text = "" if decide(epoch=epoch, rng=self.caption_rng) else text
            else:
                text = transform(text, epoch=epoch, rng=self.caption_rng)
        return text

    def noise(self, latents: torch.Tensor, timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        target = None
        for strategy in self.noise_strategies:
            if strategy.role == "target" and strategy.uses_timesteps:
                target = strategy.transform(
                    target, latents, self.noise_generator, timesteps=timesteps, alphas_cumprod=self.alphas_cumprod
                )
            elif strategy.role == "target" and strategy.uses_host_rng:
                target = strategy.transform(target, latents, self.noise_generator, host_rng=self.noise_host_rng)
            elif strategy.role == "target":
                target = strategy.transform(target, latents, self.noise_generator)
        if target is None:
            target = torch.randn(latents.shape, generator=self.noise_generator, dtype=latents.dtype)
        model_input = target
        for strategy in self.noise_strategies:
            if strategy.role == "input":
                model_input = strategy.transform(model_input, latents, self.noise_generator)
        return target, model_input

    def timesteps(self, batch_size: int, *, device=None) -> torch.Tensor:
        return self.sampler(batch_size, len(self.alphas_cumprod), generator=self.timestep_generator, device=device)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def noisy_input(self, latents: torch.Tensor, noise, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(t, latents)
        return signal * latents + sigma * noise[1]

    def target(self, latents: torch.Tensor, noise, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise[0]
        if self.prediction_type == "sample":
            return latents
        signal, sigma = self._coefficients(t, latents)
        return signal * noise[0] - sigma * latents

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.dim())))
        if self.weighting is None:
            return per_sample
        return per_sample * self.weighting.weights(t, self.alphas_cumprod, self.prediction_type).to(per_sample)

    def step(self) -> None:
        """Nothing to count: there is no audit on this side."""


class _Side:
    """One side: its model copy, optimizer, step maker (plan or hand), clock and losses."""

    def __init__(self, name: str, calls, model, clock: _Clock):
        self.name, self.calls, self.model, self.clock = name, calls, model, clock
        self.optimizer = torch.optim.AdamW(model.unet.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.losses: list[float] = []

    def train_step(self, latents: torch.Tensor, captions: list[str]) -> None:
        """README's loop, verbatim in shape, for either side."""
        calls, model = self.calls, self.model
        texts = [calls.caption(c, epoch=0) for c in captions]
        tokens = model.tokenizer(texts, padding="max_length", max_length=model.tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model.text_encoder(tokens.input_ids)[0]
        t = calls.timesteps(len(latents), device=latents.device)
        noise = calls.noise(latents, timesteps=t)
        prediction = model.unet(calls.noisy_input(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = calls.loss(prediction, calls.target(latents, noise, t), t).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        calls.step()
        self.losses.append(loss.item())


@dataclasses.dataclass
class Result:
    preset: str
    steps: int
    rounds: int
    batch_size: int
    threads: int
    warmup_rounds: int
    notes: list[str]
    plan_step: list[float]  # per round: seconds per step
    hand_step: list[float]
    plan_inside: list[float]  # per round: seconds per step inside the plan calls
    hand_inside: list[float]  # per round: seconds per step inside the hand-written counterparts
    plan_losses: list[float]
    hand_losses: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(p / h for p, h in zip(self.plan_step, self.hand_step, strict=True))

    @property
    def overhead(self) -> float:
        return statistics.median((p - h) / h for p, h in zip(self.plan_step, self.hand_step, strict=True))

    @property
    def plan_calls_fraction(self) -> float:
        return statistics.median(i / s for i, s in zip(self.plan_inside, self.plan_step, strict=True))

    @property
    def hand_calls_fraction(self) -> float:
        return statistics.median(i / s for i, s in zip(self.hand_inside, self.hand_step, strict=True))

    @property
    def calls_overhead(self) -> float:
        """The plan calls' extra time over their hand-written counterparts, per hand step."""
        return statistics.median((p - h) / s for p, h, s in zip(self.plan_inside, self.hand_inside, self.hand_step, strict=True))

    @property
    def first_loss_difference(self) -> float:
        plan, hand = self.plan_losses[0], self.hand_losses[0]
        return abs(plan - hand) / max(abs(hand), 1e-30)

    @property
    def max_loss_difference(self) -> float:
        return max(abs(p - h) / max(abs(h), 1e-30) for p, h in zip(self.plan_losses, self.hand_losses, strict=True))


def _bench_preset(reference: str) -> tuple[Preset, list[str]]:
    """The preset with the parts that are not per-step plan calls set aside, and what was."""
    preset = sdplug.load_preset(reference)
    if preset.loss_weighting is not None and preset.loss_weighting.create().learnable:
        raise SdplugError(
            f"{preset.path}: loss_weighting type {preset.loss_weighting.type!r} is learned; this bench compares "
            "fixed maths on two model copies and has no hand-written twin of a learned weighting. "
            "Allowed: a preset whose loss_weighting is a fixed one (min_snr, ...) or none."
        )
    named = f"in place of the preset's {preset.optimizer.type!r}" if preset.optimizer else "(the preset names none)"
    notes = [f"optimizer: torch AdamW (lr {LR}, weight decay {WEIGHT_DECAY}) on both sides, {named}"]
    if preset.memory != MemorySettings():
        notes.append(f"[memory] {dataclasses.asdict(preset.memory)} not applied: host settings, not plan calls")
    attention = preset.attention.type if preset.attention else "the model's default"
    notes.append(f"attention: {attention} on both sides")
    return dataclasses.replace(preset, optimizer=None, optimizer_fallback=None), notes


def _batches(count: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, list[str]]]:
    from sdplug.trainer.synthetic import BACKGROUNDS, COLOURS, SHAPES, caption_for, draw

    kinds, rng = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS], random.Random(seed)
    batches = []
    for _ in range(count):
        batch = [rng.choice(kinds) for _ in range(batch_size)]
        images = torch.stack([torch.from_numpy(np.array(draw(*k, 32, rng))).permute(2, 0, 1) for k in batch])
        batches.append((images.float() / 127.5 - 1, [caption_for(*k) for k in batch]))
    return batches


def measure(
    preset: str = "tiny-default",
    *,
    steps: int = DEFAULTS["steps"],
    rounds: int = DEFAULTS["rounds"],
    batch_size: int = DEFAULTS["batch_size"],
    threads: int = 1,
    warmup_rounds: int = 1,
    seed: int = 0,
    prediction_type: str = "epsilon",
) -> Result:
    """Time ``rounds`` interleaved rounds of ``steps`` steps per side (after ``warmup_rounds``)."""
    from sdplug.trainer.models import embedded

    for name, value in (("steps", steps), ("rounds", rounds), ("batch_size", batch_size), ("threads", threads)):
        if value < 1:
            raise SdplugError(f"bench plan-overhead: --{name.replace('_', '-')} is {value}; allowed: 1 or more.")
    torch.set_num_threads(threads)
    bench_preset, notes = _bench_preset(preset)
    plan_model, hand_model = (
        embedded(seed=seed, prediction_type=prediction_type),
        embedded(seed=seed, prediction_type=prediction_type),
    )
    plan = bind(bench_preset, plan_model.scheduler, seed=seed, rank=0)
    plan.attention(plan_model.unet)
    if bench_preset.attention is not None:
        bench_preset.attention.create().apply(hand_model.unet)
    hand = HandWritten(bench_preset, hand_model.scheduler, seed=seed)
    sides = []
    for name, calls, model in (("plan", plan, plan_model), ("hand", hand, hand_model)):
        clock = _Clock()
        clock.wrap(calls, PLAN_CALLS)
        sides.append(_Side(name, calls, model, clock))
    batches = _batches(steps, batch_size, seed)
    timings: dict[str, dict[str, list[float]]] = {s.name: {"step": [], "inside": []} for s in sides}
    for round_index in range(warmup_rounds + rounds):
        order = sides if round_index % 2 == 0 else sides[::-1]
        for side in order:
            side.clock.seconds = 0.0
            start = time.perf_counter()
            for latents, captions in batches:
                side.train_step(latents, captions)
            elapsed = time.perf_counter() - start
            if round_index >= warmup_rounds:
                timings[side.name]["step"].append(elapsed / steps)
                timings[side.name]["inside"].append(side.clock.seconds / steps)
    return Result(
        preset=bench_preset.name,
        steps=steps,
        rounds=rounds,
        batch_size=batch_size,
        threads=threads,
        warmup_rounds=warmup_rounds,
        notes=notes,
        plan_step=timings["plan"]["step"],
        hand_step=timings["hand"]["step"],
        plan_inside=timings["plan"]["inside"],
        hand_inside=timings["hand"]["inside"],
        plan_losses=sides[0].losses,
        hand_losses=sides[1].losses,
    )


def result_table(result: Result) -> str:
    r = result
    agree = "agree" if r.first_loss_difference <= RTOL else "DISAGREE"
    lines = [
        f"plan calls vs the same step hand-written: embedded tiny model (32x32 pixel space), preset {r.preset}, CPU, "
        f"{r.threads} thread(s)",
        f"batch {r.batch_size}; {r.rounds} rounds x {r.steps} steps per side, interleaved (first side alternates), "
        f"after {r.warmup_rounds} warm-up round(s); medians over rounds",
        *(f"  {note}" for note in r.notes),
        f"first-step loss: plan {r.plan_losses[0]:.9g}, hand {r.hand_losses[0]:.9g} "
        f"(relative difference {r.first_loss_difference:.1e}: {agree} within rtol {RTOL:g})",
        f"largest relative loss difference over all {len(r.plan_losses)} steps: {r.max_loss_difference:.1e}",
        "",
        f"  step time, through the plan              {1e3 * statistics.median(r.plan_step):9.2f} ms",
        f"  step time, hand-written                  {1e3 * statistics.median(r.hand_step):9.2f} ms",
        f"  step time ratio plan / hand              {r.ratio:9.4f}x",
        f"  overhead (t_plan - t_hand) / t_hand      {100 * r.overhead:+9.2f} %",
        f"  plan calls alone / plan step             {100 * r.plan_calls_fraction:9.2f} %",
        f"  hand-written counterparts / hand step    {100 * r.hand_calls_fraction:9.2f} %",
        f"  (plan calls - counterparts) / hand step  {100 * r.calls_overhead:+9.2f} %",
    ]
    return "\n".join(lines)


def main(
    preset: str = "tiny-default",
    *,
    steps: int | None = None,
    rounds: int | None = None,
    batch_size: int | None = None,
    threads: int = 1,
    quick: bool = False,
) -> int:
    base = QUICK if quick else DEFAULTS
    result = measure(
        preset,
        steps=base["steps"] if steps is None else steps,
        rounds=base["rounds"] if rounds is None else rounds,
        batch_size=base["batch_size"] if batch_size is None else batch_size,
        threads=threads,
    )
    print(result_table(result))
    figures = (result.ratio, result.plan_calls_fraction, result.hand_calls_fraction)
    if result.first_loss_difference > RTOL or not all(math.isfinite(f) for f in figures):
        print("\nFAILED: the two sides do not compute the same step; the timings compare different maths.")
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-default")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    raise SystemExit(main(a.preset, steps=a.steps, rounds=a.rounds, batch_size=a.batch_size, threads=a.threads, quick=a.quick))
