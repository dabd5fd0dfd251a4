"""diffusers' ``compute_density_for_timestep_sampling`` as a preset's ``[timesteps]``: the sampler
of diffusers' flow scripts, of kohya's SD3 script and of kohya's ``sigma`` sampling, all of which
read ``--weighting_scheme`` (``logit_normal``, ``mode``, else uniform) with ``--logit_mean``,
``--logit_std`` and ``--mode_scale``."""

from __future__ import annotations

from typing import Any


def density_timesteps(flags: dict[str, Any], *, flip: bool) -> dict[str, Any]:
    """The ``[timesteps]`` table of the density the flags name. ``flip``: the host indexes a
    descending sigma table with ``u`` (sigma ``1 - u``), so the logit-normal mean changes sign
    (the mode law is symmetric about 1/2)."""
    scheme = flags.get("weighting_scheme")
    if scheme == "logit_normal":
        mean = float(flags.get("logit_mean") or 0.0)
        return {"type": "logit_normal", "mean": -mean if flip else mean, "std": float(flags.get("logit_std") or 1.0)}
    if scheme == "mode":
        return {"type": "mode", "scale": float(flags.get("mode_scale") or 1.29)}
    return {"type": "uniform"}
