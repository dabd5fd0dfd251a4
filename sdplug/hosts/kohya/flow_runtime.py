"""The kohya adapter on sd-scripts main's flow scripts (``version.FLOW_ROUTES``: FLUX.1 and Chroma,
SD3, Lumina 2, HunyuanImage 2.1, Anima): the same plan calls as every host, at the moments their
step has (``_HOOKS`` says which library function each script's step goes through).

The five steps differ in three places:
- the draw: FLUX's ``flux_train_utils`` function (FLUX, HunyuanImage, Anima), SD3's (no scheduler
  argument), Lumina's (the same signature as FLUX's); every one returns ``sigma * 1000`` as
  kohya's timesteps (Lumina's script gives its model ``1 - t / 1000`` itself, HunyuanImage's
  truncates to integers);
- the output: read by ``apply_model_prediction_type`` (FLUX, HunyuanImage, Lumina: read raw with
  a preset, the plan's per-sample weights returned as kohya's ``weighting``), or preconditioned
  inline (SD3: ``x_t - sigma * output`` against the latents, the process's ``sigma_scaled``
  output, so the plan's weights are x0 weights) and weighted by ``compute_loss_weighting_for_sd3``
  (Anima: ``compute_loss_weighting_for_anima``, velocity weights), which the adapter hooks
  (kohya's own weighting stands when the preset sets none);
- the target: ``noise - latents``, SD3's latents, Lumina's ``latents - noise`` (the process's
  ``velocity_reversed``).

Under ``--mixed_precision bf16`` kohya's draw returns its timesteps in the weight dtype, so the
model is given ``sigma * 1000`` rounded to bf16 (711.78 becomes 712.0) while ``x_t`` is built
from the float32 sigma. The adapter keeps that split: the model time goes back to kohya in its
dtype, as kohya's own draw returns it, and the plan records, weights and thresholds by its own
sigma (float32, the one ``x_t`` and the target are made of), never by the rounded time.

FLUX's trainer (the others alike) draws its noise inline (``torch.randn_like``) and hands it to
``flux_train_utils.get_noisy_model_input_and_timesteps``, which draws sigma and builds the model
input; ``apply_model_prediction_type`` reads the output and may return a weighting, which the
base ``process_batch`` multiplies into the elementwise loss; ``post_process_loss`` returns the
loss unchanged. So the adapter hooks the two ``flux_train_utils`` functions, not
``torch.randn_like``:

- the draw: the plan's sigma (its timesteps, with the latent's size for a resolution-dependent
  shift) and the plan's noise, written into the tensor kohya passed in (kohya's target ``noise -
  latents`` reads that tensor), the model input from the plan (input perturbation reaches it
  alone); kohya's return convention (``x_t``, ``sigma * 1000``, ``sigma``);
- the output: read raw (the velocity against ``noise - latents``, what the plan's weights are
  written for; FLUX's default ``sigma_scaled`` compares ``x_t - sigma v`` with that velocity
  target, see ``sdplug.process``), with the plan's per-sample weights as kohya's ``weighting``;
- ``conditional_loss`` (``step_hooks``), the optimizer, attention, captions and saves: as on the
  SD scripts (``adapter.KohyaAdapter``).

The flags: each one the user wrote that the script ignores (``flow_flags.SCRIPT_EFFECTS``) is
reported, on the console and in ``host.kohya_flags``, never refused; one that acts and sets what
a preset section sets is refused (the SD scripts' table for the shared flags, ``FLOW_CONFLICTS``
for the flow scripts' own). Without ``[timesteps]``, kohya's own sampler is drawn by the plan, translated as
``from-kohya --script`` translates it, so every host draws one preset alike.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.hosts.host_flags import section_set
from sdplug.hosts.kohya import cached_text, ema_save, flag_check, flow_bridge, saved_metadata
from sdplug.hosts.kohya.adapter import KohyaAdapter
from sdplug.hosts.kohya.command_line import written_flags
from sdplug.hosts.kohya.flow_flags import (
    ANIMA,
    FLOW_CONFLICTS,
    FLOW_TRICKS,
    FLUX,
    HUNYUAN,
    LUMINA,
    MODEL_PATCH,
    SCRIPT_DEFAULTS,
    SD3,
    TEXT_ENCODERS,
    flow_setting_group,
    sections_set_by,
)
from sdplug.hosts.kohya.network_saves import wrap_saves
from sdplug.hosts.kohya.reconcile import KohyaConflictError, check_conflicts, check_loss_section, reconcile, user_set
from sdplug.log import logger
from sdplug.plan import Plan, bind
from sdplug.plan.runs_here import check_memory_runs_here
from sdplug.preset import parse_preset
from sdplug.process import DynamicShift, Flow, flow_sigmas
from sdplug.strategies.base import TimestepStrategy


class KohyaFlowAdapter(KohyaAdapter):
    """``KohyaAdapter`` with a flow script's draw and output (or weighting) hooks, bound to a rectified flow."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._flow_modules: dict[str, Any] = {}  # hooked function name -> its library module
        self.adapter_set: set[str] = set()  # arguments the adapter itself changed

    def install(self, train_util, custom_train_functions):
        session = super().install(train_util, custom_train_functions)
        try:
            for module_name, function, method in _HOOKS[self.script]:
                module = importlib.import_module(module_name)
                if not callable(getattr(module, function, None)):
                    raise SdplugError(f"sd-scripts' {module_name} has no {function}: not the tree sdplug knows.")
                self._flow_modules[function] = module
                self._replace(module, function, getattr(self, method))
        except BaseException:
            session.undo()
            raise
        return session

    # -- configuration ----------------------------------------------------------------------
    def _configure(self, args, parser) -> None:
        preset = self.preset
        values = vars(args)
        self.defaults = {name: parser.get_default(name) for name in values} if parser is not None else {}
        written = written_flags(parser, args, sys.argv[1:])
        ignored = flag_check.findings(self.script, values, written)
        for finding in ignored:  # reported, never refused: the script does nothing with them anyway
            verb = "ignores" if finding.effect == "ignored" else "fails on"
            logger.warning(f"{self.script} {verb} --{finding.flag}: {finding.why}. What does it: {finding.instead}")
        acting = set(written) - {f.flag for f in ignored}
        check_conflicts(preset, "main", {k: v for k, v in values.items() if k in acting}, self.defaults, written=acting)
        _check_flow_conflicts(preset, values, self.defaults, acting)
        check_memory_runs_here(preset)
        check_loss_section(preset)
        if any(function == "apply_model_prediction_type" for _, function, _ in _HOOKS[self.script]):
            self._read_output_raw(args, written)
        _check_sections(preset, self.script, args)
        if getattr(args, "cache_text_encoder_outputs", False):  # dropouts then act on each encoder's cached rows
            self.encoder_slots = cached_text.ENCODER_SLOTS.get(self.script)
        self.lifecycle.bind(self._build_plan(args))
        if preset.attention is not None and self.script in ATTENTION_MODES:  # kohya's --attn_mode switch
            self._switch_attention(args, written)
        elif preset.attention is not None:  # 'sdpa' (others were refused): what the model runs already
            self.lifecycle.bound().attention(torch.nn.Module(), install=_flux_attention)
        ema_save.install(self, args)
        saved_metadata.install(self, args)
        if getattr(args, "network_module", None):
            wrap_saves(self, args.network_module, lambda network, save: self._finite_save(save))
        result = reconcile(
            preset, "main", values, self.defaults, script=self.script, lr=self.lifecycle.bound().preset_lr(), written=acting
        )
        result.changes.pop("min_snr_gamma", None)  # no flow script calls apply_snr_weight: the weights go through a hook
        for name, value in result.changes.items():
            setattr(args, name, value)
        self.rules += result.rules
        flow_flags = _classify_flow_flags(preset, values, self.defaults, acting)
        self.flag_record = {
            "kohya_flags": {
                **result.flags,
                **flow_flags,
                **{f.flag: f"{f.effect} by {self.script}: {f.why}" for f in ignored},
            }
        }
        unclassified = [
            n for n in result.unclassified if n not in flow_flags and flow_setting_group(n) is None and n not in self.adapter_set
        ]
        if unclassified:
            self.flag_record["unclassified_flags"] = unclassified
            self.rules.append(
                f"flags not in sdplug's kohya flag tables, left to kohya: {', '.join('--' + n for n in unclassified)}"
            )
        self.configured_range = (getattr(args, "min_timestep", None), getattr(args, "max_timestep", None))
        for rule in self.rules:
            logger.info(rule)

    def _read_output_raw(self, args, written) -> None:
        """The output, read raw with a preset (FLUX, Lumina 2, HunyuanImage): FLUX's default
        sigma_scaled compares ``x_t - sigma * output`` with the velocity target (``sdplug.process``);
        a written choice other than raw, or an SD3 weighting that needs sigma_scaled, is refused
        rather than changed."""
        wanted = args.model_prediction_type
        if "model_prediction_type" in written and wanted != "raw":
            raise KohyaConflictError(
                f"{self.preset.path}: --model_prediction_type {wanted}: with a preset {self.script}'s output is read raw (the "
                "velocity against noise - x0, which the preset's weights are written for); sigma_scaled compares "
                "x_t - sigma * output with that velocity target and additive trains toward velocity - x_t. Remove the flag."
            )
        if "weighting_scheme" in written and args.weighting_scheme in ("sigma_sqrt", "cosmap"):
            raise KohyaConflictError(
                f"{self.preset.path}: --weighting_scheme {args.weighting_scheme} acts in {self.script} only through "
                f"--model_prediction_type sigma_scaled, which a preset reads raw: use [loss_weighting] type = "
                f"{args.weighting_scheme!r} (its x0 form, on the velocity loss). Remove the flag."
            )
        if wanted != "raw":
            self.rules.append(
                f"--model_prediction_type {wanted} ({self.script}'s default) -> raw (the preset's weights apply to the velocity "
                "loss; kohya's sigma_scaled compares x_t - sigma * output with the velocity target)"
            )
            args.model_prediction_type = "raw"
            self.adapter_set.add("model_prediction_type")  # not the user's: no flag to classify

    def _switch_attention(self, args, written) -> None:
        """HunyuanImage's and Anima's attention kernel, set through kohya's ``--attn_mode`` (read
        when the model loads, after this): a written ``--attn_mode`` next to ``[attention]`` is
        refused, as ``--xformers``/``--sdpa`` are by the shared table."""
        assert self.preset.attention is not None
        if "attn_mode" in written:
            raise KohyaConflictError(
                f"{self.preset.path}: --attn_mode {args.attn_mode} sets {self.script}'s attention kernel, which the "
                "preset's [attention] sets. Remove the flag or the section: sdplug never applies both."
            )
        before = "xformers" if getattr(args, "xformers", False) else "torch"
        mode = ATTENTION_MODES[self.script][self.preset.attention.type]
        args.attn_mode = mode
        self.adapter_set.add("attn_mode")
        self.rules.append(f"--attn_mode {mode} (the preset's [attention] {self.preset.attention.type!r}; kohya's own: {before})")
        record = {"changed": int(before != mode), "modules": f"the whole model: kohya's --attn_mode {before} -> {mode}"}
        self.lifecycle.bound().attention(torch.nn.Module(), install=lambda kind: record)

    def _build_plan(self, args) -> Plan:
        """The preset on a rectified flow of 1000 sigmas, shifted as kohya's own sampler shifts
        (``discrete_flow_shift`` with sigma or shift sampling; FLUX's resolution-dependent shift
        with flux_shift), and, without ``[timesteps]``, kohya's sampler drawn by the plan."""
        arguments = {**SCRIPT_DEFAULTS[self.script], **vars(args)}
        kohya: dict[str, Any] = {}
        schedule: dict[str, Any] = {}
        notes: list[str] = []
        if self.script == SD3:
            flow_bridge.sd3_timesteps(arguments, arguments, kohya, schedule, notes)
            sampling = (
                f"--weighting_scheme {arguments.get('weighting_scheme')} (--training_shift {arguments.get('training_shift')})"
            )
        else:
            flow_bridge.sampled_timesteps(self.script, arguments, kohya, schedule, notes)
            sampling = f"--timestep_sampling {arguments.get('timestep_sampling')} (--discrete_flow_shift {arguments.get('discrete_flow_shift')})"
        preset_draws = self.preset.timesteps is not None or self.preset.schedule.flow_shift != 1.0
        if preset_draws or self.preset.schedule.dynamic_shift:
            # the preset's own sampler and shift; a flag of kohya's for either was refused, so these are its defaults
            self.rules.append(f"kohya's {sampling} -> the preset's [timesteps] and [schedule]")
            schedule = {}
        # kohya's own flux_shift / nextdit_shift: FLUX's numbers over (h // 2) (w // 2) tokens, on every script
        dynamic = DynamicShift(patch_size=2) if schedule.get("dynamic_shift") else None
        # SD3's script preconditions its output (x_t - sigma * output against x0): the process's sigma_scaled
        output = "sigma_scaled" if self.script == SD3 else "raw"
        # Lumina 2's model takes 1 - sigma and predicts x0 - noise (kohya's target latents - noise)
        prediction = "velocity_reversed" if self.script == LUMINA else "velocity"
        process = Flow(
            flow_sigmas(1000),
            prediction,
            shift=float(schedule.get("flow_shift", 1.0)),
            dynamic=dynamic,
            output=output,
            patch_size=MODEL_PATCH[self.script],
        )
        default: TimestepStrategy | None = None
        lost = [note for note in notes if "not carried over" in note]
        if self.preset.timesteps is None and lost:  # kohya's own draw, which the plan cannot reproduce
            raise KohyaConflictError(
                f"{self.preset.path}: the preset names no [timesteps], so the plan draws {self.script}'s own sampler, "
                f"and cannot as written ({'; '.join(lost)}). Set [timesteps] in the preset, or change the flag."
            )
        if self.preset.timesteps is None:
            spec = parse_preset({"timesteps": kohya["timesteps"]}, path="kohya").timesteps
            default = spec.create() if spec is not None else None
            if not preset_draws:
                self.rules.append(f"kohya's {sampling} drawn by the plan as {kohya['timesteps']}, shift {schedule or 'none'}")
        return bind(
            self.preset,
            process=process,
            seed=int(getattr(args, "seed", None) or 0),
            rank=self.rank,
            default_timesteps=default,
            text_encoders=TEXT_ENCODERS[self.script],
        )

    # -- hooks ----------------------------------------------------------------------------------
    def _flux_draw_hook(self, args, noise_scheduler, latents, noise, device, dtype):
        return self._draw(args, latents, noise, dtype)

    def _sd3_draw_hook(self, args, latents, noise, device, dtype):
        return self._draw(args, latents, noise, dtype)

    def _draw(self, args, latents, noise, dtype):
        """The plan's sigma and noise in kohya's draw: kohya's noise tensor filled in place (its
        target reads it), ``(x_t, sigma * 1000, sigma)`` returned as kohya's draw returns them."""
        assert self.plan is not None  # hooks run after configure built it
        self.validating = self._validating(args)
        if self.validating:  # main's validation pins --min/--max_timestep (FLUX's own draw ignores them)
            pinned = min(max(int(args.min_timestep) - 1, 0), self.plan.num_train_timesteps - 1)  # sigma = t / 1000
            draw, timesteps = self._validation_draw(latents, pinned)
        else:
            self.stop_if_diverged("training on")
            self.plan.step()
            self.captions.commit()
            size = (int(latents.shape[-2]), int(latents.shape[-1]))
            timesteps = self.plan.timesteps(latents.shape[0], device=latents.device, latent_size=size)
            draw = self.plan.noise(latents, timesteps=timesteps)
        with torch.no_grad():
            noise.copy_(draw.target)  # kohya's target (noise - latents, or SD3's preconditioned x0) reads this tensor
        self.timesteps = timesteps
        # every kohya draw returns sigma * 1000 (Lumina 2's script gives its model 1 - t / 1000 itself)
        process = self.plan.process
        assert isinstance(process, Flow)  # _build_plan bound a flow
        sigma = process.sigmas.to(latents.device)[timesteps.long()]
        sigmas = sigma.view(-1, *([1] * (latents.dim() - 1)))
        noisy = self.plan.noisy_input(latents, draw, timesteps)
        return noisy.to(dtype), (sigma * 1000).to(dtype), sigmas

    def _attention_hook(self, unet, mem_eff_attn, xformers, sdpa):
        # the flow models never go through replace_unet_modules; the preset's attention was recorded at configure
        return self.original(self._train_util, "replace_unet_modules")(unet, mem_eff_attn, xformers, sdpa)

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        """The plan's per-sample weights for the step's draw, shaped to multiply ``like``."""
        assert self.plan is not None and self.timesteps is not None
        if self.validating:
            with self.plan.validation():
                weights = self.plan.sample_weights(self.timesteps)
        else:
            weights = self.plan.sample_weights(self.timesteps)
        return weights.to(like.device).view(-1, *([1] * (like.dim() - 1)))

    def _output_hook(self, args, model_pred, noisy_model_input, sigmas):
        return model_pred, self._weights(model_pred)  # raw: the velocity, with the preset's weights

    def _sd3_weighting_hook(self, weighting_scheme, sigmas):
        return self._weighting("compute_loss_weighting_for_sd3", weighting_scheme, sigmas)  # x0 weights (sigma_scaled)

    def _anima_weighting_hook(self, weighting_scheme, sigmas):
        return self._weighting("compute_loss_weighting_for_anima", weighting_scheme, sigmas)  # velocity weights

    def _weighting(self, function: str, weighting_scheme, sigmas):
        if self.preset.loss_weighting is None:  # kohya's own --weighting_scheme weighting stands
            return self.original(self._flow_modules[function], function)(weighting_scheme, sigmas)
        return self._weights(sigmas)  # in the process's loss space


# the flow scripts whose model takes an attention kernel (kohya's --attn_mode): the preset's
# [attention] -> that mode ("torch" is PyTorch's scaled_dot_product_attention)
ATTENTION_MODES: dict[str, dict[str, str]] = {
    HUNYUAN: {"sdpa": "torch", "xformers": "xformers"},
    ANIMA: {"sdpa": "torch", "xformers": "xformers"},
}

# each flow script's hooks: (library module, function, the adapter's method)
_FLUX_DRAW = ("library.flux_train_utils", "get_noisy_model_input_and_timesteps", "_flux_draw_hook")
_FLUX_OUTPUT = ("library.flux_train_utils", "apply_model_prediction_type", "_output_hook")
_HOOKS: dict[str, tuple[tuple[str, str, str], ...]] = {
    FLUX: (_FLUX_DRAW, _FLUX_OUTPUT),
    SD3: (
        ("library.sd3_train_utils", "get_noisy_model_input_and_timesteps", "_sd3_draw_hook"),
        ("library.sd3_train_utils", "compute_loss_weighting_for_sd3", "_sd3_weighting_hook"),
    ),
    LUMINA: (
        ("library.lumina_train_util", "get_noisy_model_input_and_timesteps", "_flux_draw_hook"),
        ("library.lumina_train_util", "apply_model_prediction_type", "_output_hook"),
    ),
    HUNYUAN: (_FLUX_DRAW, _FLUX_OUTPUT),
    ANIMA: (_FLUX_DRAW, ("library.anima_train_utils", "compute_loss_weighting_for_anima", "_anima_weighting_hook")),
}


def _flux_attention(kind: str) -> dict[str, Any]:
    return {"changed": 0, "modules": "the model's own attention, which calls torch's scaled_dot_product_attention: no switch"}


def _check_sections(preset, script: str, args) -> None:
    """What the flow script cannot apply as the preset says: refused before the model loads."""
    spec = preset.loss_weighting
    if spec is not None and spec.create().parameters():
        raise KohyaConflictError(
            f"{spec.path or preset.path}: loss_weighting {spec.type!r} learns its weight from the loss; {script} "
            "multiplies its loss by a weighting, which a learned weighting is not. Allowed: a fixed weighting."
        )
    modes = ATTENTION_MODES.get(script)
    if preset.attention is not None and modes is not None and preset.attention.type not in modes:
        raise KohyaConflictError(
            f"{preset.attention.path or preset.path}: [attention] {preset.attention.type!r}: {script}'s --attn_mode "
            f"has no such kernel for sdplug to set. Allowed: {', '.join(repr(m) for m in modes)}, or no [attention]."
        )
    if preset.attention is not None and modes is None and preset.attention.type != "sdpa":
        raise KohyaConflictError(
            f"{preset.attention.path or preset.path}: [attention] {preset.attention.type!r}: {script} has no attention "
            "switch (its model calls PyTorch's scaled_dot_product_attention itself). Allowed: 'sdpa', or no [attention]."
        )
    named = [caption for caption in preset.caption if caption.params.get("encoders")]
    if named and not getattr(args, "cache_text_encoder_outputs", False):
        caption = named[0]
        raise KohyaConflictError(
            f"{caption.path or preset.path}: {caption.key or 'caption'}.encoders: sdplug drops one text encoder's output "
            f"in {script}'s cached text-encoder outputs; without --cache_text_encoder_outputs kohya encodes the caption "
            "text in the step, which sdplug drops whole. Allowed: --cache_text_encoder_outputs, or a dropout without encoders."
        )
    if preset.caption and getattr(args, "cache_text_encoder_outputs", False) and script not in cached_text.ENCODER_SLOTS:
        raise KohyaConflictError(
            f"{preset.path}: [caption] with --cache_text_encoder_outputs: sdplug does not know {script}'s cached layout. "
            "Train without the cache, or without [caption]."
        )


def _classify_flow_flags(preset, values, defaults, acting) -> dict[str, str]:
    """For the audit: the flow script's own trick flags the user set that act, and how each stands."""
    found = {}
    for flag in FLOW_CONFLICTS:
        if flag.name in acting and user_set(flag.name, values.get(flag.name), defaults.get(flag.name), acting):
            taken = [x for x in sections_set_by(flag, values.get(flag.name)) if section_set(preset, x)]
            found[flag.name] = f"{'conflict' if taken else 'independent'} ({flag.family}): {flag.why}"
    for name, what in FLOW_TRICKS.items():
        if name in acting and name not in found:
            found[name] = f"independent: {what}"
    return found


def _check_flow_conflicts(preset, values, defaults, acting) -> None:
    """FLUX's own flags that act and set what a preset section sets: refused, every clash at once."""
    clashes = []
    for flag in FLOW_CONFLICTS:
        if flag.name not in acting or not user_set(flag.name, values.get(flag.name), defaults.get(flag.name), acting):
            continue
        taken = [section for section in sections_set_by(flag, values.get(flag.name)) if section_set(preset, section)]
        if taken:
            clashes.append(f"--{flag.name}={values[flag.name]} ({flag.why}; the preset sets [{'], ['.join(taken)}])")
    if clashes:
        raise KohyaConflictError(
            f"{preset.path}: the kohya command line sets {', '.join(clashes)}. Remove the flag(s) or the section(s): "
            "sdplug never applies both."
        )
