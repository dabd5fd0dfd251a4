"""The random streams of a run, derived in one place from (seed, rank, purpose).

Every host draws a plan's noise, timesteps and caption decisions from these streams, so one
preset and seed give the same draws in every host; each rank of a data-parallel run has its
own streams (different noise per rank), and no two purposes or ranks share one. A stream's
seed is the first 63 bits of ``sha256("sdplug/<seed>/<rank>/<purpose>")``.

Purposes: ``noise`` (the noise strategies), ``timesteps``, ``captions`` (caption transforms
and dropout decisions), and host-only ones a host may ask for (``data`` order, ``latents``
for a VAE's posterior sample). An explicit ``generator=`` / ``rng=`` passed to a plan call
overrides its stream for that call.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

from sdplug.errors import SdplugError


def stream_seed(seed: int, rank: int, purpose: str) -> int:
    """The seed of one stream: independent of every other (seed, rank, purpose)."""
    digest = hashlib.sha256(f"sdplug/{seed}/{rank}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Streams:
    """Lazily created torch generators (one device each) and Python RNGs, with their state."""

    def __init__(self, seed: int = 0, rank: int = 0) -> None:
        self.seed, self.rank = int(seed), int(rank)
        self._generators: dict[str, torch.Generator] = {}
        self._randoms: dict[str, random.Random] = {}
        self._pending: dict[str, Any] = {}  # restored states of generators not created yet

    def generator(self, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        """The torch generator of ``purpose``, on ``device`` (fixed at its first use)."""
        device = torch.device(device)
        existing = self._generators.get(purpose)
        if existing is not None:
            if existing.device.type != device.type or (device.index is not None and existing.device != device):
                raise SdplugError(
                    f"the plan's {purpose!r} stream lives on {existing.device}, and this call is on {device}: "
                    "keep the tensors of one run on one device (or pass generator=)."
                )
            return existing
        generator = torch.Generator(device=device).manual_seed(stream_seed(self.seed, self.rank, purpose))
        if purpose in self._pending:
            generator.set_state(self._pending.pop(purpose))
        self._generators[purpose] = generator
        return generator

    def random(self, purpose: str) -> random.Random:
        """The Python RNG of ``purpose`` (caption decisions draw plain floats)."""
        if purpose not in self._randoms:
            self._randoms[purpose] = random.Random(stream_seed(self.seed, self.rank, purpose))
        return self._randoms[purpose]

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data only (checkpoints load with ``weights_only=True``)."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "generators": {
                **{k: v for k, v in self._pending.items()},
                **{k: g.get_state() for k, g in self._generators.items()},
            },
            "randoms": {k: r.getstate() for k, r in self._randoms.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise SdplugError(
                f"the saved streams are of seed {state['seed']} rank {state['rank']}, this plan's of seed "
                f"{self.seed} rank {self.rank}: resume with the same seed and number of processes."
            )
        # in place: a host may hold a stream (a data sampler's generator) across the resume
        self._pending = {}
        for purpose, value in state["generators"].items():
            if purpose in self._generators:
                self._generators[purpose].set_state(value)
            else:
                self._pending[purpose] = value
        for purpose, value in state["randoms"].items():
            self.random(purpose).setstate(_as_random_state(value))


def _as_random_state(value: Any) -> tuple:
    # a state that went through a checkpoint comes back with lists where tuples were
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
