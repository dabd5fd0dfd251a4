"""The flow benches' shared run: variants of one strategy family train the same tiny
class-conditional UNet as a rectified flow, and are scored alike (``flow-samplers``,
``flow-weightings``).

Each variant trains for the same steps, data order and seeds through the plan (velocity
prediction, 1000 unshifted sigmas, the model's time ``sigma * 1000``). The EMA weights draw fixed
samples (one N(0, I) start, the flow Euler sampler) every few steps, scored against held-out
data by the kernel MMD on a small classifier's features, as ``min-snr`` scores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from sdplug.bench import common, metrics, plots, toy

FULL = {"steps": 480, "every": 48, "train_images": 3000, "per_class": 8, "sampler_steps": 20, "classifier_steps": 1000}
QUICK = {"steps": 24, "every": 8, "train_images": 600, "per_class": 2, "sampler_steps": 6, "classifier_steps": 60}


@dataclasses.dataclass(frozen=True)
class Study:
    """One flow bench: the preset section it varies, its variants, and how it reads the result."""

    name: str  # the bench's name, and its plot's prefix
    title: str
    claim: str
    section: str  # the preset section the variants set (e.g. "timesteps")
    variants: dict[str, dict | None]  # label -> that section's table (None: the plan's default)
    column: str  # the headline's first column
    verdict: Callable[[dict, dict], list[str]]  # (figures, cfg) -> the verdict's lines


def run(study: Study, options: common.Options) -> common.Report:
    cfg = QUICK if options.quick else FULL
    progress = common.Progress(
        cfg["classifier_steps"] // 10 + len(study.variants) * options.seeds * cfg["steps"], study.name, options.progress
    )
    judge = toy.shapes_judge(cfg["train_images"], cfg["classifier_steps"], progress.tick)
    data, classifier, scorer, classifier_accuracy = judge.data, judge.classifier, judge.scorer, judge.classifier_accuracy
    labels = torch.arange(len(data.names)).repeat_interleave(cfg["per_class"])
    checkpoints = list(range(cfg["every"], cfg["steps"] + 1, cfg["every"]))
    curves: dict[str, dict[str, list[list[float]]]] = {name: {"mmd": [], "accuracy": []} for name in study.variants}
    for index, (name, table) in enumerate(study.variants.items()):
        for seed in options.seed_list:
            preset = toy.preset(f"{study.name}-{index}", {study.section: table} if table else {})
            plan = preset.build(process=toy.flow_process(), seed=seed)
            start = toy.start_noise(plan, len(labels), 777, "gaussian")  # the same for every checkpoint and run
            mmd: list[float] = []
            accuracy: list[float] = []

            def evaluate(step: int, ema: toy.TinyUNet, start=start, mmd=mmd, accuracy=accuracy) -> None:
                if step % cfg["every"]:
                    return
                samples = toy.flow_euler(ema, start, labels, steps=cfg["sampler_steps"])
                mmd.append(scorer(samples))
                accuracy.append(toy.accuracy(classifier, samples, labels))

            toy.train(plan, data, steps=cfg["steps"], seed=seed, on_step=evaluate, tick=progress.tick)
            curves[name]["mmd"].append(mmd)
            curves[name]["accuracy"].append(accuracy)
    return _report(study, options, cfg, checkpoints, curves, classifier_accuracy)


def _report(study: Study, options, cfg, checkpoints, curves, classifier_accuracy) -> common.Report:
    smoothed = {name: [metrics.smooth(c) for c in curves[name]["mmd"]] for name in study.variants}
    final = {name: [sum(c[-2:]) / len(c[-2:]) for c in smoothed[name]] for name in study.variants}
    # each seed ranks the variants by its final quality (1 = lowest MMD²)
    ranks: dict[str, list[float]] = {name: [] for name in study.variants}
    for s in range(options.seeds):
        for position, name in enumerate(sorted(study.variants, key=lambda n: final[n][s]), start=1):
            ranks[name].append(float(position))
    figures: dict = {"checkpoints": checkpoints, "classifier_accuracy_on_held_out_data": classifier_accuracy, "variants": {}}
    rows = []
    for name in study.variants:
        entry = {
            "final_mmd": common.summary(final[name]),
            "final_accuracy": common.summary([sum(c[-2:]) / len(c[-2:]) for c in curves[name]["accuracy"]]),
            "rank": common.summary(ranks[name]),
            "mmd_curves": curves[name]["mmd"],
            "mmd_curves_smoothed": smoothed[name],
        }
        figures["variants"][name] = entry
        final_mmd, final_accuracy = common.pm(entry["final_mmd"], 4), common.pm(entry["final_accuracy"], 0, percent=True)
        rows.append([name, final_mmd, final_accuracy, common.pm(entry["rank"], 1)])
    header = [study.column, "final MMD² (lower is better)", "class accuracy of samples", "rank per seed"]
    _plot(study, options, checkpoints, figures)
    setup = [
        f"Data: {cfg['train_images']} training images, 16x16, 12 classes (4 colours x 3 shapes) on random grey backgrounds; "
        f"{24 * 12} held-out images as the reference.",
        "Model: tiny class-conditional UNet trained as a rectified flow, velocity prediction, 1000 unshifted sigmas, "
        f"the model's time sigma * 1000; AdamW lr 2e-3, batch 32, {cfg['steps']} steps, EMA 0.995.",
        f"Every {cfg['every']} steps: {cfg['per_class']} samples per class from one fixed N(0, I) start, flow Euler "
        f"{cfg['sampler_steps']} steps from sigma 1 to 0, guidance 1.",
        f"Quality: unbiased MMD² on a small classifier's features ({classifier_accuracy:.0%} accurate on the held-out "
        "images), as in the min-snr bench; curves smoothed over 3 checkpoints, final = mean of the last two.",
    ]
    return common.Report(
        title=study.title,
        claim=study.claim,
        headline=common.table(header, rows),
        verdict=study.verdict(figures, cfg),
        sections=[],
        figures=figures,
        plots=[f"{study.name}-quality.png"],
        setup=setup,
    )


def by_rank(figures: dict) -> list[str]:
    return sorted(figures["variants"], key=lambda n: figures["variants"][n]["rank"]["mean"])


def apart(figures: dict, a: str, b: str) -> tuple[float, float]:
    """How much lower b's final MMD² is than a's, and the larger of their seed spreads."""
    first, second = figures["variants"][a]["final_mmd"], figures["variants"][b]["final_mmd"]
    return first["mean"] - second["mean"], max(first["spread"], second["spread"])


def _plot(study: Study, options, checkpoints, figures) -> None:
    series = {}
    for name, entry in figures["variants"].items():
        stats = [metrics.mean_spread([c[i] for c in entry["mmd_curves_smoothed"]]) for i in range(len(checkpoints))]
        series[name] = ([m for m, _ in stats], [s for _, s in stats])
    plots.lines(
        options.output / f"{study.name}-quality.png",
        checkpoints,
        series,
        title="sample quality over training (lower is better); band: ± spread over seeds",
        xlabel="training step",
        ylabel="MMD^2 (smoothed)",
        bounds=None,
    )
