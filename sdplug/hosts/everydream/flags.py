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

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Ed2Key:
    name: str
    sections: tuple[str, ...]  # preset sections (families, or memory.<key>) that replace it
    default: Any  # EveryDream2 main's argparse default
    off: Any  # the value that switches the trick off ("keep": nothing to switch, refuse if set)
    meaning: str


KEYS = (
    Ed2Key("cond_dropout", ("caption",), 0.04, 0.0, "caption dropout (the tokens of ' ')"),
    Ed2Key("shuffle_tags", ("caption",), False, False, "tag shuffling in the data loader"),
    Ed2Key("keep_tags", ("caption",), 0, 0, "tags kept in place when shuffling"),
    Ed2Key("zero_frequency_noise_ratio", ("noise",), 0.02, 0.0, "zero-frequency (offset) noise"),
    Ed2Key("pyramid_noise_discount", ("noise",), None, None, "pyramid noise"),
    Ed2Key("timestep_start", ("timesteps",), 0, "keep", "the timestep range's start"),
    Ed2Key("timestep_end", ("timesteps",), 1000, "keep", "the timestep range's end"),
    Ed2Key("min_snr_gamma", ("loss_weighting",), None, None, "min-SNR weighting (epsilon form only)"),
    Ed2Key("loss_type", ("loss",), "mse_huber", "mse", "the loss type (mse_huber blends by timestep)"),
    Ed2Key("attn_type", ("attention",), "sdp", "keep", "the attention"),
    Ed2Key("gradient_checkpointing", ("memory.gradient_checkpointing",), False, "keep", "gradient checkpointing"),
)
BY_NAME = {key.name: key for key in KEYS}

# carried into the plan's default timestep draw when the preset names no [timesteps]
CARRIED = ("timestep_start", "timestep_end")
