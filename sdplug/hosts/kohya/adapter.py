"""The kohya adapter: hooks that route sd-scripts' tricks through one sdplug plan.

Installed by ``runtime`` (the launcher's route and the patched scripts'). Hooks, all in
``library.train_util`` / ``library.custom_train_functions``:

- ``read_config_from_file`` (right after parsing arguments, before any model loads): checks
  what the user wrote (``command_line.py``) against the preset (``flags.py``,
  ``reconcile.py``) and the model's declared prediction type (``model_prediction.py``), then
  configures.
- ``get_noise_noisy_latents_and_timesteps``: noise, timesteps and the model input from the
  plan (input perturbation reaches the model input only).
- ``apply_snr_weight``: kohya calls it on the per-sample loss when ``min_snr_gamma`` is set;
  the adapter sets a marker value there so the preset's weighting runs in its place.
- ``get_optimizer``: the preset's optimizer, with a learned weighting's parameters added.
- ``replace_unet_modules``: the preset's attention through kohya's own switches.
- ``BaseDataset.process_caption``: the preset's caption transforms after kohya's own text
  handling (prefixes, wildcards).
- ``get_sai_model_spec``: the resolved preset joins every saved model's metadata.
- ``BaseDataset.__getitem__`` and the dataset's text-encoder caching method: with cached
  text-encoder outputs (SDXL scripts) there is no caption text, so dropout replaces a dropped
  sample's cached rows with the empty caption's outputs (see ``cached_text``).
- ``conditional_loss`` (``[loss]``), main's ``get_optimizer_train_eval_fn`` (schedule-free
  optimizers): ``step_hooks``; ``[ema]``'s twin of each saved network: ``ema_save``; the
  ``ss_*`` metadata of each saved network, made to say what the preset ran: ``saved_metadata``.

Each hook translates kohya's calling convention and calls the plan; what kohya itself needs
lives in the modules beside this one. Every change to the process goes through the adapter's
``Session`` (``sdplug/hosts/session.py``), whose ``undo()`` restores every hooked function, rebound script
name, ``sys.excepthook`` and the ``atexit`` handler.

At exit the plan's audit is written to ``output_dir/audit.json`` (a refused run's too, the
refusal in ``problems``); captions count once their batch trains (``caption_hooks``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from sdplug import __version__ as sdplug_version
from sdplug.errors import SdplugError
from sdplug.hosts.kohya import audits, ema_save, model_prediction, saved_metadata, step_hooks
from sdplug.hosts.kohya.attention_switch import switch_attention
from sdplug.hosts.kohya.caption_hooks import CaptionHooks
from sdplug.hosts.kohya.command_line import written_flags
from sdplug.hosts.kohya.network_saves import wrap_saves
from sdplug.hosts.kohya.reconcile import (
    PresetWeightingMarker,
    check_conflicts,
    check_dataset_config,
    check_sections_apply,
    reconcile,
)
from sdplug.hosts.kohya.version import KohyaVersion, check_hooks
from sdplug.hosts.lifecycle import HostLifecycle
from sdplug.hosts.session import Session
from sdplug.log import logger
from sdplug.plan import Plan, bind
from sdplug.plan.runs_here import check_memory_runs_here
from sdplug.preset import Preset
from sdplug.schedule import rescale_zero_terminal_snr, scaled_linear_alphas_cumprod
from sdplug.strategies.timesteps import UniformTimesteps


class KohyaAdapter:
    def __init__(self, preset: Preset, version: KohyaVersion, script: str):
        self.preset, self.version, self.script = preset, version, script
        self.args = None
        self.lifecycle = HostLifecycle(audits.HOST_NAME)  # the plan, its failure watch and audit
        self.session = self.lifecycle.session  # every change to the process, and its undo
        self.originals: dict[tuple[Any, str], Any] = {}
        self.rules: list[str] = []
        self.writes_audit = False  # configure ran: an audit (or a refusal) will be written
        self.rank = self.lifecycle.rank
        self.defaults: dict[str, Any] = {}
        self.configured_range: tuple[Any, Any] = (None, None)  # kohya's --min/--max_timestep
        self.captions = CaptionHooks(self)
        # a flow script's cached layout by text encoder (cached_text.ENCODER_SLOTS), when it caches
        self.encoder_slots: dict[str, Any] | None = None
        self.validating = False  # the current noise/weight calls are main's validation, not a step
        self.timesteps: torch.Tensor | None = None  # what the step's noise call drew: the loss hook's per-sample thresholds
        self.flag_record: dict[str, Any] = {}
        self.model_prediction: dict[str, str] | None = None  # what the model's scheduler config declares

    @property
    def plan(self) -> Plan | None:
        return self.lifecycle.plan

    @plan.setter
    def plan(self, plan: Plan | None) -> None:
        self.lifecycle.plan = plan

    # -- installation -----------------------------------------------------------------------
    def install(self, train_util, custom_train_functions) -> Session:
        """Replace the hooked functions (all present, or nothing is touched); the session undoes it."""
        check_hooks({"library.train_util": train_util, "library.custom_train_functions": custom_train_functions}, self.version)
        self._train_util, self._custom = train_util, custom_train_functions
        try:
            self._replace(train_util, "read_config_from_file", self._read_config_hook)
            self._replace(train_util, "get_noise_noisy_latents_and_timesteps", self._noise_hook)
            self._replace(train_util, "get_optimizer", self._optimizer_hook)
            self._replace(train_util, "replace_unet_modules", self._attention_hook)
            self._replace(custom_train_functions, "apply_snr_weight", self._weight_hook)
            self._replace(train_util, "get_sai_model_spec", self._model_spec_hook)
            self._replace(train_util, "conditional_loss", self._loss_hook)
            if hasattr(train_util, "get_optimizer_train_eval_fn"):  # main: train/eval around sampling and saving
                self._replace(train_util, "get_optimizer_train_eval_fn", self._train_eval_hook)
            self.captions.install(train_util, self.version.text_cache_method)
        except BaseException:
            self.session.undo()  # never a half-hooked sd-scripts
            raise
        return self.session

    def _replace(self, owner, name: str, replacement) -> None:
        self.originals[(owner, name)] = self.session.replace(owner, name, replacement)

    def original(self, owner, name: str):
        return self.originals[(owner, name)]

    def rebind_script_globals(self, script_globals: dict[str, Any], custom_train_functions) -> None:
        """A running (patched) script imported hooked functions by name: point them here.

        sdxl_train_network runs train_network's loop, so that module's names are rebound too.
        """
        original = self.original(custom_train_functions, "apply_snr_weight")
        loaded = sys.modules.get("train_network")
        for namespace in (script_globals, getattr(loaded, "__dict__", {})):
            if namespace.get("apply_snr_weight") is original:
                self.session.rebind(namespace, "apply_snr_weight", self._weight_hook)

    # -- configuration ----------------------------------------------------------------------
    def _read_config_hook(self, args, parser):
        args = self.original(self._train_util, "read_config_from_file")(args, parser)
        self.configure(args, parser)
        return args

    def configure(self, args, parser) -> None:
        """Check the command line against the preset, then bind the plan (before any model loads).

        A refusal writes its audit (in ``--output_dir``) before it propagates."""
        self.lifecycle.watch()
        self.args, self.writes_audit = args, True
        try:
            self._configure(args, parser)
        except Exception as exc:
            audits.write_refusal(self, exc)
            raise
        self.session.at_exit(self.write_audit)

    def _configure(self, args, parser) -> None:
        preset, version = self.preset, self.version.name
        values = vars(args)
        self.defaults = {name: parser.get_default(name) for name in values} if parser is not None else {}
        # what the user wrote (kohya parsed sys.argv; both routes configure in the script's process)
        written = written_flags(parser, args, sys.argv[1:])
        self.model_prediction = model_prediction.check_prediction_type(args)
        check_conflicts(preset, version, values, self.defaults, written=written)
        check_memory_runs_here(preset)  # [memory] becomes kohya's arguments: refuse what cannot run here
        check_dataset_config(preset, values.get("dataset_config"), self.defaults)
        if preset.schedule.zero_terminal_snr and not getattr(args, "zero_terminal_snr", False):
            args.zero_terminal_snr = True  # kohya rescales its training scheduler; the plan rescales alike
            self.rules.append("--zero_terminal_snr -> True (preset [schedule] zero_terminal_snr)")
        self.lifecycle.bind(self._build_plan(args))
        check_sections_apply(self.plan, self.version.name, self.script)
        ema_save.install(self, args)  # [ema]: a twin beside every network file kohya saves
        saved_metadata.install(self, args)  # every network file's ss_* keys say what the preset ran
        if getattr(args, "network_module", None):  # outermost: no file at all from non-finite weights
            wrap_saves(self, args.network_module, lambda network, save: self._finite_save(save))
        # the lr every trained group gets: the preset's, or Prodigy's / D-Adaptation's own 1.0
        lr = self.lifecycle.bound().preset_lr()
        result = reconcile(preset, version, values, self.defaults, script=self.script, lr=lr, written=written)
        for name, value in result.changes.items():
            setattr(args, name, value)
        self.rules += result.rules
        self.flag_record = {"kohya_flags": result.flags}
        if result.unclassified:
            self.flag_record["unclassified_flags"] = result.unclassified
            self.rules.append(
                f"flags not in sdplug's kohya flag table, left to kohya: {', '.join('--' + n for n in result.unclassified)}"
            )
        self.configured_range = (getattr(args, "min_timestep", None), getattr(args, "max_timestep", None))
        for rule in self.rules:
            logger.info(rule)

    def _build_plan(self, args) -> Plan:
        """The preset on kohya's schedule: Stable Diffusion's (rescaled as kohya rescales it with
        --zero_terminal_snr), its prediction type, and random streams from its --seed."""
        alphas = scaled_linear_alphas_cumprod()
        if getattr(args, "zero_terminal_snr", False):
            alphas = rescale_zero_terminal_snr(alphas)
        prediction = "v_prediction" if getattr(args, "v_parameterization", False) else "epsilon"
        seed = int(getattr(args, "seed", None) or 0)
        # the noise hook replaces kohya's whole noise function, timestep draw included: with no
        # [timesteps], kohya's own range carries over into the plan's uniform draw
        kohya_range = UniformTimesteps(min_timestep=args.min_timestep or 0, max_timestep=args.max_timestep)
        return bind(
            self.preset,
            alphas_cumprod=alphas,
            prediction_type=prediction,
            seed=seed,
            rank=self.rank,
            default_timesteps=kohya_range,
        )

    def record_failure(self, exc: BaseException) -> None:
        self.lifecycle.record_failure(exc)  # configured: the audit of the run says what stopped it

    # -- hooks: kohya's calling convention in, the plan's calls out ------------------------------
    def _check_schedule(self, noise_scheduler) -> None:
        self.lifecycle.check_schedule(
            getattr(noise_scheduler, "alphas_cumprod", None),
            "sd-scripts' noise scheduler is not the Stable Diffusion schedule sdplug bound the preset to "
            "(scaled_linear, 1000 steps); refusing to weight or noise it wrongly.",
        )

    def _validating(self, args) -> bool:
        """sd-scripts main validates by pinning every sample to one timestep (min = max): not a step."""
        pinned = getattr(args, "min_timestep", None)
        return pinned is not None and pinned == getattr(args, "max_timestep", None) and pinned != self.configured_range[0]

    def _noise_hook(self, args, noise_scheduler, latents):
        assert self.plan is not None  # hooks run after configure built it
        self.validating = self._validating(args)
        if not self.validating:
            # kohya reads every step's loss back (its loss log), so the device is already waited
            # for: reading the plan's watch here stops a diverged run at the next step
            self.stop_if_diverged("training on")
            self.plan.step()  # kohya draws noise once per training step
            self.captions.commit()  # the batch this step trains on
        if not (self.preset.noise or self.preset.timesteps):
            kohya = self.original(self._train_util, "get_noise_noisy_latents_and_timesteps")(args, noise_scheduler, latents)
            self.timesteps = kohya[2]
            return kohya
        self._check_schedule(noise_scheduler)
        if self.validating:
            draw, timesteps = self._validation_draw(latents, int(args.min_timestep))
        else:
            timesteps = self.plan.timesteps(latents.shape[0], device=latents.device)
            draw = self.plan.noise(latents, timesteps=timesteps)
        self.timesteps = timesteps
        result = (draw.target, self.plan.noisy_input(latents, draw, timesteps), timesteps)
        return result + (1,) if self.version.noise_returns == 4 else result  # v0.8.7: huber_c, unused by l2

    def _validation_draw(self, latents, timestep: int):
        """main's validation: the preset's noise at kohya's pinned timestep, from the plan's
        validation streams and kept out of the audit (no training step)."""
        assert self.plan is not None  # hooks run after configure built it
        timesteps = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
        with self.plan.validation():
            return self.plan.noise(latents, timesteps=timesteps), timesteps

    def _train_eval_hook(self, optimizer, args):
        original = self.original(self._train_util, "get_optimizer_train_eval_fn")
        return step_hooks.train_eval_switch(self, original, optimizer, args)

    def _loss_hook(self, model_pred, target, *args, **kwargs):
        original = self.original(self._train_util, "conditional_loss")
        return step_hooks.conditional_loss(self, original, model_pred, target, args, kwargs)

    def _weight_hook(self, loss, timesteps, noise_scheduler, gamma, v_prediction=False):
        if not isinstance(gamma, PresetWeightingMarker):
            return self.original(self._custom, "apply_snr_weight")(loss, timesteps, noise_scheduler, gamma, v_prediction)
        assert self.plan is not None  # a marker exists only once configure built the plan
        self._check_schedule(noise_scheduler)
        if bool(v_prediction) != (self.plan.prediction_type == "v_prediction"):
            raise SdplugError(f"kohya passed v_prediction={v_prediction} but the preset was bound to {self.plan.prediction_type}")
        timesteps = timesteps.to(loss.device)
        if self.validating:  # a validation loss: weighted alike, not a training call for the audit
            with self.plan.validation():
                return self.plan.weight(loss, timesteps)
        return self.plan.weight(loss, timesteps)

    def _optimizer_hook(self, args, trainable_params):
        assert self.plan is not None  # hooks run after configure built it
        built: dict[str, Any] = {}

        def kohya_optimizer(params):  # the preset names none: kohya's own, from its arguments
            built["kohya"] = self.original(self._train_util, "get_optimizer")(args, params)
            return built["kohya"][-1]

        # learned weighting into the first trained group: sd-scripts main indexes its lr
        # descriptions by group, and v0.8.7 keeps a group at lr 0 for --text_encoder_lr 0;
        # with no lr in the preset, kohya's --learning_rate (and its per-group lrs) stay in charge
        optimizer = self.plan.optimizer(
            list(trainable_params), default=kohya_optimizer, host_lr=args.learning_rate, learned_group="first"
        )
        learned = {id(p) for p in self.plan.trainable_parameters()}
        self.plan.ema([p for g in optimizer.param_groups if g.get("lr") != 0 for p in g["params"] if id(p) not in learned])
        spec = self.plan.optimizer_spec
        if spec is None:
            return built["kohya"]
        lr = self.plan.preset_lr()
        if lr is not None:
            why = "preset [optimizer] lr" if "lr" in spec.params else f"{spec.type!r} adapts its own step size: its lr multiplier"
            self.rules.append(f"every parameter group's lr -> {lr:g}, except groups at lr 0 ({why})")
            logger.info(self.rules[-1])
        return (f"sdplug:{spec.type}", json.dumps(dict(spec.params)), optimizer)  # kohya's (name, args, optimizer)

    def _attention_hook(self, unet, mem_eff_attn, xformers, sdpa):
        replace = self.original(self._train_util, "replace_unet_modules")
        if self.preset.attention is None:
            return replace(unet, mem_eff_attn, xformers, sdpa)
        # kohya's UNet takes no diffusers attention processors: the preset's attention goes
        # through kohya's own switches. The plan checked it can run here, and records it.
        assert self.plan is not None  # hooks run after configure built it
        self.plan.attention(unet, install=lambda kind: switch_attention(replace, unet, kind))

    def _model_spec_hook(self, *args, **kwargs):
        spec = self.original(self._train_util, "get_sai_model_spec")(*args, **kwargs)
        if getattr(self.args, "no_metadata", False):
            return spec
        # saved weights say how they were trained: the resolved preset (a network's ss_* keys are
        # rewritten to what ran by saved_metadata)
        spec["sdplug_preset"] = self.preset.to_toml()
        spec["sdplug_version"] = sdplug_version
        return spec

    def stop_if_diverged(self, doing: str) -> None:
        """Stop sd-scripts once a loss or the trained weights went non-finite (the plan's watch)."""
        if self.plan is not None:
            self.plan.stop_if_diverged(
                f"sdplug stopped sd-scripts instead of {doing} non-finite weights; the network files it saved before "
                "that step are finite."
            )

    def _finite_save(self, save: Any) -> Any:
        def save_weights(file, dtype, metadata):
            self.stop_if_diverged(f"saving {Path(file).name} from")
            save(file, dtype, metadata)

        return save_weights

    def write_audit(self) -> Path | None:
        return audits.write_run(self)
