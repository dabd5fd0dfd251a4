"""Evidence bench ``flow-noise-range``: ``noise-range`` on a rectified flow. Offset and pyramid
noise exist because DDPM's Stable Diffusion schedule leaves some of the image at its last
timestep (``noise-range``); a rectified flow's sigma = 1 is the noise alone. Does plain Gaussian
noise reach near-black and near-white there, do offset and pyramid noise still, and does it
matter whether sampling starts from N(0, I) or from the training noise family?

Run: ``sdplug bench flow-noise-range [--quick] [--seeds N] [--output DIR]``. The same strategies,
data, seeds, sampler starts and measures as ``noise-range``; the models train as rectified flows
(velocity prediction, 1000 unshifted sigmas, uniform timesteps) and sample with the flow Euler
sampler from sigma = 1.
"""

from __future__ import annotations

from sdplug.bench import common, noise_range, toy

FLOW = noise_range.Process(
    bench="flow-noise-range",
    build=lambda preset, seed: preset.build(process=toy.flow_process(), seed=seed),
    sample=lambda model, x, labels, steps: toy.flow_euler(model, x, labels, steps=steps),
    model="rectified flow, velocity prediction, 1000 unshifted sigmas (the model's time sigma * 1000), uniform timesteps",
    sampler="flow Euler from sigma 1 to 0",
)
# a start is closer to the data when its brightness W1 is lower by more than twice the larger
# seed spread of the two
APART = 2.0


def run(options: common.Options) -> common.Report:
    measured = noise_range.measure(options, FLOW)
    return noise_range.report(
        options,
        FLOW,
        measured,
        title="flow-noise-range: on a rectified flow, does the noise family still decide the brightness range?",
        claim="on DDPM's schedule plain Gaussian noise cannot reach the brightness extremes (noise-range); on a rectified "
        "flow, whose sigma = 1 is the noise alone, it should; offset and pyramid noise should reach them too when sampling "
        "starts from their own family.",
        verdict=_verdict,
        why=("Why a rectified flow differs", _why),
    )


def _verdict(figures: dict) -> list[str]:
    strategies = figures["strategies"]
    reached = {name: noise_range.best_start(figures, name) for name in strategies}
    gaussian = strategies["gaussian"]["gaussian"]["extremes_reached"]
    others_ok = all(value >= noise_range.REACHED for name, (_, value) in reached.items() if name != "gaussian")
    gaussian_ok = gaussian["mean"] >= noise_range.REACHED
    word = "holds" if gaussian_ok and others_ok else "holds only in part" if gaussian_ok or others_ok else "does not hold"
    lines = [
        f"**Verdict: the claim {word} here.** Plain Gaussian noise reaches {gaussian['mean']:.0%} ± {gaussian['spread']:.0%} "
        f"of the data's extremes (an extreme counts as reached at {noise_range.REACHED:.0%})."
    ]
    for name in strategies:
        if name == "gaussian":
            continue
        family, plain = strategies[name]["training"], strategies[name]["gaussian"]
        w1_family, w1_plain = family["wasserstein"], plain["wasserstein"]
        gap, spread = w1_plain["mean"] - w1_family["mean"], max(w1_family["spread"], w1_plain["spread"])
        start = (
            "its own family is closer to the data"
            if gap > APART * spread
            else "N(0, I) is closer to the data"
            if -gap > APART * spread
            else "no difference beyond twice the seed spread"
        )
        lines.append(
            f"- {name}: extremes {family['extremes_reached']['mean']:.0%} from its own family, "
            f"{plain['extremes_reached']['mean']:.0%} from N(0, I) "
            f"({'reached' if reached[name][1] >= noise_range.REACHED else 'not reached'}); brightness W1 to the data "
            f"{w1_family['mean']:.3f} vs {w1_plain['mean']:.3f}: {start}."
        )
    lines.append(noise_range.residue_line(figures))
    return lines


def _why(figures: dict) -> str:
    rows = [[name, common.pm(figures["noise_mean_std"][name], 3)] for name in figures["strategies"]]
    return (
        "On DDPM's schedule x_T = sqrt(a_T) x0 + sqrt(1 - a_T) noise keeps a little of the image's mean, which the model "
        "learns to read (noise-range). A rectified flow's x_1 = noise has none of it: at sigma = 1 the model sees only the "
        "noise and the prompt, so it must produce the prompt's brightness from the prompt alone, whatever the noise's "
        "per-channel mean. What offset and pyramid noise still change is the law of x_1, which is why their sampler starts "
        "from the same family. The std of the training noise's per-channel means (512 draws of each plan's noise; N(0, I) "
        "gives 1/16 at 16x16):\n\n" + common.table(["noise", "std of per-channel noise mean"], rows)
    )
