"""An exponential moving average of the trained weights, updated after every optimizer step.

``[ema]`` in a preset (``decay`` turns it on): after optimizer step ``n``, from ``start_step``
on and every ``update_every`` steps, each shadow weight becomes
``shadow = decay * shadow + (1 - decay) * weight``; before ``start_step`` the shadow simply
follows the weights. ``device = "cpu"`` keeps the shadows in host memory (a copy of the trained
weights costs their size again on the GPU otherwise); they are then updated with a copy per
step, which is the price of the memory.

Hosts get it from ``plan.ema(parameters)`` after ``plan.optimizer``: the update runs in a
post-step hook of the optimizer the plan built, so it follows real optimizer steps only (not
accumulation micro-steps) in every host. ``applied()`` swaps the averaged weights in -- for
sampling and saving -- and back.

With a schedule-free optimizer (``sdplug.strategies.optimizer_modes``) the parameters hold, between steps,
the point its gradients are taken at (``y``), not the weights it says to evaluate (``x``, which
eval mode puts in the parameters for sampling and saving). The average is of what is evaluated:
each update switches the optimizer to eval mode, averages ``x``, and puts the training point back
bit for bit (from a copy kept on the average's device), so keeping an EMA never changes what
trains.

Peers: diffusers' ``EMAModel`` (decay with an optional warm-up ``(1 + n) / (10 + n)``),
OneTrainer's EMA (``ema_decay``, ``ema_update_step_interval``, CPU or GPU), SimpleTuner's
(``ema_decay``, ``ema_update_interval``, ``ema_device``); kohya sd-scripts has none. sdplug
uses the plain decay with no warm-up: what ``decay`` says is what is applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from sdplug.preset.settings import EMASettings
from sdplug.strategies.optimizer_modes import eval_mode, has_modes, in_train_mode, train_mode


class EMA:
    """Shadow copies of ``parameters`` and their update rule (``EMASettings``); ``optimizer``:
    the optimizer whose steps it follows, read for its eval mode when it has one."""

    def __init__(self, parameters: list[torch.nn.Parameter], settings: EMASettings, optimizer: Any = None):
        self.parameters = list(parameters)
        self.settings = settings
        self.optimizer = optimizer if has_modes(optimizer) else None
        self.decay = float(settings.decay or 0.0)
        self._device = torch.device("cpu") if settings.device == "cpu" else None
        with torch.no_grad():
            self.shadows = [p.detach().to(device=self._device or p.device, copy=True) for p in self.parameters]
        self.optimizer_steps = 0
        self.updates = 0  # averaging updates (from start_step on)

    @classmethod
    def following(cls, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], settings: EMASettings) -> EMA:
        """An average updated after every step of ``optimizer`` (of its evaluation weights, ``x``,
        for a schedule-free optimizer)."""
        ema = cls(parameters, settings, optimizer=optimizer)
        optimizer.register_step_post_hook(lambda optimizer, args, kwargs: ema.after_optimizer_step())
        return ema

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        n, every = self.optimizer_steps, self.settings.update_every
        if n < self.settings.start_step:
            with self._evaluated():
                self._copy_weights()  # before start_step the average is the weights themselves
        elif n % every == 0:
            with self._evaluated():
                self._average()
            self.updates += 1

    @contextlib.contextmanager
    def _evaluated(self) -> Iterator[None]:
        """The weights the optimizer says to evaluate in the parameters inside the block (its eval
        mode), the training point restored exactly after; nothing to do without modes."""
        if self.optimizer is None or in_train_mode(self.optimizer) is False:
            yield
            return
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            # train() after eval() returns y only up to rounding: restore it from a copy instead
            kept = [p.detach().to(device=self._device or p.device, copy=True) for p in trained]
        eval_mode(self.optimizer)
        try:
            yield
        finally:
            train_mode(self.optimizer)
            with torch.no_grad():
                for p, saved in zip(trained, kept, strict=True):
                    p.copy_(saved)

    @torch.no_grad()
    def _copy_weights(self) -> None:
        for shadow, p in zip(self.shadows, self.parameters, strict=True):
            shadow.copy_(p.detach())

    @torch.no_grad()
    def _average(self) -> None:
        weights = [p.detach().to(s.device, s.dtype) for s, p in zip(self.shadows, self.parameters, strict=True)]
        torch._foreach_lerp_(self.shadows, weights, 1.0 - self.decay)  # shadow += (1 - decay)(w - shadow)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the parameters inside the block; the trained ones after."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.parameters]
            for p, shadow in zip(self.parameters, self.shadows, strict=True):
                p.copy_(shadow.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in zip(self.parameters, saved, strict=True):
                    p.copy_(original)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadows": [s.detach().cpu() for s in self.shadows],
            "optimizer_steps": self.optimizer_steps,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for shadow, saved in zip(self.shadows, state["shadows"], strict=True):
                shadow.copy_(saved.to(shadow.device, shadow.dtype))
        self.optimizer_steps, self.updates = int(state["optimizer_steps"]), int(state["updates"])

    def record(self) -> dict[str, Any]:
        """The audit's ``ema`` section: what was averaged, how often, where."""
        return {
            "decay": self.decay,
            "averages": "evaluation weights (schedule-free x)" if self.optimizer is not None else "the trained weights",
            "update_every": self.settings.update_every,
            "start_step": self.settings.start_step,
            "device": str(self.shadows[0].device) if self.shadows else None,
            "parameters": sum(s.numel() for s in self.shadows),
            "optimizer_steps": self.optimizer_steps,
            "updates": self.updates,
        }
