"""Every network file sd-scripts' network scripts save, routed through the adapter.

train_network.py and sdxl_train_network.py (main and v0.8.7) build their network with
``args.network_module``'s ``create_network`` or ``create_network_from_weights`` and save it with
``network.save_weights(file, dtype, metadata)``, the metadata being the ``ss_*`` training
arguments with the model spec merged on top. ``wrap_saves`` replaces both constructors (in the
adapter's session, so ``undo()`` restores them) so that each network they build saves through
``wrap(network, save)``: ``saved_metadata`` corrects the metadata, ``ema_save`` writes an EMA
twin. Each wrapper sets that one instance's ``save_weights``: a network lives for one run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Save = Callable[[Any, Any, Any], None]  # save_weights(file, dtype, metadata)


def wrap_saves(adapter: Any, module_name: str, wrap: Callable[[Any, Save], Save]) -> None:
    """Have every network ``module_name`` builds save through ``wrap(network, its save_weights)``."""
    module = importlib.import_module(module_name)
    for name in ("create_network", "create_network_from_weights"):
        if hasattr(module, name):
            adapter._replace(module, name, _constructor(getattr(module, name), wrap))


def _constructor(original: Callable[..., Any], wrap: Callable[[Any, Save], Save]) -> Callable[..., Any]:
    def create(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        network = result[0] if isinstance(result, tuple) else result  # create_network_from_weights: (network, weights)
        if hasattr(network, "save_weights"):
            network.save_weights = wrap(network, network.save_weights)
        return result

    return create
