"""Evidence bench ``flow-samplers`` (Esser et al. 2024, "Scaling Rectified Flow Transformers",
Table 1): on a rectified flow, does logit-normal(0, 1) timestep sampling reach better samples
than uniform, mode(1.29), cosmap and a shift of 3 in the same steps?

Run: ``sdplug bench flow-samplers [--quick] [--seeds N] [--output DIR]`` (``flow_variants``
trains and scores the variants). The paper ranks rf/lognorm(0.00, 1.00) first among its
rectified-flow variants (ImageNet and CC12M at 2B parameters): does the ranking hold at this scale?
"""

from __future__ import annotations

import functools

from sdplug.bench import flow_variants

PAPER_FIRST = "lognorm(0, 1)"


def _verdict(figures: dict, cfg: dict) -> list[str]:
    ranked = flow_variants.by_rank(figures)
    difference, spread = flow_variants.apart(figures, PAPER_FIRST, ranked[0])
    if ranked[0] == PAPER_FIRST:
        finding = "the paper's first place reproduces here."
    elif difference <= spread:
        finding = (
            f"{ranked[0]} ranks first, within the seed spread of {PAPER_FIRST}: the ranking does not separate at this scale."
        )
    else:
        finding = f"{ranked[0]} ranks first, beyond the seed spread: the paper's ranking does not reproduce at this scale."
    mean_ranks = ", ".join(f"{n} {figures['variants'][n]['rank']['mean']:.1f}" for n in ranked)
    return [
        f"**Verdict: mean rank {mean_ranks}; " + finding + "**",
        f"- Why it can differ from the paper: a tiny UNet on 16x16 shapes for {cfg['steps']} steps, not 2B-parameter "
        "transformers over 250k steps on ImageNet and CC12M; a quality measure on classifier features, not FID or CLIP "
        "score; one sampler (Euler, unshifted) for every variant.",
    ]


STUDY = flow_variants.Study(
    name="flow-samplers",
    title="flow-samplers: timestep sampling on a rectified flow (SD3, Table 1)",
    claim="rf/lognorm(0.00, 1.00) ranks first among the rectified-flow timestep samplers (Esser et al. 2024, Table 1).",
    section="timesteps",
    variants={
        "uniform": {"type": "uniform"},
        PAPER_FIRST: {"type": "logit_normal", "mean": 0.0, "std": 1.0},
        "mode(1.29)": {"type": "mode", "scale": 1.29},
        "cosmap": {"type": "cosmap"},
        "uniform, shift 3": {"type": "uniform", "shift": 3.0},
    },
    column="timestep sampler",
    verdict=_verdict,
)
run = functools.partial(flow_variants.run, STUDY)
