"""Proof that gradient checkpointing really ran: the checkpointed calls each model made.

diffusers and transformers both route a checkpointed block through the module's own
``_gradient_checkpointing_func``, but transformers only in train mode, so "switched on" is
not "applied" (a loaded text encoder in eval mode checkpoints nothing). The audit reports the
calls counted here, not the switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class CheckpointedCalls:
    """Counts, per named model, the calls that went through its checkpointing function."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.calls = dict.fromkeys(models, 0)
        for name, model in models.items():
            for module in model.modules():
                function = module.__dict__.get("_gradient_checkpointing_func")
                if function is not None:
                    # ignore: torch types Module.__setattr__'s value as Tensor | Module, but any
                    # other value (here a function) is stored as a plain attribute
                    module._gradient_checkpointing_func = self._counting(name, function)  # type: ignore[assignment]

    def _counting(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return function(*args, **kwargs)

        return counted
