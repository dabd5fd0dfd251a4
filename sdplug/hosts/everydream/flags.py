"""EveryDream2's own trick settings next to a preset: one table, read by the plugin and the bridge.

Every train.json / command-line key of EveryDream2 main that sets a trick a preset section can
replace is listed once, with EveryDream2's default and the value that switches it off:

- a key at EveryDream2's default (``cond_dropout`` 0.04, ``zero_frequency_noise_ratio`` 0.02,
  ...) is switched off when the preset sets its section, and the rule is printed and audited:
  the preset's trick replaces it, it never applies twice;
- a key the user set to something else (and not off) is a conflict: the run is refused before
  the dataset and optimizer are built, naming the key and the section;
- ``carry`` keys (the timestep range) carry over into the plan when the preset does not set
  their section, as EveryDream2's own choice.
"""

from __future__ import annotations

from typing import Any

from sdplug.hosts.host_flags import HostFlag


def _key(name: str, sections: tuple[str, ...], default: Any, off: Any, why: str) -> HostFlag:
    """``default``: EveryDream2 main's argparse default; ``off``: the value that switches the
    trick off ("keep": nothing to switch, refused when set)."""
    return HostFlag(name, sections, why, default=default, off=off)


KEYS = (
    _key("cond_dropout", ("caption",), 0.04, 0.0, "caption dropout (the tokens of ' ')"),
    _key("shuffle_tags", ("caption",), False, False, "tag shuffling in the data loader"),
    _key("keep_tags", ("caption",), 0, 0, "tags kept in place when shuffling"),
    _key("zero_frequency_noise_ratio", ("noise",), 0.02, 0.0, "zero-frequency (offset) noise"),
    _key("pyramid_noise_discount", ("noise",), None, None, "pyramid noise"),
    _key("timestep_start", ("timesteps",), 0, "keep", "the timestep range's start"),
    _key("timestep_end", ("timesteps",), 1000, "keep", "the timestep range's end"),
    _key("min_snr_gamma", ("loss_weighting",), None, None, "min-SNR weighting (epsilon form only)"),
    _key("loss_type", ("loss",), "mse_huber", "mse", "the loss type (mse_huber blends by timestep)"),
    _key("attn_type", ("attention",), "sdp", "keep", "the attention"),
    _key("gradient_checkpointing", ("memory.gradient_checkpointing",), False, "keep", "gradient checkpointing"),
)
BY_NAME = {key.name: key for key in KEYS}

# carried into the plan's default timestep draw when the preset names no [timesteps]
CARRIED = ("timestep_start", "timestep_end")
