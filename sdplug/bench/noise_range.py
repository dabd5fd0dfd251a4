"""Evidence bench ``noise-range`` (article 000): can a model trained with plain Gaussian noise
reach near-black and near-white images, and can offset and pyramid noise?

Run: ``sdplug bench noise-range [--quick] [--seeds N] [--output DIR]``. Data: 16x16 images whose
class is their background brightness (black, dark, grey, light, white: per-image means from about
-0.9 to +0.9), prompted by class. Each noise strategy trains a fresh tiny UNet through the plan
(same steps, data order and seeds); every model is sampled by the same DDIM sampler and steps,
from N(0, I) and from its own training noise family (a model trained on normalised pyramid
noise and started from N(0, I) keeps high-frequency residue), and the distribution of per-image
mean brightness of its samples is compared with the data's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from sdplug.bench import common, metrics, plots, toy
from sdplug.plan import Plan
from sdplug.preset import Preset

STRATEGIES: dict[str, list[dict]] = {
    "gaussian": [],
    "offset 0.1": [{"type": "offset", "strength": 0.1}],
    "pyramid 0.8": [{"type": "pyramid", "discount": 0.8}],
    "pyramid 0.8 unit-white": [{"type": "pyramid", "discount": 0.8, "normalize": "none"}],
    "pink": [{"type": "pink", "alpha": 1.0}],
    "perlin": [{"type": "perlin", "strength": 0.5}],
}
STARTS = {"gaussian": "N(0, I)", "training": "training family"}
FULL = {"steps": 400, "train_images": 2000, "per_class": 16, "sampler_steps": 25}
QUICK = {"steps": 30, "train_images": 500, "per_class": 6, "sampler_steps": 8}
REACHED = 0.8  # an extreme is "reached" when the prompt's mean brightness is >= 80% of the data's
PREDICTION = "epsilon"


@dataclasses.dataclass(frozen=True)
class Process:
    """What the bench trains and samples: DDPM's schedule here, a rectified flow in
    ``flow-noise-range``. The strategies, data, seeds, starts and measures are the same."""

    bench: str  # the bench's name, and its plots' prefix
    build: Callable[[Preset, int], Plan]  # (preset, seed) -> the plan
    sample: Callable[[toy.TinyUNet, torch.Tensor, torch.Tensor, int], torch.Tensor]  # (model, x_T, labels, steps)
    model: str  # the setup's description of the process and its sampler
    sampler: str


DDPM = Process(
    bench="noise-range",
    build=lambda preset, seed: preset.build(alphas_cumprod=toy.schedule(), prediction_type=PREDICTION, seed=seed),
    sample=lambda model, x, labels, steps: toy.ddim(
        model, x, labels, alphas_cumprod=toy.schedule(), prediction_type=PREDICTION, steps=steps
    ),
    model=f"{PREDICTION} prediction, Stable Diffusion's scaled-linear 1000-step schedule",
    sampler="DDIM",
)


def _image_means(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(-1, 1).mean(dim=(1, 2, 3))


def _measure(samples: torch.Tensor, labels: torch.Tensor, data: toy.Dataset) -> dict[str, float]:
    means, data_means = _image_means(samples), _image_means(data.images)
    black, white = data.names.index("black"), data.names.index("white")
    out = {
        "wasserstein": metrics.wasserstein_1d(means, data_means),
        "range_share": metrics.range_share(means, data_means),
        "black_mean": float(means[labels == black].mean()),
        "white_mean": float(means[labels == white].mean()),
        "p01": float(means.quantile(0.01)),
        "p50": float(means.quantile(0.5)),
        "p99": float(means.quantile(0.99)),
        "high_frequency": metrics.high_frequency_residue(samples),
    }
    data_black, data_white = float(data_means[data.labels == black].mean()), float(data_means[data.labels == white].mean())
    out["extremes_reached"] = 0.5 * (out["black_mean"] / data_black + out["white_mean"] / data_white)
    return out


@dataclasses.dataclass
class Measured:
    """Every strategy's samples measured, per start and seed."""

    cfg: dict
    results: dict[str, dict[str, dict[str, list[float]]]]
    grids: dict[tuple[str, str], torch.Tensor]
    reference: toy.Dataset
    labels: torch.Tensor
    low_frequency: dict[str, list[float]]


def run(options: common.Options) -> common.Report:
    measured = measure(options, DDPM)
    return report(
        options,
        DDPM,
        measured,
        title="noise-range: can the model reach near-black and near-white? (article 000)",
        claim="a model trained with plain Gaussian noise cannot reach the brightness extremes; offset and pyramid noise can.",
        verdict=_verdict,
        why=("Why plain noise stays grey here", _why),
    )


def measure(options: common.Options, process: Process) -> Measured:
    cfg = QUICK if options.quick else FULL
    data = toy.make_dataset("brightness", cfg["train_images"], seed=12345)
    reference = toy.make_dataset("brightness", 5 * 40, seed=54321)  # held-out, balanced
    labels = torch.arange(len(data.names)).repeat_interleave(cfg["per_class"])
    progress = common.Progress(len(STRATEGIES) * options.seeds * (cfg["steps"] + 2), process.bench, options.progress)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    grids: dict[tuple[str, str], torch.Tensor] = {}
    low_frequency: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for name, noise in STRATEGIES.items():
        results[name] = {start: {} for start in STARTS}
        for seed in options.seed_list:
            plan = process.build(toy.preset(f"{process.bench}-{name.replace(' ', '-')}", {"noise": noise}), seed)
            trained = toy.train(plan, data, steps=cfg["steps"], seed=seed, tick=progress.tick)
            # how far the training noise moves an image's per-channel mean (512 draws of the plan's noise)
            low_frequency[name].append(float(toy.start_noise(plan, 512, 99 + seed, "training").mean(dim=(2, 3)).std()))
            for start in STARTS:
                x = toy.start_noise(plan, len(labels), 10_000 + seed, start)
                samples = process.sample(trained.model, x, labels, cfg["sampler_steps"])
                for key, value in _measure(samples, labels, reference).items():
                    results[name][start].setdefault(key, []).append(value)
                if seed == 0:
                    grids[(name, start)] = samples
                progress.tick()
    return Measured(cfg, results, grids, reference, labels, low_frequency)


def _why(figures: dict) -> str:
    """How much of the image mean survives to the last timestep, against how much the training
    noise can move the mean (both in the units of a per-image, per-channel mean)."""
    alphas = toy.schedule()
    leak = float(alphas[-1].sqrt()) * 0.9
    ratio_rows = [
        [name, common.pm(figures["noise_mean_std"][name], 3), f"{figures['noise_mean_std'][name]['mean'] / leak:.1f}"]
        for name in STRATEGIES
    ]
    return (
        "At the last training timestep x_T = sqrt(a_T) x0 + sqrt(1 - a_T) noise with sqrt(a_T) = "
        f"{float(alphas[-1].sqrt()):.3f}, so a near-black or near-white image (mean about ±0.9) still shows a mean of about "
        f"±{leak:.3f} in x_T. With noise whose per-channel mean varies hardly more than that, the model learns to read the image's "
        "brightness from x_T's mean, and a sampler starting from noise with mean near 0 then asks it for a mid-grey image. "
        "The std of the training noise's per-channel means (512 draws of each plan's noise; N(0, I) gives 1/16 at 16x16), "
        "against that leaked mean:\n\n"
        + common.table(["noise", "std of per-channel noise mean", "ratio to the leaked mean"], ratio_rows)
    )


def report(
    options: common.Options,
    process: Process,
    measured: Measured,
    *,
    title: str,
    claim: str,
    verdict: Callable[[dict], list[str]],
    why: tuple[str, Callable[[dict], str]],
) -> common.Report:
    """The table, percentiles, plots and setup every noise-range bench shares; ``verdict`` and
    ``why`` (a section's title and text) read the figures for the bench's own claim."""
    cfg, results, grids, reference, labels = measured.cfg, measured.results, measured.grids, measured.reference, measured.labels
    low_frequency = measured.low_frequency
    data_means = _image_means(reference.images)
    data_row = _measure(reference.images, reference.labels, reference)
    figures: dict = {
        "data": data_row,
        "strategies": {},
        "noise_mean_std": {n: common.summary(v) for n, v in low_frequency.items()},
    }
    rows = []
    for name in STRATEGIES:
        figures["strategies"][name] = {}
        for start, label in STARTS.items():
            summary = {k: common.summary(v) for k, v in results[name][start].items()}
            figures["strategies"][name][start] = summary
            if name == "gaussian" and start == "training":
                continue  # the same start as N(0, I)
            rows.append(
                [
                    name,
                    label if name != "gaussian" else "N(0, I) (= training)",
                    common.pm(summary["black_mean"], 2),
                    common.pm(summary["white_mean"], 2),
                    common.pm(summary["extremes_reached"], 0, percent=True),
                    common.pm(summary["range_share"], 0, percent=True),
                    common.pm(summary["wasserstein"], 3),
                    common.pm(summary["high_frequency"], 3),
                ]
            )
    header = [
        "noise",
        "sampler start",
        '"black" mean',
        '"white" mean',
        "extremes reached",
        "range reached",
        "W1 to data",
        "HF residue",
    ]
    rows.insert(
        0,
        [
            "**data**",
            "",
            f"{data_row['black_mean']:.2f}",
            f"{data_row['white_mean']:.2f}",
            "100%",
            "100%",
            "0",
            f"{data_row['high_frequency']:.3f}",
        ],
    )
    headline = common.table(header, rows)
    plot_names = _plots(options, process, figures, grids, reference, labels)
    setup = [
        f"Data: {cfg['train_images']} training images, 16x16, five background-brightness classes (black, dark, grey, light, "
        f"white); the comparison set is {len(reference.labels)} held-out images, balanced (per-image means "
        f"{float(data_means.min()):.2f} to {float(data_means.max()):.2f}).",
        f"Model: tiny class-conditional UNet (16x16 -> 4x4, width 32), {process.model}; "
        f"AdamW lr 2e-3, batch 32, {cfg['steps']} steps, EMA weights sampled.",
        "Training goes through the public plan API (`Preset.build`, `plan.noise / timesteps / noisy_input / target / loss / "
        "step`); the noise strategy is the only difference between runs of one seed.",
        f"Sampling: {process.sampler}, {cfg['sampler_steps']} steps, guidance 1, no clipping; {cfg['per_class']} samples per "
        "class, from N(0, I) and from the training noise family (drawn inside `plan.validation()`).",
        "Per-image mean brightness of samples (clamped to [-1, 1]) vs the data's: 1-D Wasserstein distance (W1), the share "
        "of the data's 1%-99% range that the samples' 1%-99% range covers, percentiles in figures.json. HF residue: std of "
        "what a 2x2 box blur removes (the data's own value is in the first row).",
    ]
    return common.Report(
        title=title,
        claim=claim,
        headline=headline,
        verdict=verdict(figures),
        sections=[(why[0], why[1](figures)), ("Per-image brightness percentiles (p1 / p50 / p99)", _percentiles(figures))],
        figures=figures,
        plots=plot_names,
        setup=setup,
    )


def best_start(figures: dict, name: str) -> tuple[str, float]:
    """The sampler start that reached the extremes best for a strategy, and how far."""
    by_start = {s: figures["strategies"][name][s]["extremes_reached"]["mean"] for s in STARTS}
    start = max(by_start, key=lambda s: by_start[s])
    return STARTS[start], by_start[start]


def residue_line(figures: dict) -> str:
    residue = figures["strategies"]["pyramid 0.8"]
    return (
        f"- High-frequency residue (data {figures['data']['high_frequency']:.3f}): normalised pyramid noise sampled from "
        f"N(0, I) {residue['gaussian']['high_frequency']['mean']:.3f}, from its own family "
        f"{residue['training']['high_frequency']['mean']:.3f}; the unit-white variant from N(0, I) "
        f"{figures['strategies']['pyramid 0.8 unit-white']['gaussian']['high_frequency']['mean']:.3f}."
    )


def _verdict(figures: dict) -> list[str]:
    reached = {name: best_start(figures, name) for name in STRATEGIES}
    verdict_lines = []
    gaussian_ok = reached["gaussian"][1] >= REACHED
    offset_ok = reached["offset 0.1"][1] >= REACHED
    pyramid_ok = max(reached["pyramid 0.8"][1], reached["pyramid 0.8 unit-white"][1]) >= REACHED
    holds = (not gaussian_ok) and offset_ok and pyramid_ok
    verdict_lines.append(
        f"**Verdict: the claim {'holds' if holds else 'holds only in part' if (not gaussian_ok and pyramid_ok) else 'does not hold'} here.** "
        f'An extreme counts as reached when the "black" / "white" prompts\' mean brightness is at least {REACHED:.0%} '
        'of the data\'s (the mean of both ratios is the "extremes reached" column).'
    )
    for name, (start, value) in reached.items():
        verdict_lines.append(
            f"- {name}: {value:.0%} at best (sampler start: {start}): {'reached' if value >= REACHED else 'not reached'}."
        )
    leak = float(toy.schedule()[-1].sqrt()) * 0.9
    moves = {n: figures["noise_mean_std"][n]["mean"] / leak for n in STRATEGIES}
    yes = [moves[n] for n in STRATEGIES if reached[n][1] >= REACHED]
    no = [moves[n] for n in STRATEGIES if reached[n][1] < REACHED]
    if yes and no:
        separated = min(yes) > max(no)
        verdict_lines.append(
            f"- Why (section below): the strategies that reached the extremes move an image's mean by {min(yes):.1f}x or more "
            f"the brightness signal left at the last timestep; those that did not, by {max(no):.1f}x or less"
            + ("." if separated else " (the two overlap: this ratio alone does not explain the result).")
        )
    verdict_lines.append(residue_line(figures))
    return verdict_lines


def _percentiles(figures) -> str:
    d = figures["data"]
    rows = [["**data**", "", f"{d['p01']:.2f} / {d['p50']:.2f} / {d['p99']:.2f}"]]
    for name, by_start in figures["strategies"].items():
        for start, s in by_start.items():
            cell = f"{s['p01']['mean']:.2f} / {s['p50']['mean']:.2f} / {s['p99']['mean']:.2f}"
            rows.append([name, STARTS[start], cell])
    return common.table(["noise", "sampler start", "p1 / p50 / p99 (means over seeds)"], rows)


def _plots(options, process: Process, figures, grids, reference: toy.Dataset, labels) -> list[str]:
    out, prefix = options.output, process.bench
    names = list(STRATEGIES)
    series = {}
    for start, label in STARTS.items():
        for key, what in (("black_mean", '"black"'), ("white_mean", '"white"')):
            entries = [figures["strategies"][n][start][key] for n in names]
            series[f"{what}, {label}"] = ([e["mean"] for e in entries], [e["spread"] for e in entries])
    plots.bars(
        out / f"{prefix}-extremes.png",
        names,
        series,
        title="mean brightness of samples asked for black / white (data: about -0.91 / +0.91)",
        ylabel="mean brightness",
    )
    w1 = {
        label: (
            [figures["strategies"][n][start]["wasserstein"]["mean"] for n in names],
            [figures["strategies"][n][start]["wasserstein"]["spread"] for n in names],
        )
        for start, label in STARTS.items()
    }
    plots.bars(out / f"{prefix}-wasserstein.png", names, w1, title="W1: sample vs data per-image brightness", ylabel="W1")
    black, white = reference.names.index("black"), reference.names.index("white")
    rows = [
        ("data: black", reference.images[reference.labels == black][:8]),
        ("data: white", reference.images[reference.labels == white][:8]),
    ]
    for name in names:
        for start, label in STARTS.items():
            if name == "gaussian" and start == "training":
                continue
            samples = grids[(name, start)]
            rows.append((f"{name} / {label}: black", samples[labels == black][:8]))
            rows.append((f"{name} / {label}: white", samples[labels == white][:8]))
    plots.grid(out / f"{prefix}-samples.png", rows, title='samples for the "black" and "white" prompts (seed 0)', label_width=300)
    return [f"{prefix}-extremes.png", f"{prefix}-wasserstein.png", f"{prefix}-samples.png"]
