"""What every host adapter does around the plan, in one place: the lifecycle of a run with a preset.

A host (kohya sd-scripts, EveryDream2, a diffusers example script) translates its own calling
convention into the plan's calls; around those calls every host does the same things, here:

- ``HostLifecycle.bind``: the plan, built for this process's rank (``launcher_rank``: one rule
  for every launcher);
- ``check_schedule``: the host's training schedule is the one the plan was bound to, checked
  once, refused otherwise;
- ``watch``: an exception that stops the host is recorded in the plan (the audit then says what
  stopped the run) and an sdplug error is shown as its message, not a traceback; the audit is
  written at exit. Both through the host's ``Session``, so ``undo()`` takes them out again;
- ``write_audit`` / ``write_refusal``: ``audit.json`` through the one writer
  (``sdplug.plan.audit_file``), the plan's report, or a refusal's audit when no plan was bound yet;
- ``problems_exit_status`` / ``exit_if_problems``: the problems policy, the same in every host:
  the run kept what it trained, the audit lists the problems and the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdplug.errors import SdplugError
from sdplug.hosts.session import Session
from sdplug.log import logger
from sdplug.plan.audit_file import REFUSED, write_refusal

if TYPE_CHECKING:
    import torch

    from sdplug.plan import Plan
    from sdplug.preset import Preset


def launcher_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's rank as every launcher sets it: ``RANK`` (torchrun, accelerate), then
    ``LOCAL_RANK`` (a launcher that sets only that), then 0 (a single process)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise SdplugError(f"the environment's {name}={value!r} is not a process rank (a whole number).") from None
    return 0


def refused(message: object) -> str:
    """The problem a refusal puts first in the audit."""
    return f"{REFUSED}{message}"


def problems_exit_status(problems: list[str]) -> tuple[int, str | None]:
    """The problems policy of a launcher whose script returned: exit status 1 and the error line
    its launcher prints when the audit found problems, else 0 and None."""
    if not problems:
        return 0, None
    return 1, f"error: the run finished, but the audit found strategies that did not apply: {'; '.join(problems)}"


class HostLifecycle:
    """One host run's plan, its failure watch and its audit; ``name`` is the audit's host name."""

    def __init__(self, name: str, session: Session | None = None) -> None:
        self.name = name
        self.session = session if session is not None else Session()
        self.rank = launcher_rank()  # read once: every audit file and stream of this run uses it
        self.plan: Plan | None = None
        self.schedule_checked = False

    def bind(self, plan: Plan) -> Plan:
        self.plan = plan
        return plan

    def bound(self) -> Plan:
        if self.plan is None:
            raise SdplugError(f"{self.name}: a training hook ran before the preset was bound to the model (a hook out of order).")
        return self.plan

    def check_schedule(
        self, alphas_cumprod: torch.Tensor | None, refusal: str, *, error: type[SdplugError] = SdplugError
    ) -> None:
        """Refuse (``refusal``: what differs and what to change; ``error``: the host's kind of
        refusal) a host schedule that is not the plan's; checked on the first call only."""
        if self.schedule_checked:
            return
        if alphas_cumprod is None or not self.bound().matches_schedule(alphas_cumprod):
            raise error(refusal)
        self.schedule_checked = True

    # -- failures -----------------------------------------------------------------------------
    def record_failure(self, exc: BaseException) -> bool:
        """What stopped the run, for the audit; False when no plan was bound yet."""
        if self.plan is None:
            return False
        self.plan.record_failure(exc)
        return True

    def watch(self, at_exit: Callable[[], Any] | None = None) -> None:
        """Record an exception that stops the host and show an sdplug error as its message (it
        names the file, the key and what is allowed), anything else as Python would; run
        ``at_exit`` (the audit) when the process ends."""
        previous = sys.excepthook

        def excepthook(kind: Any, value: BaseException, traceback: Any) -> None:
            self.record_failure(value)
            if isinstance(value, SdplugError):
                logger.error(f"error: {value}")
            else:
                previous(kind, value, traceback)

        self.session.set_excepthook(excepthook)
        if at_exit is not None:
            self.session.at_exit(at_exit)

    # -- the audit ------------------------------------------------------------------------------
    def write_audit(self, output_dir: str | Path, host: dict[str, Any], **options: Any) -> Path:
        """The plan's audit (``host``: what only the host knows, its name added)."""
        return self.bound().write_audit(output_dir, host={"name": self.name, **host}, **options)

    def write_refusal(
        self, output_dir: str | Path | None, message: object, host: dict[str, Any], preset: Preset | None = None
    ) -> Path | None:
        """The audit of a run refused before its first step (nothing, without an output folder),
        whether or not a plan was bound: ``audit_file.write_refusal``, the refusal its one
        problem and the preset's strategies (none when the preset itself was refused)."""
        if not output_dir:
            return None
        return write_refusal(output_dir, refused(message), host={"name": self.name, **host}, preset=preset, rank=self.rank)

    def exit_if_problems(self, audit_path: Path) -> None:
        """The problems policy where the host's own code ends the process (no launcher returns
        to set the status): a run that ended with problems, but not by an exception, exits 1."""
        plan = self.plan
        if plan is None or plan.failure is not None or not plan.report()["problems"]:
            return
        logger.error(f"the run had problems (see {audit_path}); exiting with status 1")
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(1)
