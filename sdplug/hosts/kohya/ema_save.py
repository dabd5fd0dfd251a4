"""``[ema]`` inside sd-scripts, which keeps no moving average: the plan keeps one of the trained
network's weights, and every network file kohya saves gets its EMA twin beside it.

The plan's average follows the optimizer kohya steps (``plan.ema``, a post-step hook of the
optimizer the adapter built). Saving: each network's ``save_weights(file, dtype, metadata)``
(reached through ``network_saves``) also writes ``<file>-ema.<ext>`` with the averaged weights
swapped in (metadata ``sdplug_ema``: decay, steps, updates). train_db and fine_tune save whole
models through their own code and have no network module: ``[ema]`` is refused there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError
from sdplug.hosts.kohya.network_saves import Save, wrap_saves
from sdplug.log import logger


def ema_file(file: str | Path) -> str:
    path = Path(file)
    return str(path.with_name(f"{path.stem}-ema{path.suffix}"))


def install(adapter: Any, args: Any) -> None:
    """At configure time, before the script builds its network."""
    preset = adapter.preset
    if preset.ema.decay is None:
        return
    module_name = getattr(args, "network_module", None)
    if not module_name:
        raise PresetError(
            f"sd-scripts {adapter.script} saves whole models through its own code, so sdplug cannot save an EMA "
            "twin there. Allowed with [ema] inside sd-scripts: the network scripts (train_network.py, "
            "sdxl_train_network.py, with --network_module), or `sdplug train --mode dreambooth`.",
            path=preset.path,
            key="ema.decay",
        )
    wrap_saves(adapter, module_name, lambda network, save: _with_twin(adapter, network, save))


def _with_twin(adapter: Any, network: Any, original: Save) -> Save:
    def save_weights(file, dtype, metadata):
        original(file, dtype, metadata)
        ema = adapter.plan.ema_average if adapter.plan is not None else None
        if ema is None or not {id(p) for p in ema.parameters} <= {id(p) for p in network.parameters()}:
            return  # not the network being trained (a --base_weights merge), or no average yet
        twin = ema_file(file)
        with ema.applied():
            original(twin, dtype, None if metadata is None else {**metadata, "sdplug_ema": json.dumps(ema.record())})
        adapter.plan.extend_host_record("ema_files", **{Path(twin).name: ema.record()["optimizer_steps"]})
        logger.info(f"EMA weights: {twin}")

    return save_weights
