"""The audit: proof, from the run itself, that each strategy of a preset was applied.

The plan feeds it at every call; hosts add what only they know (optimizer state, attention
modules, memory). It is plain data, so it is checkpointed with the run and written as
``audit.json`` plus a summary table.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from sdplug.strategies.families import IN_PRESET_ORDER

if TYPE_CHECKING:
    from sdplug.preset import Preset, StrategySpec
    from sdplug.strategies.base import NoiseStrategy

# The audit's timestep histogram and per-bin loss records: tenths of the schedule (the
# reference trainer's loss bins use the same).
TIMESTEP_BINS = 10


def preset_strategies(preset: Preset, optimizer: StrategySpec | None = None) -> dict[str, list[str]]:
    """The strategy types a preset names, per family, as ``audit.json`` lists them;
    ``optimizer``: the optimizer table in use, when it is not the preset's own (a fallback)."""
    strategies = {family.name: [spec.type for spec in preset.strategy_specs(family.section)] for family in IN_PRESET_ORDER}
    if optimizer is not None:
        strategies["optimizer"] = [optimizer.type]
    return strategies


def _binomial_interval(p: float, n: int, z: float = 3.29) -> tuple[float, float]:
    """99.9% normal-approximation interval of a realised rate with expectation ``p``."""
    if n == 0:
        return (0.0, 1.0)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n) + 0.5 / n
    return (max(0.0, p - half), min(1.0, p + half))


def _rate_check(count: int, n: int, expected: float) -> tuple[float | None, list[float], bool | None]:
    """A realised rate ``count / n``, the 99.9% interval of ``expected`` at ``n``, and whether
    the rate lies in it; no rate (None) when nothing was drawn."""
    low, high = _binomial_interval(expected, n)
    realised = count / n if n else None
    return realised, [low, high], (low <= realised <= high if realised is not None else None)


def _configured_rate(caption: dict[str, Any]) -> float | None:
    """The dropout rate the configuration asks for over the captions drawn: the configured
    probability itself when every caption had the same one (0.3, not 0.29999999999999993), else
    the mean of the probabilities per caption. None when no caption was drawn (0.0 would read as
    "dropout configured off")."""
    samples = caption["samples"]
    if not samples:
        return None
    counts = caption.get("drop_probabilities")
    if not counts or sum(counts.values()) != samples:  # a checkpoint from before the counts
        return caption["expected_drops"] / samples
    if len(counts) == 1:
        return float(next(iter(counts)))
    return math.fsum(float(p) * n for p, n in counts.items()) / samples


class Audit:
    """Counts and realised statistics of every strategy a run used."""

    def __init__(
        self,
        strategies: dict[str, list[str]],
        num_train_timesteps: int,
        tag_dropout_rates: dict[int, float] | None = None,
        noise_strategies: list[NoiseStrategy] | None = None,
        sigmas: torch.Tensor | None = None,
        encoder_drop_rates: dict[str, float] | None = None,
    ):
        # text encoder -> the chance the dropouts naming it drop its output (per-encoder dropout)
        self.encoder_drop_rates = dict(encoder_drop_rates or {})
        self.num_train_timesteps = num_train_timesteps
        # the histograms' bin of every timestep: tenths of the schedule, or of sigma on a flow
        # process, whose shifted sigmas are not linear in the index
        self.binned_by = "t" if sigmas is None else "sigma"
        index = torch.arange(num_train_timesteps)
        self._bins = (
            index * TIMESTEP_BINS // num_train_timesteps
            if sigmas is None
            else (sigmas.detach().double().cpu() * TIMESTEP_BINS).floor().long()
        ).clamp(0, TIMESTEP_BINS - 1)
        self._bins_on: dict[torch.device, torch.Tensor] = {}
        # family -> list of "type" per entry (in order), as the preset names them
        self.strategies = strategies
        self.host_default_timesteps = "uniform"  # what the host draws when the preset names no [timesteps]
        # the noise strategies, asked once per latent size what they do there (Perlin's octaves)
        self.noise_strategies = list(noise_strategies or [])
        self._latent_sizes_seen: set[str] = set()
        # caption-list index of each tag dropout -> its configured per-tag rate
        self.tag_dropout_rates = dict(tag_dropout_rates or {})
        self.data: dict[str, Any] = {
            "steps": 0,
            "noise": {
                "calls": [0] * len(strategies.get("noise", [])),
                "draws": 0,
                "target_std_sum": 0.0,
                "channel_mean_variance_sum": 0.0,
                "gaussian_channel_mean_variance": None,
                "input_minus_target_std_sum": 0.0,
            },
            "timesteps": {"draws": 0, "histogram": [0] * TIMESTEP_BINS},
            "loss": {"calls": 0},
            "loss_weighting": {"calls": 0, "weight_sum": [0.0] * TIMESTEP_BINS, "weight_count": [0] * TIMESTEP_BINS},
            "caption": {
                "calls": [0] * len(strategies.get("caption", [])),
                "samples": 0,
                "dropped": 0,
                "expected_drops": 0.0,
                # samples per configured drop probability (its repr, for JSON): the configured
                # rate reported as configured, not as a float sum (0.1 added 3000 times is not 300)
                "drop_probabilities": {},
                "substituted_embeddings": 0,
                # per tag dropout (caption-list index as a string, for JSON): tags it could
                # drop, tags it dropped, calls whose keep_tokens head did not survive
                "tags": {str(i): {"droppable": 0, "dropped": 0, "head_lost": 0} for i in self.tag_dropout_rates},
            },
            "host": {},
        }
        self._sums: dict[str, torch.Tensor] = {}  # on-device accumulators, see _settle
        self._held: list[dict[str, Any]] | None = None  # caption decisions not counted yet

    @classmethod
    def for_preset(
        cls,
        preset: Preset,
        num_train_timesteps: int,
        *,
        optimizer: StrategySpec | None = None,
        sigmas: torch.Tensor | None = None,
    ) -> Audit:
        """The audit of a run of ``preset``; ``optimizer``: the optimizer table in use (a fallback);
        ``sigmas``: a flow process's (its histograms then bin sigma)."""
        rates = {i: s.create().rate for i, s in enumerate(preset.caption) if s.type == "tag_dropout"}
        noise = [s.create() for s in preset.noise]
        strategies = preset_strategies(preset, optimizer)
        keep: dict[str, float] = {}
        for spec in preset.caption:
            transform = spec.create()
            if not transform.needs_text:
                for name in transform.dropped_encoders():
                    keep[name] = keep.get(name, 1.0) * (1.0 - transform.drop_probability(0))
        # rounded: 1 - (1 - 0.3) is 0.30000000000000004 in floats, and the audit shows what was configured
        encoder_rates = {name: round(1.0 - kept, 12) for name, kept in keep.items()}
        return cls(
            strategies,
            num_train_timesteps,
            tag_dropout_rates=rates,
            noise_strategies=noise,
            sigmas=sigmas,
            encoder_drop_rates=encoder_rates,
        )

    # -- fed by the plan -------------------------------------------------------------------
    # Tensor statistics accumulate as tensors on the device of the tensors measured, and are
    # folded into the plain record (``_settle``) only when it is read: no call made during a
    # training step waits for the device.
    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64).reshape(-1)
        if key in self._sums:
            self._sums[key] += value
        else:
            self._sums[key] = value.clone()

    def _bin_counts(self, timesteps: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        device = timesteps.device
        if device not in self._bins_on:  # once per device: a copy made in a step would not wait, but costs
            self._bins_on[device] = self._bins.to(device)
        bins = self._bins_on[device][timesteps.detach().long().reshape(-1)]
        source = torch.ones_like(bins, dtype=torch.float64) if values is None else values.detach().to(torch.float64).reshape(-1)
        # scatter_add into a fixed-size tensor (bincount would read the maximum back to size its output)
        return torch.zeros(TIMESTEP_BINS, dtype=torch.float64, device=bins.device).scatter_add_(0, bins, source.to(bins.device))

    def record_noise(self, target: torch.Tensor, model_input: torch.Tensor) -> None:
        noise = self.data["noise"]
        noise["calls"] = [c + 1 for c in noise["calls"]]
        noise["draws"] += 1
        if target.dim() >= 2:
            self._record_latent_size(int(target.shape[-2]), int(target.shape[-1]))
        detached = target.detach().float()
        self._add("noise.target_std_sum", detached.std())
        if detached.dim() == 4 and detached.shape[0] * detached.shape[1] > 1:
            # Low-frequency energy: the variance of the per-channel means, unbiased (n - 1), so
            # that for N(0, I) noise its expectation is exactly 1 / (H * W), the reference, at
            # every batch size (the biased estimate reads 3/4 of it with 4 channels at batch 1).
            self._add("noise.channel_mean_variance_sum", detached.mean(dim=(-2, -1)).flatten().var(unbiased=True))
            noise["channel_mean_variance_draws"] = noise.get("channel_mean_variance_draws", 0) + 1
            noise["gaussian_channel_mean_variance"] = 1.0 / (detached.shape[-1] * detached.shape[-2])
        if model_input is not target:
            self._add("noise.input_minus_target_std_sum", (model_input.detach().float() - detached).std())

    def _record_latent_size(self, height: int, width: int) -> None:
        """Each noise strategy's facts for a latent size, once per size (shapes only: no sync)."""
        size = f"{height}x{width}"
        if size in self._latent_sizes_seen:
            return
        self._latent_sizes_seen.add(size)
        for index, strategy in enumerate(self.noise_strategies):
            facts = strategy.audit_facts(height, width)
            if facts:
                self.data["noise"].setdefault("per_latent_size", {}).setdefault(str(index), {})[size] = facts

    def record_timesteps(self, timesteps: torch.Tensor) -> None:
        self.data["timesteps"]["draws"] += timesteps.numel()
        self._add("timesteps.histogram", self._bin_counts(timesteps))

    def record_flow_shift(self, latent_size: tuple[int, int], mu: float) -> None:
        """A dynamic flow shift's ``mu`` at one latent size (plain numbers: no sync)."""
        self.data["timesteps"].setdefault("mu_per_latent_size", {})[f"{latent_size[0]}x{latent_size[1]}"] = mu

    def record_weights(self, timesteps: torch.Tensor, weights: torch.Tensor) -> None:
        self.data["loss_weighting"]["calls"] += 1
        self._add("loss_weighting.weight_sum", self._bin_counts(timesteps, weights))
        self._add("loss_weighting.weight_count", self._bin_counts(timesteps))

    def _settle(self) -> None:
        """Fold the on-device sums into the plain record: one transfer per device, at read time."""
        by_device: dict[torch.device, list[str]] = {}
        for key, value in self._sums.items():
            by_device.setdefault(value.device, []).append(key)
        for keys in by_device.values():
            values = torch.cat([self._sums[k] for k in keys]).tolist()
            for key in keys:
                size = self._sums[key].numel()
                chunk, values = values[:size], values[size:]
                family, name = key.split(".")
                if size == 1:
                    self.data[family][name] += chunk[0]
                else:
                    integral = name in ("histogram", "weight_count")
                    self.data[family][name] = [
                        old + (round(new) if integral else new) for old, new in zip(self.data[family][name], chunk, strict=True)
                    ]
        self._sums = {}

    @contextlib.contextmanager
    def holding_captions(self) -> Iterator[list[dict[str, Any]]]:
        """Caption decisions recorded inside are held in the list yielded (``Plan.deferred_captions``)."""
        previous, self._held = self._held, []
        try:
            yield self._held
        finally:
            self._held = previous

    def count_captions(self, held: list[dict[str, Any]]) -> None:
        for decision in held:
            self.record_caption(**decision)

    def record_caption(
        self,
        *,
        dropped: bool,
        drop_probability: float,
        substituted: bool = False,
        tag_counts: tuple = (),
        encoders_dropped: frozenset[str] = frozenset(),
    ) -> None:
        if self._held is not None:
            self._held.append(
                dict(
                    dropped=dropped,
                    drop_probability=drop_probability,
                    substituted=substituted,
                    tag_counts=tag_counts,
                    encoders_dropped=encoders_dropped,
                )
            )
            return
        record = self.data["caption"]
        record["calls"] = [c + 1 for c in record["calls"]]
        record["samples"] += 1
        record["dropped"] += int(dropped)
        record["expected_drops"] += drop_probability
        counts = record.setdefault("drop_probabilities", {})  # older checkpoints have none
        counts[repr(float(drop_probability))] = counts.get(repr(float(drop_probability)), 0) + 1
        record["substituted_embeddings"] += int(substituted)
        if self.encoder_drop_rates:
            per_encoder = record.setdefault("encoders_dropped", {name: 0 for name in self.encoder_drop_rates})
            for name in encoders_dropped:
                per_encoder[name] += 1
        for index, count in tag_counts:
            tags = record["tags"][str(index)]
            tags["droppable"] += count.droppable
            tags["dropped"] += count.dropped
            tags["head_lost"] += int(not count.kept_head)

    def record_loss(self) -> None:
        self.data.setdefault("loss", {"calls": 0})["calls"] += 1  # older checkpoints have no loss record

    # -- fed by the host -------------------------------------------------------------------
    def record_host(self, **facts: Any) -> None:
        self.data["host"].update(facts)

    def extend_host(self, section: str, **facts: Any) -> None:
        """Add facts to one host section (``memory``, ``attention``, ...) recorded earlier."""
        self.data["host"].setdefault(section, {}).update(facts)

    def step(self) -> None:
        self.data["steps"] += 1

    # -- reading ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return json.loads(json.dumps(self.data))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data = json.loads(json.dumps(state))
        self._sums = {}
        self._latent_sizes_seen = set()  # asked again: the answer is the same

    def records(self) -> dict[str, Any]:
        """Each family's record -- counts and realised statistics -- and the host's facts: the
        part of ``audit.json`` the audit keeps (``Plan.report`` adds the rest)."""
        self._settle()  # the one host-device sync of the audit
        d = self.data
        report: dict[str, Any] = {"steps": d["steps"], "strategies": self.strategies}
        noise = d["noise"]
        if self.strategies.get("noise"):
            draws = max(noise["draws"], 1)
            sizes = noise.get("per_latent_size", {})
            applied = [{"type": t, "calls": c} for t, c in zip(self.strategies["noise"], noise["calls"], strict=True)]
            for index, entry in enumerate(applied):
                if str(index) in sizes:
                    entry["per_latent_size"] = sizes[str(index)]  # e.g. Perlin's octaves really used
            report["noise"] = {
                "applied": applied,
                "target_std_mean": noise["target_std_sum"] / draws,
                "channel_mean_variance_mean": (
                    noise["channel_mean_variance_sum"] / noise["channel_mean_variance_draws"]
                    if noise.get("channel_mean_variance_draws")
                    else None
                ),
                "channel_mean_variance_estimator": "unbiased variance of per-channel means; N(0, I) expects 1/(H*W)",
                "gaussian_channel_mean_variance": noise["gaussian_channel_mean_variance"],
                "input_minus_target_std_mean": noise["input_minus_target_std_sum"] / draws,
            }
        t = d["timesteps"]
        report["timesteps"] = {
            "type": (self.strategies.get("timesteps") or [f"{self.host_default_timesteps} (host default)"])[0],
            "draws": t["draws"],
            "histogram": t["histogram"],
        }
        if self.binned_by == "sigma":
            report["timesteps"]["binned_by"] = "sigma"
        if "mu_per_latent_size" in t:
            report["timesteps"]["mu_per_latent_size"] = dict(t["mu_per_latent_size"])
        if self.strategies.get("loss"):
            report["loss"] = {"type": self.strategies["loss"][0], "calls": d.get("loss", {"calls": 0})["calls"]}
        if self.strategies.get("loss_weighting"):
            w = d["loss_weighting"]
            report["loss_weighting"] = {
                "type": self.strategies["loss_weighting"][0],
                "calls": w["calls"],
                "mean_weight_per_timestep_bin": [
                    s / c if c else None for s, c in zip(w["weight_sum"], w["weight_count"], strict=True)
                ],
                "bin_edges": (
                    [i * self.num_train_timesteps // TIMESTEP_BINS for i in range(TIMESTEP_BINS + 1)]
                    if self.binned_by == "t"
                    else [i / TIMESTEP_BINS for i in range(TIMESTEP_BINS + 1)]
                ),
            }
        if self.strategies.get("caption"):
            c = d["caption"]
            samples = c["samples"]
            expected_rate = _configured_rate(c)
            realised, interval, within = _rate_check(c["dropped"], samples, expected_rate or 0.0)
            report["caption"] = {
                "applied": [{"type": t, "calls": n} for t, n in zip(self.strategies["caption"], c["calls"], strict=True)],
                "samples": samples,
                "dropped": c["dropped"],
                "dropout_rate_realised": realised,
                "dropout_rate_configured": expected_rate,
                "dropout_rate_999_interval": interval,
                "dropout_rate_within_interval": within,
                "empty_caption_embeddings_substituted": c["substituted_embeddings"],
            }
            tag_dropout = []
            for index, tags in sorted(c.get("tags", {}).items(), key=lambda item: int(item[0])):
                rate, n = self.tag_dropout_rates[int(index)], tags["droppable"]
                realised, interval, within = _rate_check(tags["dropped"], n, rate)
                tag_dropout.append(
                    {
                        "caption_index": int(index),
                        "tags_droppable": n,
                        "tags_dropped": tags["dropped"],
                        "tag_drop_rate_realised": realised,
                        "tag_drop_rate_configured": rate,
                        "tag_drop_rate_999_interval": interval,
                        "tag_drop_rate_within_interval": within,
                        "keep_tokens_always_kept": tags["head_lost"] == 0,
                    }
                )
            if tag_dropout:
                report["caption"]["tag_dropout"] = tag_dropout
            encoders = {}
            for name, rate in self.encoder_drop_rates.items():
                count = c.get("encoders_dropped", {}).get(name, 0)
                realised, interval, within = _rate_check(count, samples, rate)
                encoders[name] = {
                    "dropped": count,
                    "dropout_rate_configured": rate,
                    "dropout_rate_realised": realised,
                    "dropout_rate_999_interval": interval,
                    "dropout_rate_within_interval": within,
                }
            if encoders:
                report["caption"]["encoders"] = encoders
        report.update(d["host"])
        return report

    def summary(self, report: dict[str, Any] | None = None) -> str:
        """A short table for the end of a run (``sdplug.plan.audit_table``) of ``report``: pass the
        plan's report (``plan.report()``, what ``audit.json`` holds) for the optimizer, EMA,
        schedule and problems rows; without it, of the audit's own part."""
        from sdplug.plan.audit_table import summary_table

        return summary_table(report if report is not None else self.records())
