"""The EveryDream2 host at run time: what the plugin's constructor sets up, and the audit.

EveryDream2 builds its plugins (train.json ``"plugins"``) with no arguments, inside train.py's
``main()``, after the models, the noise scheduler and the attention are set up and before the
dataset, the optimizer and the first validation pass. No hook is ever given ``args``, so the
constructor reads what it needs from ``main()``'s own variables (``args``, ``log_folder``,
``noise_scheduler``, ``unet``, ``text_encoder``, ``tokenizer``: found by walking up to the frame
of ``__main__.main``; the version check names any that is missing) and then, before anything
else of EveryDream2 runs:

- checks EveryDream2's settings against the preset (``reconcile.py``): its own versions of the
  preset's tricks are switched off in ``args`` (read by the closure and the dataset later) or
  the run is refused;
- binds the plan to EveryDream2's noise scheduler and seed;
- wraps that scheduler instance's ``add_noise`` (``step_hooks``), replaces how
  ``EveryDreamOptimizer`` builds its optimizers (the preset's, through ``plan.optimizer``) and
  installs the preset's attention in the UNet.

Every change goes through one ``Session`` (``undo()`` restores all). ``audit.json`` is written
into EveryDream2's log folder at the end of training and again at exit (a refusal or a crash
too); a run with problems exits non-zero after EveryDream2 saved what it trained. A refusal,
or any sdplug error that stops the run, is shown as its message, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from sdplug.errors import SdplugError
from sdplug.hosts.everydream.flags import KEYS
from sdplug.hosts.everydream.optimizer_hook import install as install_optimizer
from sdplug.hosts.everydream.optimizer_hook import watch_own as watch_own_optimizers
from sdplug.hosts.everydream.patching import is_patched
from sdplug.hosts.everydream.reconcile import reconcile
from sdplug.hosts.everydream.step_hooks import StepHooks
from sdplug.hosts.everydream.version import EverydreamVersion, check_runtime, detect
from sdplug.hosts.lifecycle import HostLifecycle
from sdplug.log import logger, show_messages
from sdplug.plan import Plan, bind
from sdplug.preset import Preset, load_preset
from sdplug.strategies.timesteps import UniformTimesteps

HOST_NAME = "EveryDream2"
ACTIVE: list[EverydreamHost] = []  # the hosts this process started (tests undo them)
PRESET_KEY = "sdplug_preset"  # the train.json key; the environment's SDPLUG_PRESET otherwise


class EverydreamHost:
    def __init__(self, preset: Preset, version: EverydreamVersion, main_locals: dict[str, Any], *, patched: bool = False):
        self.preset, self.version = preset, version
        self.patched = patched  # train.py takes a plugin's sdplug_loss (sdplug patch everydream)
        # the preset's [loss] replaces EveryDream2's loss block; without [loss] its own loss stays
        self.loss_through_patch = patched and preset.loss is not None
        self.args = main_locals["args"]
        self.log_folder = str(main_locals["log_folder"])
        self.scheduler, self.unet = main_locals["noise_scheduler"], main_locals["unet"]
        self.text_encoder, self.tokenizer = main_locals["text_encoder"], main_locals["tokenizer"]
        self.lifecycle = HostLifecycle(HOST_NAME)  # the plan, its failure watch and audit
        self.session = self.lifecycle.session
        self.rules: list[str] = []
        self.keys: dict[str, str] = {}
        self.optimizer_record: dict[str, Any] = {}
        self.steps = StepHooks(self)
        self.exit_on_problems = False  # the real plugin: a run with problems exits non-zero

    @property
    def plan(self) -> Plan | None:
        return self.lifecycle.plan

    # -- the constructor's work ---------------------------------------------------------------
    def configure(self, defaults: dict[str, Any]) -> None:
        args, preset = self.args, self.preset
        result = reconcile(preset, vars(args), defaults, loss_reachable=self.patched)
        for name, value in result.changes.items():
            setattr(args, name, value)  # the closure and the dataset read args after this
        self.rules += result.rules
        self.keys = result.keys
        if self.loss_through_patch:
            self.rules.append(
                "loss: the patched train.py returns the preset's [loss] and weighting per sample times loss_scale "
                "(EveryDream2's loss block and min-SNR are not run)"
            )
        if preset.caption:
            self.rules.append(
                "caption decisions: every sample, in the training process (on_step_start); per-image cond_dropout does not apply"
            )
        self.lifecycle.bind(self._build_plan())
        self.check_schedule()
        if result.enable_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.text_encoder.gradient_checkpointing_enable()
        if preset.noise or preset.timesteps or preset.loss_weighting is not None:
            original = self.scheduler.add_noise
            hooks = self.steps

            def add_noise(original_samples, noise, timesteps):
                return hooks.add_noise(original, original_samples, noise, timesteps)

            self.session.replace(self.scheduler, "add_noise", add_noise)
        optimizer_class = sys.modules["optimizer.optimizers"].EveryDreamOptimizer
        if preset.optimizer is not None:
            install_optimizer(self, optimizer_class)
        else:
            watch_own_optimizers(self, optimizer_class)
        if preset.attention is not None:
            self.lifecycle.bound().attention(self.unet)
        for rule in self.rules:
            logger.info(rule)

    def _build_plan(self) -> Plan:
        """The preset on EveryDream2's training scheduler, prediction type and seed; with no
        [timesteps], EveryDream2's own range carries over into the plan's uniform draw."""
        args = self.args
        prediction = str(getattr(self.scheduler.config, "prediction_type", "epsilon")).replace("-", "_")
        end = int(args.timestep_end)
        default = UniformTimesteps(min_timestep=int(args.timestep_start), max_timestep=end)
        return bind(
            self.preset,
            self.scheduler,
            seed=int(args.seed),
            rank=self.lifecycle.rank,
            prediction_type=prediction,
            default_timesteps=default,
        )

    def check_schedule(self) -> None:
        self.lifecycle.check_schedule(
            self.scheduler.alphas_cumprod,
            "EveryDream2's training noise scheduler is not the schedule the preset was bound to (with "
            "schedule.zero_terminal_snr the preset rescales it; set enable_zero_terminal_snr in train.json alike).",
        )

    # -- the audit ------------------------------------------------------------------------------
    def host_record(self) -> dict[str, Any]:
        assert self.plan is not None
        return {
            "version": self.version.name,
            "rules": self.rules,
            "everydream_keys": self.keys,
            "prediction_type": self.plan.prediction_type,
            "patched": self.patched,
            "loss_route": "patched train.py (plan.loss)" if self.loss_through_patch else "EveryDream2's loss, loss_scale",
            "validation_calls": self.steps.validation_calls,
            "training_noise_calls": self.steps.training_calls,
            **({"optimizer_groups": self.optimizer_record} if self.optimizer_record else {}),
        }

    def write_audit(self) -> Path:
        path = self.lifecycle.write_audit(self.log_folder, self.host_record())
        logger.info(f"audit ({path}):\n{self.lifecycle.bound().summary()}")
        return path

    def at_exit(self) -> None:
        path = self.write_audit()
        if self.exit_on_problems:  # EveryDream2 has saved what it trained; its process ends here
            self.lifecycle.exit_if_problems(path)

    def watch(self) -> None:
        """Record an exception that stops EveryDream2 (the audit says so; an sdplug error is shown as
        its message, not a traceback); write the audit at exit."""
        self.lifecycle.watch(at_exit=self.at_exit)


class _ReportedErrorsQuiet:
    """``sys.excepthook`` while a reported refusal propagates: nothing more for it, the previous
    hook for anything else."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, kind: Any, value: BaseException, traceback: Any) -> None:
        if not getattr(value, REPORTED, False):
            self.previous(kind, value, traceback)


REPORTED = "sdplug_reported"  # set on an error whose message was logged already


def leave_out_traceback(error: SdplugError) -> None:
    """A refusal propagates out of EveryDream2's ``main()`` (its caller may catch it: a test, an
    embedding); uncaught, Python would print its traceback through EveryDream2's and the
    plugin's code after the message, which already names the file, the key and what is allowed.
    The hook that stops that outlives the undone session: it acts when the process ends."""
    setattr(error, REPORTED, True)
    if not isinstance(sys.excepthook, _ReportedErrorsQuiet):
        sys.excepthook = _ReportedErrorsQuiet(sys.excepthook)


def main_locals(frame: FrameType | None) -> dict[str, Any] | None:
    """The variables of EveryDream2's running ``main()`` (``__main__.main``), found up the stack."""
    code = getattr(getattr(sys.modules.get("__main__"), "main", None), "__code__", None)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return dict(frame.f_locals)
        frame = frame.f_back
    return None


def parser_defaults() -> dict[str, Any]:
    """EveryDream2's argparse defaults of the trick keys (its parser is train.py's ``argparser``)."""
    parser = getattr(sys.modules.get("__main__"), "argparser", None)
    if parser is None:
        return {key.name: key.default for key in KEYS}
    return {key.name: parser.get_default(key.name) for key in KEYS}


def start(frame: FrameType | None, *, exit_on_problems: bool = True) -> EverydreamHost:
    """What the plugin's constructor does; a refusal writes its audit in the log folder and raises."""
    show_messages()
    found = main_locals(frame)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    root = Path(main_file).resolve().parent if main_file else Path.cwd()
    preset = version = None
    try:
        version = detect(root)
        check_runtime(found, sys.modules, version)
        assert found is not None
        reference = getattr(found["args"], PRESET_KEY, None) or os.environ.get("SDPLUG_PRESET")
        if not reference:
            raise SdplugError(
                f'the sdplug plugin needs a preset: "{PRESET_KEY}": "my.toml" in train.json, or SDPLUG_PRESET=my.toml.'
            )
        preset = load_preset(reference)
        host = EverydreamHost(preset, version, found, patched=is_patched(root))
        try:
            host.configure(parser_defaults())
        except BaseException:
            host.session.undo()
            raise
    except SdplugError as exc:
        folder = found.get("log_folder") if found else None
        known: dict[str, Any] = {"version": version.name if version else None, "rules": []}
        HostLifecycle(HOST_NAME).write_refusal(str(folder) if folder else None, exc, known, preset)
        logger.error(f"error: {exc}")
        leave_out_traceback(exc)
        raise
    host.exit_on_problems = exit_on_problems
    host.watch()
    ACTIVE.append(host)
    host.session.on_undo(lambda: ACTIVE.remove(host) if host in ACTIVE else None)
    logger.info(f"preset {preset.name!r} on EveryDream2 {version.name} (log folder {host.log_folder})")
    return host
