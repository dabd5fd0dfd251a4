"""The plan's watch for a run that goes non-finite (a NaN or an infinity in the loss or the weights).

A diverged run must never be reported as a success, and its weights never saved as the result.
Checking every step on the host would cost a device sync per step, so the watch keeps its
findings on the device: every loss the plan computes and, after each step of the optimizer the
plan built, the trained weights fold into a few device scalars (the first step that saw a
non-finite value, the first and the last finite loss). Those are read only where a host already
waits for the device -- logging, checkpoints, saving, the end of the run -- through
``first_step()`` and ``record()``.

Both are watched because either can go first: a loss of 4.6e7 steps the weights to infinity
and the next loss is NaN; an lr of 1e30 breaks the weights while the loss is still finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sdplug.errors import SdplugError


class DivergedRun(SdplugError):
    """A run stopped because a loss or the trained weights went non-finite."""


class DivergenceWatch:
    """Device-side record of the first non-finite value a run produced, and the losses before it."""

    def __init__(self) -> None:
        self._first_bad: torch.Tensor | None = None  # int64; -1 while every value was finite
        self._first_loss: torch.Tensor | None = None  # float32; NaN until a finite loss was seen
        self._last_loss: torch.Tensor | None = None
        self._where: torch.Tensor | None = None  # 0: a loss, 1: the weights after an optimizer step
        self.known_step: int | None = None  # once read: the first non-finite step
        self.optimizer_steps = 0  # steps of the watched optimizer (the weights' step number)
        self.watching_optimizer = False

    def _ensure(self, device: torch.device) -> None:
        if self._first_bad is None or self._first_bad.device != device:
            moved = [
                t.to(device) if t is not None else None for t in (self._first_bad, self._first_loss, self._last_loss, self._where)
            ]
            self._first_bad = moved[0] if moved[0] is not None else torch.full((), -1, dtype=torch.int64, device=device)
            nan = torch.full((), math.nan, dtype=torch.float32, device=device)
            self._first_loss = moved[1] if moved[1] is not None else nan.clone()
            self._last_loss = moved[2] if moved[2] is not None else nan.clone()
            self._where = moved[3] if moved[3] is not None else torch.full((), -1, dtype=torch.int64, device=device)

    def _mark(self, finite: torch.Tensor, step: int, where: int) -> None:
        assert self._first_bad is not None and self._where is not None
        new = (self._first_bad < 0) & ~finite
        self._first_bad = torch.where(new, step, self._first_bad)
        self._where = torch.where(new, where, self._where)

    def observe_loss(self, loss: torch.Tensor, step: int) -> None:
        """A loss the plan computed during training step ``step`` (1-based); no sync."""
        if loss.numel() == 0:
            return
        value = loss.detach().float().mean()
        self._ensure(value.device)
        assert self._first_loss is not None and self._last_loss is not None
        finite = torch.isfinite(value)
        self._mark(finite, step, 0)
        self._first_loss = torch.where(torch.isnan(self._first_loss) & finite, value, self._first_loss)
        self._last_loss = torch.where(finite, value, self._last_loss)

    def observe_weights(self, parameters: Iterable[torch.Tensor], step: int) -> None:
        """The trained weights after an optimizer step; no sync (one max-abs per tensor, on the device)."""
        tensors = [p.detach() for p in parameters]
        if not tensors:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        device = tensors[0].device
        self._ensure(device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for group in by_device.values():
            # max |w| is NaN or inf exactly when one value is; it never overflows as a sum or a norm could
            peaks = torch._foreach_norm(group, math.inf)
            finite = finite & torch.isfinite(torch.stack([p.float() for p in peaks])).all().to(device)
        self._mark(finite, step, 1)

    def first_step(self) -> int | None:
        """The first training step that produced a non-finite value, or None (reads the device: call it where the host syncs)."""
        if self.known_step is None and self._first_bad is not None:
            value = int(self._first_bad.item())
            self.known_step = value if value >= 0 else None
        return self.known_step

    def record(self) -> dict[str, Any] | None:
        """For the audit: None when every watched value was finite."""
        step = self.first_step()
        if step is None:
            return None
        assert self._where is not None and self._first_loss is not None and self._last_loss is not None
        first, last = float(self._first_loss.item()), float(self._last_loss.item())
        return {
            "first_step": step,
            "seen_in": "the loss" if int(self._where.item()) == 0 else "the trained weights after the optimizer step",
            "first_finite_loss": None if math.isnan(first) else first,
            "last_finite_loss": None if math.isnan(last) else last,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"first_step": self.first_step(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.known_step = state.get("first_step")
        self.optimizer_steps = int(state.get("optimizer_steps", 0))


def optimizer_watch(watch: DivergenceWatch, *, counts_steps: bool = True) -> Callable[..., None]:
    """A post-step hook for ``torch.optim.Optimizer.register_step_post_hook`` that watches the
    trained weights (groups at lr 0 are frozen and skipped) and, with ``counts_steps``, counts
    the training steps (one optimizer of a host that steps two per step counts them)."""
    if counts_steps:
        watch.watching_optimizer = True

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if counts_steps:
            watch.optimizer_steps += 1
        trained = [p for g in optimizer.param_groups if not _frozen(g) for p in g["params"]]
        watch.observe_weights(trained, watch.optimizer_steps)

    return after_step


def _frozen(group: dict[str, Any]) -> bool:
    # a tensor lr (torchao) is never read here: that could be a sync per step
    lr = group.get("lr")
    return isinstance(lr, (int, float)) and lr == 0
