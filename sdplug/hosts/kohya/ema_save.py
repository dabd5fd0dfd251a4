"""``[ema]`` inside sd-scripts, which keeps no moving average: the plan keeps one of the trained
network's weights, and every network file kohya saves gets its EMA twin beside it.

The plan's average follows the optimizer kohya steps (``plan.ema``, a post-step hook of the
optimizer the adapter built). Saving: the network scripts build their network with
``args.network_module``'s ``create_network`` / ``create_network_from_weights`` and save it with
``network.save_weights(file, dtype, metadata)``; the adapter wraps both constructors so each
network's ``save_weights`` also writes ``<file>-ema.<ext>`` with the averaged weights swapped in
(metadata ``sdplug_ema``: decay, steps, updates). train_db and fine_tune save whole models
through their own code and have no network module: ``[ema]`` is refused there.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError
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
    module = importlib.import_module(module_name)
    for name in ("create_network", "create_network_from_weights"):
        if hasattr(module, name):
            adapter._replace(module, name, _constructor(adapter, getattr(module, name)))


def _constructor(adapter: Any, original: Any):
    def create(*args: Any, **kwargs: Any):
        result = original(*args, **kwargs)
        network = result[0] if isinstance(result, tuple) else result
        if hasattr(network, "save_weights"):
            _wrap_save(adapter, network)
        return result

    return create


def _wrap_save(adapter: Any, network: Any) -> None:
    original = network.save_weights

    def save_weights(file, dtype, metadata):
        original(file, dtype, metadata)
        ema = adapter.plan.ema_tracker if adapter.plan is not None else None
        if ema is None or not {id(p) for p in ema.parameters} <= {id(p) for p in network.parameters()}:
            return  # not the network being trained (a --base_weights merge), or no average yet
        twin = ema_file(file)
        with ema.applied():
            original(twin, dtype, None if metadata is None else {**metadata, "sdplug_ema": json.dumps(ema.record())})
        adapter.plan.audit.extend_host("ema_files", **{Path(twin).name: ema.record()["optimizer_steps"]})
        logger.info(f"EMA weights: {twin}")

    network.save_weights = save_weights  # this instance only: a network object lives for one run
