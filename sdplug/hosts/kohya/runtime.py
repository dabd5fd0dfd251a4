"""The kohya adapter at run time: hooks that route sd-scripts' tricks through one sdplug plan.

Installed either by the launcher (``sdplug kohya ...``, before the script runs) or by the
patched scripts (``--sdplug_preset``, from inside the script). Hooks, all in
``library.train_util`` / ``library.custom_train_functions``:

- ``read_config_from_file`` (every script calls it right after parsing arguments): checks the
  command line against the preset (a trick set in both is an error), then configures.
- ``get_noise_noisy_latents_and_timesteps``: noise, timesteps and the model input from the
  plan; input perturbation reaches the model input only, the returned target noise is clean.
- ``apply_snr_weight``: kohya calls it on the per-sample loss when ``min_snr_gamma`` is set;
  the adapter sets a marker value there so the preset's weighting runs in its place.
- ``get_optimizer``: the preset's optimizer, with a learned weighting's parameters added.
- ``replace_unet_modules``: the preset's attention through kohya's own switches.
- ``BaseDataset.process_caption``: the preset's caption transforms after kohya's own text
  handling (prefixes, wildcards).
- ``get_sai_model_spec``: the metadata every saved model and LoRA gets; the resolved preset
  joins it (kohya's own keys cannot express it).
- ``BaseDataset.__getitem__`` and the dataset's text-encoder caching method: with cached
  text-encoder outputs (SDXL scripts) there is no caption text, so dropout replaces a dropped
  sample's cached rows with the empty caption's outputs (see ``cached_text``).

At exit the plan's audit is written to ``output_dir/audit.json``.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

from sdplug import __version__ as sdplug_version
from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.hosts.kohya import cached_text
from sdplug.hosts.kohya.version import KohyaVersion, check_hooks
from sdplug.plan import Plan
from sdplug.presets import Preset
from sdplug.schedule import rescale_zero_terminal_snr, scaled_linear_alphas_cumprod
from sdplug.strategies import registry
from sdplug.strategies.optimizer import state_bytes
from sdplug.strategies.timesteps import UniformTimesteps


class KohyaConflictError(SdplugError):
    """The kohya command line and the preset both set one trick."""


class PresetWeightingMarker(float):
    """Stands in ``args.min_snr_gamma`` so kohya calls the weighting hook; never a real gamma."""

    def __new__(cls):
        return super().__new__(cls, 1.0)

    def __repr__(self) -> str:
        return "sdplug-preset-weighting"

    __str__ = __repr__


# kohya flags each preset section takes over; set together, they are an error.
CONFLICTS = {
    "noise": ("noise_offset", "multires_noise_iterations", "ip_noise_gamma"),
    "timesteps": ("min_timestep", "max_timestep"),
    "loss_weighting": ("min_snr_gamma", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss"),
    "caption": ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "shuffle_caption"),
    "attention": ("xformers", "sdpa", "mem_eff_attn"),
}
SUBSET_CAPTION_KEYS = ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "shuffle_caption")
ATTENTION_FLAGS = {"default": (False, False, False), "xformers": (False, True, False), "sdpa": (False, False, True)}

_ACTIVE: KohyaAdapter | None = None


def _frozen(group: Any) -> bool:
    """A parameter group kohya set to lr 0: its way to leave that part untrained."""
    return isinstance(group, dict) and group.get("lr") == 0


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, 0.0, "")


class KohyaAdapter:
    def __init__(self, preset: Preset, version: KohyaVersion, script: str):
        self.preset, self.version, self.script = preset, version, script
        self.plan: Plan | None = None
        self.args = None
        self.originals: dict[tuple[Any, str], Any] = {}
        self.optimizer = None
        self.trainable_count = 0
        self.attention_record: dict[str, Any] | None = None
        self.rules: list[str] = []
        self.noise_calls = 0
        self.checked_schedule = False
        self.empty_caption_outputs: list[torch.Tensor] | None = None
        self.failure: str | None = None  # set when sd-scripts stops with an exception

    # -- installation -----------------------------------------------------------------------
    def install(self, train_util, custom_train_functions) -> None:
        check_hooks({"library.train_util": train_util, "library.custom_train_functions": custom_train_functions}, self.version)
        self._replace(train_util, "read_config_from_file", self._read_config_hook)
        self._replace(train_util, "get_noise_noisy_latents_and_timesteps", self._noise_hook)
        self._replace(train_util, "get_optimizer", self._optimizer_hook)
        self._replace(train_util, "replace_unet_modules", self._attention_hook)
        self._replace(custom_train_functions, "apply_snr_weight", self._weight_hook)
        self._replace(train_util, "get_sai_model_spec", self._model_spec_hook)
        original_caption = train_util.BaseDataset.process_caption
        adapter = self

        def process_caption(dataset, subset, caption):
            return adapter._caption_hook(original_caption, dataset, subset, caption)

        self._replace(train_util.BaseDataset, "process_caption", process_caption)

        original_getitem = train_util.BaseDataset.__getitem__

        def getitem(dataset, index):
            return adapter._getitem_hook(original_getitem, dataset, index)

        self._replace(train_util.BaseDataset, "__getitem__", getitem)
        # the dataset's text-encoder caching method: the empty caption is encoded right after it
        cache_method = self.version.text_cache_method
        original_cache = getattr(train_util.BaseDataset, cache_method)

        def cache_text_encoder_outputs(dataset, *args, **kwargs):
            return adapter._text_cache_hook(original_cache, dataset, args, kwargs)

        self._replace(train_util.BaseDataset, cache_method, cache_text_encoder_outputs)

    def _replace(self, owner, name: str, replacement) -> None:
        self.originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, replacement)

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
                namespace["apply_snr_weight"] = self._weight_hook

    # -- configuration ----------------------------------------------------------------------
    def _read_config_hook(self, args, parser):
        args = self.original(self._train_util, "read_config_from_file")(args, parser)
        self.configure(args, parser)
        return args

    def configure(self, args, parser) -> None:
        """Check the command line against the preset, then bind the plan (before training)."""
        self._watch_for_failure()
        preset = self.preset
        sections = {
            "noise": bool(preset.noise),
            "timesteps": preset.timesteps is not None,
            "loss_weighting": preset.loss_weighting is not None,
            "caption": bool(preset.caption),
            "attention": preset.attention is not None,
        }
        for section, flags in CONFLICTS.items():
            if not sections[section]:
                continue
            clashing = [f"--{flag}={getattr(args, flag)}" for flag in flags if _is_set(getattr(args, flag, None))]
            if clashing:
                raise KohyaConflictError(
                    f"{preset.path}: the preset sets [{section}] and the kohya command line sets {', '.join(clashing)}. "
                    f"Remove the flag(s) or the [{section}] section: sdplug never applies both."
                )
        if preset.optimizer is not None:
            default = parser.get_default("optimizer_type") if parser is not None else ""
            if getattr(args, "optimizer_type", default) not in (default, None, ""):
                raise KohyaConflictError(
                    f"{preset.path}: the preset sets [optimizer] ({preset.optimizer.type}) and the kohya command line sets "
                    f"--optimizer_type={args.optimizer_type}. Remove one of them."
                )
        if (preset.noise or preset.timesteps) and self.version.noise_returns == 4 and getattr(args, "loss_type", "l2") != "l2":
            raise KohyaConflictError(
                f"sd-scripts {self.version.name} draws one timestep per batch for --loss_type {args.loss_type}; sdplug's "
                "noise/timestep hooks draw one per sample. Use --loss_type l2 with this preset."
            )
        self._apply_memory(args)
        if preset.caption and getattr(args, "cache_text_encoder_outputs", False):
            # cached outputs skip process_caption: only a dropout decision can still apply to them
            needs_text = [s.type for s in preset.caption if registry("caption").get(s.type).cls.needs_text]
            if needs_text:
                raise KohyaConflictError(
                    f"{preset.path}: [caption] {', '.join(needs_text)} rewrite the caption text, which "
                    "--cache_text_encoder_outputs leaves no longer there (sd-scripts encodes each caption once). "
                    "Allowed with cached outputs: 'dropout' only. Remove those transforms or --cache_text_encoder_outputs."
                )
            self.rules.append(
                "caption dropout on cached text-encoder outputs: a dropped sample gets the empty caption's outputs, "
                "encoded once by sd-scripts' own caching code"
            )
        if preset.loss_weighting is not None:
            args.min_snr_gamma = PresetWeightingMarker()
        if preset.caption and int(getattr(args, "max_data_loader_n_workers", 0) or 0) > 0:
            # caption decisions must be made (and audited) in this process, not in loader workers
            self.rules.append(
                f"--max_data_loader_n_workers {args.max_data_loader_n_workers} -> 0 (caption transforms run in the main process)"
            )
            args.max_data_loader_n_workers = 0
            args.persistent_data_loader_workers = False
        alphas = scaled_linear_alphas_cumprod()
        if getattr(args, "zero_terminal_snr", False):
            alphas = rescale_zero_terminal_snr(alphas)
        prediction = "v_prediction" if getattr(args, "v_parameterization", False) else "epsilon"
        self.plan = Plan(preset, alphas_cumprod=alphas, prediction_type=prediction)
        if preset.timesteps is None and (preset.noise or preset.timesteps):
            self.plan.timestep_sampler = UniformTimesteps(
                min_timestep=args.min_timestep or 0, max_timestep=args.max_timestep
            )  # kohya's own range carries over
        self.configured_range = (getattr(args, "min_timestep", None), getattr(args, "max_timestep", None))
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        seed = int(getattr(args, "seed", None) or 0)
        self.rank = rank
        self.generator_seed = seed * 1_000_003 + 2 * rank + 1
        self.generator: torch.Generator | None = None
        self.caption_rng = random.Random(f"sdplug-kohya-captions-{seed}-{rank}")
        self.args = args
        self._align_learning_rates(args)
        for rule in self.rules:
            print(f"sdplug: {rule}", file=sys.stderr)
        atexit.register(self.write_audit)

    def _align_learning_rates(self, args) -> None:
        """The preset's lr in kohya's own lr arguments too, so its logs and saved metadata tell the
        truth; the optimizer hook still puts it on every parameter group."""
        if self.preset.optimizer is None:
            return
        lr = self._optimizer_spec().params.get("lr")
        if lr is None:
            return
        changed = []
        for name in ("learning_rate", "unet_lr", "text_encoder_lr"):
            value = getattr(args, name, None)
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue  # unset: kohya falls back to --learning_rate
            # an lr of 0 is how kohya leaves a part untrained (it drops the group): keep it 0
            aligned = [lr if v else v for v in value] if isinstance(value, (list, tuple)) else (lr if value else value)
            if value != aligned:
                changed.append(f"--{name} {value} -> {lr}")
                setattr(args, name, aligned)
        if changed:
            self.rules.append(f"{', '.join(changed)} (preset [optimizer] lr)")

    def _optimizer_spec(self):
        """The preset's optimizer, or its fallback when the plan had to use it."""
        return self.preset.optimizer_fallback if self.plan.optimizer_fell_back else self.preset.optimizer

    def _watch_for_failure(self) -> None:
        """Record an exception that stops the script (the audit then says so), and print an sdplug
        error as its message (it names the file, key and what is allowed), not a traceback."""
        previous = sys.excepthook

        def excepthook(kind, value, traceback):
            self.record_failure(value)
            if isinstance(value, SdplugError):
                print(f"sdplug: error: {value}", file=sys.stderr)
            else:
                previous(kind, value, traceback)

        sys.excepthook = excepthook

    def record_failure(self, exc: BaseException) -> None:
        self.failure = f"{type(exc).__name__}: {exc}"

    def _apply_memory(self, args) -> None:
        memory = self.preset.memory
        for key in ("gradient_checkpointing", "cache_latents"):
            if getattr(memory, key) and not getattr(args, key, False):
                setattr(args, key, True)
                self.rules.append(f"--{key} on (preset [memory])")
        if memory.mixed_precision != "no":
            current = getattr(args, "mixed_precision", "no")
            if current not in ("no", memory.mixed_precision):
                raise KohyaConflictError(
                    f"{self.preset.path}: memory.mixed_precision = {memory.mixed_precision!r} but the kohya command line sets "
                    f"--mixed_precision={current}. Remove one of them."
                )
            args.mixed_precision = memory.mixed_precision
        if memory.cache_text_encoder_outputs:
            if not hasattr(args, "cache_text_encoder_outputs"):
                raise SdplugError(f"{self.script} has no --cache_text_encoder_outputs (kohya supports it for SDXL scripts).")
            if not args.cache_text_encoder_outputs:
                args.cache_text_encoder_outputs = True
                self.rules.append("--cache_text_encoder_outputs on (preset [memory])")

    # -- hooks --------------------------------------------------------------------------------
    def _check_schedule(self, noise_scheduler) -> None:
        if self.checked_schedule:
            return
        theirs = getattr(noise_scheduler, "alphas_cumprod", None)
        if (
            theirs is None
            or theirs.shape != self.plan.alphas_cumprod.shape
            or not torch.allclose(theirs.detach().float().cpu(), self.plan.alphas_cumprod, atol=1e-5)
        ):
            raise SdplugError(
                "sd-scripts' noise scheduler is not the Stable Diffusion schedule sdplug bound the preset to "
                "(scaled_linear, 1000 steps); refusing to weight or noise it wrongly."
            )
        self.checked_schedule = True

    def _noise_hook(self, args, noise_scheduler, latents):
        self.plan.audit.step()  # kohya draws noise once per training step
        if not (self.preset.noise or self.preset.timesteps):
            self.noise_calls += 1
            return self.original(self._train_util, "get_noise_noisy_latents_and_timesteps")(args, noise_scheduler, latents)
        self._check_schedule(noise_scheduler)
        if self.generator is None or self.generator.device != latents.device:
            self.generator = torch.Generator(device=latents.device).manual_seed(self.generator_seed)
        draw = self.plan.noise(latents, self.generator)
        pinned = getattr(args, "min_timestep", None)
        if pinned is not None and pinned == getattr(args, "max_timestep", None) and pinned != self.configured_range[0]:
            # sd-scripts main's validation pins every sample to one timestep this way
            timesteps = torch.full((latents.shape[0],), int(pinned), device=latents.device, dtype=torch.long)
        else:
            timesteps = self.plan.timesteps(latents.shape[0], generator=self.generator, device=latents.device)
        noisy = self.plan.noisy_input(latents, draw, timesteps)
        self.noise_calls += 1
        result = (draw.target, noisy, timesteps)
        return result + (1,) if self.version.noise_returns == 4 else result  # v0.8.7: huber_c, unused by l2

    def _weight_hook(self, loss, timesteps, noise_scheduler, gamma, v_prediction=False):
        if not isinstance(gamma, PresetWeightingMarker):
            return self.original(self._custom, "apply_snr_weight")(loss, timesteps, noise_scheduler, gamma, v_prediction)
        self._check_schedule(noise_scheduler)
        expected = self.plan.prediction_type == "v_prediction"
        if bool(v_prediction) != expected:
            raise SdplugError(f"kohya passed v_prediction={v_prediction} but the preset was bound to {self.plan.prediction_type}")
        return self.plan.weight(loss, timesteps.to(loss.device))

    def _optimizer_hook(self, args, trainable_params):
        learned = self.plan.trainable_parameters()
        params = list(trainable_params)
        if learned:
            # join the first trained group: sd-scripts main indexes its lr descriptions by group,
            # so a new group would break its logging; a group at lr 0 (v0.8.7 keeps one for
            # --text_encoder_lr 0) would leave the weighting untrained
            index = next((i for i, g in enumerate(params) if not _frozen(g)), None)
            if index is None or not isinstance(params[index], dict):
                params.extend(learned)
            else:
                group = params[index]
                for p in learned:
                    p.data = p.data.to(next(iter(group["params"])).device)
                params[index] = {**group, "params": [*group["params"], *learned]}
        if self.preset.optimizer is None:
            result = self.original(self._train_util, "get_optimizer")(args, params)
            optimizer = result[-1]
        else:
            spec = self._optimizer_spec()
            if "lr" in spec.params:
                # sd-scripts gives its parameter groups their own lr (--unet_lr, --text_encoder_lr,
                # --learning_rate), which would silently win over the preset's: the preset's lr rules.
                lr = spec.params["lr"]
                params = [{**g, "lr": lr} if isinstance(g, dict) and not _frozen(g) else g for g in params]
                self.rules.append(f"every parameter group's lr -> {lr}, except groups at lr 0 (preset [optimizer] lr)")
                print(f"sdplug: {self.rules[-1]}", file=sys.stderr)
                strategy = self.plan.optimizer_strategy
            else:
                # no lr in the preset: kohya's --learning_rate (and its per-group lrs) stay in charge
                strategy = registry("optimizer").create(spec.type, **{**spec.params, "lr": args.learning_rate})
            optimizer = strategy.build(params)
            result = (f"sdplug:{spec.type}", json.dumps(dict(spec.params)), optimizer)
        self.optimizer = optimizer
        self.trainable_count = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        return result

    def _attention_hook(self, unet, mem_eff_attn, xformers, sdpa):
        replace = self.original(self._train_util, "replace_unet_modules")
        if self.preset.attention is None:
            return replace(unet, mem_eff_attn, xformers, sdpa)
        kind = self.preset.attention.type
        if kind not in ATTENTION_FLAGS:
            raise SdplugError(
                f"attention {kind!r} is not available inside sd-scripts' own UNet; allowed there: {', '.join(ATTENTION_FLAGS)}."
            )
        self.plan.attention_strategy.check_available()
        replace(unet, *ATTENTION_FLAGS[kind])
        modules = [m for m in unet.modules() if hasattr(m, "to_q") and hasattr(m, "to_k")]  # attention layers
        if not modules:
            raise SdplugError(f"attention {kind!r}: found no attention module in {type(unet).__name__} to switch")
        self.attention_record = {
            "strategy": kind,
            "processor": f"sd-scripts {type(modules[0]).__name__} ({kind})",
            "modules": len(modules),
        }

    def _model_spec_hook(self, *args, **kwargs):
        spec = self.original(self._train_util, "get_sai_model_spec")(*args, **kwargs)
        if getattr(self.args, "no_metadata", False):
            return spec
        # saved weights say how they were trained; kohya's ss_min_snr_gamma only shows the marker
        spec["sdplug_preset"] = self.preset.to_toml()
        spec["sdplug_version"] = sdplug_version
        return spec

    def _caption_hook(self, original, dataset, subset, caption):
        if not self.preset.caption:
            return original(dataset, subset, caption)
        clashing = [f"{k}={getattr(subset, k)}" for k in SUBSET_CAPTION_KEYS if _is_set(getattr(subset, k, None))]
        if clashing:
            raise KohyaConflictError(
                f"{self.preset.path}: the preset sets [caption] and the dataset config sets {', '.join(clashing)} for a subset. "
                "Remove them from the dataset config: sdplug never applies both."
            )
        text = original(dataset, subset, caption)
        # kohya counts epochs from 1; sdplug's caption transforms count from 0
        epoch = max(int(getattr(dataset, "current_epoch", 1) or 1) - 1, 0)
        return self.plan.caption(text, epoch=epoch, rng=self.caption_rng).text

    def _text_cache_hook(self, original, dataset, args, kwargs):
        result = original(dataset, *args, **kwargs)
        if self.preset.caption and self.empty_caption_outputs is None:
            self.empty_caption_outputs = self._encode_empty_caption(dataset, args, kwargs)
        return result

    def _encode_empty_caption(self, dataset, args, kwargs) -> list[torch.Tensor]:
        if self.version.name == "main":  # new_cache_text_encoder_outputs(models, accelerator)
            models = args[0] if args else kwargs["models"]
            outputs = cached_text.encode_empty_main(self._train_util, models)
        else:  # cache_text_encoder_outputs(tokenizers, text_encoders, device, weight_dtype, ...)
            names = ("tokenizers", "text_encoders", "device", "weight_dtype")
            bound = {**dict(zip(names, args, strict=False)), **kwargs}  # positional, then keyword
            outputs = cached_text.encode_empty_v087(
                self._train_util, dataset, bound["tokenizers"], bound["text_encoders"], bound.get("weight_dtype")
            )
        return [o.detach().cpu() for o in outputs]

    def _getitem_hook(self, original, dataset, index):
        example = original(dataset, index)
        if not self.preset.caption:
            return example
        tensors = cached_text.cached_tensors(example, self.version.name)
        if tensors is None:
            return example  # captions went through process_caption
        if self.empty_caption_outputs is None:
            raise SdplugError(
                "sd-scripts gave cached text-encoder outputs, but the adapter did not see them cached, so it has no empty "
                f"caption to substitute for dropped captions. Caching route not known to the {self.version.name} adapter."
            )
        epoch = max(int(getattr(dataset, "current_epoch", 1) or 1) - 1, 0)
        captions = example.get("captions")
        for row in range(tensors[0].shape[0]):
            try:
                dropped = self.plan.caption_dropped(epoch=epoch, rng=self.caption_rng)
            except MissingDependencyError as exc:
                raise SdplugError(f"{self.preset.path}: with cached text-encoder outputs: {exc}") from None
            if dropped:
                cached_text.substitute_row(tensors, row, self.empty_caption_outputs)
                if isinstance(captions, list) and row < len(captions):
                    captions[row] = ""
        return example

    # -- audit ----------------------------------------------------------------------------------
    def _learned_weighting_record(self) -> dict[str, Any]:
        learned = {id(p) for p in self.plan.trainable_parameters()}
        if not learned:
            return {}
        lrs = [g["lr"] for g in self.optimizer.param_groups if any(id(p) in learned for p in g["params"])]
        # proof that the weighting trains: it is in the optimizer, in a group with a non-zero lr
        return {"learned_weighting_parameters": len(learned), "learned_weighting_lr": lrs}

    def write_audit(self) -> Path | None:
        if self.plan is None or self.args is None or not getattr(self.args, "output_dir", None):
            return None
        if self.optimizer is not None:
            self.plan.audit.record_host(
                optimizer={
                    "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}",
                    "state_bytes_per_trainable_parameter": round(state_bytes(self.optimizer) / max(self.trainable_count, 1), 4),
                    "trainable_parameters": self.trainable_count,
                    "learning_rates": sorted({g["lr"] for g in self.optimizer.param_groups}),
                    **self._learned_weighting_record(),
                }
            )
        if self.attention_record is not None:
            self.plan.audit.record_host(attention=self.attention_record)
        report = self.plan.audit.report()
        report["host"] = {
            "name": "kohya sd-scripts",
            "version": self.version.name,
            "script": self.script,
            "prediction_type": self.plan.prediction_type,
            "rules": self.rules,
        }
        problems = []
        if self.failure is not None:
            problems.append(f"sd-scripts stopped with an exception: {self.failure}")
        if self.preset.noise and self.noise_calls == 0:
            problems.append("noise hook never ran")
        if self.preset.loss_weighting and self.plan.audit.data["loss_weighting"]["calls"] == 0:
            problems.append("loss weighting never ran")
        if self.preset.caption and self.plan.audit.data["caption"]["samples"] == 0:
            problems.append("caption transforms never ran")
        if self.preset.optimizer and self.optimizer is None:
            problems.append("optimizer hook never ran")
        if self.preset.attention and self.attention_record is None:
            problems.append("attention hook never ran")
        report["problems"] = problems
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / ("audit.json" if self.rank == 0 else f"audit-rank{self.rank}.json")
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if self.rank == 0:
            print(f"\nsdplug audit ({path}):\n{self.plan.audit.summary()}", file=sys.stderr)
        if problems:
            print(f"sdplug: AUDIT PROBLEMS in {path}: {'; '.join(problems)}", file=sys.stderr)
        return path


def _import_library(root: Path):
    root_text = str(Path(root).resolve())
    if root_text not in sys.path:
        sys.path.insert(0, root_text)
    import importlib

    train_util = importlib.import_module("library.train_util")
    custom = importlib.import_module("library.custom_train_functions")
    return train_util, custom


def activate_for_launch(preset: Preset, version: KohyaVersion, root: Path, script: str) -> KohyaAdapter:
    """Install the hooks before the script runs (the launcher route)."""
    global _ACTIVE
    train_util, custom = _import_library(root)
    adapter = KohyaAdapter(preset, version, script)
    adapter._train_util, adapter._custom = train_util, custom
    adapter.install(train_util, custom)
    _ACTIVE = adapter
    return adapter


def record_failure(exc: BaseException) -> None:
    """The launcher caught an error the script stopped with: the audit says so."""
    if _ACTIVE is not None:
        _ACTIVE.record_failure(exc)


def activate(args, parser, script_globals: dict[str, Any]) -> KohyaAdapter | None:
    """Called by the patched scripts after they read their arguments (the patch route)."""
    global _ACTIVE
    if _ACTIVE is not None:  # launched through `sdplug kohya` as well: already active
        return _ACTIVE
    from sdplug.hosts.kohya.version import detect
    from sdplug.presets import load_preset

    script_file = Path(script_globals.get("__file__", "train_network.py"))
    root = script_file.resolve().parent
    version = detect(root)
    preset = load_preset(args.sdplug_preset)
    train_util, custom = _import_library(root)
    adapter = KohyaAdapter(preset, version, script_file.name)
    adapter._train_util, adapter._custom = train_util, custom
    adapter.install(train_util, custom)
    adapter.rebind_script_globals(script_globals, custom)
    print(f"sdplug: preset {preset.name!r} on sd-scripts {version.name} ({script_file.name})", file=sys.stderr)
    _ACTIVE = adapter
    adapter.configure(args, parser)
    return adapter
