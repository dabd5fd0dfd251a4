"""Evidence bench ``flow-weightings``: on a rectified flow, does min-SNR-5 in its velocity form,
or SD3's cosmap weighting, reach better samples than the plain velocity MSE in the same steps?

Run: ``sdplug bench flow-weightings [--quick] [--seeds N] [--output DIR]`` (``flow_variants``
trains and scores the variants). Min-SNR (Hang et al., ICCV 2023) was shown on DDPM; its flow
form weights the velocity error by ``min(SNR, 5) sigma^2``, and no trainer's main branch has it.
SD3's ``sigma_sqrt`` on the x0 error is the plain velocity MSE itself, so it is not a variant
here. A null result is a result.
"""

from __future__ import annotations

import functools

from sdplug.bench import flow_variants

BASELINE = "plain velocity MSE"


def _verdict(figures: dict, cfg: dict) -> list[str]:
    lines = []
    for name in figures["variants"]:
        if name == BASELINE:
            continue
        better, spread = flow_variants.apart(figures, BASELINE, name)
        if better > spread:
            word = "better than the plain velocity MSE, beyond the seed spread"
        elif better < -spread:
            word = "worse than the plain velocity MSE, beyond the seed spread"
        else:
            word = "no different from the plain velocity MSE within the seed spread"
        lines.append(f"{name}: {word} (MMD² {-better:+.4f}, spread {spread:.4f})")
    return [
        "**Verdict: " + "; ".join(lines) + ".**",
        f"- At this scale: a tiny UNet on 16x16 shapes for {cfg['steps']} steps, uniform timesteps for every variant (the "
        "weighting alone differs; the baseline is flow-samplers' uniform run), a quality measure on classifier features.",
    ]


STUDY = flow_variants.Study(
    name="flow-weightings",
    title="flow-weightings: loss weighting on a rectified flow",
    claim="min-SNR weighting speeds up training (Hang et al. 2023, on DDPM); on a rectified flow, is its velocity form, "
    "or SD3's cosmap, better than the plain velocity MSE?",
    section="loss_weighting",
    variants={
        BASELINE: None,
        "min-SNR-5": {"type": "min_snr", "gamma": 5.0},
        "soft-min-SNR-5": {"type": "soft_min_snr", "gamma": 5.0},
        "cosmap (SD3)": {"type": "cosmap"},
    },
    column="loss weighting (velocity)",
    verdict=_verdict,
)
run = functools.partial(flow_variants.run, STUDY)
