"""What a training run shows and writes: the start banner, the progress bar, the sample grids,
the final outputs (weights, plots, preset.toml, audit.json) and the closing list of files.

Every output is written whole or not at all, following the user's umask (``sdplug.trainer.files``).
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import torch

from sdplug.errors import SdplugError
from sdplug.log import logger
from sdplug.plan.divergence import DivergedRun
from sdplug.strategies.optimizer_modes import eval_mode, evaluating
from sdplug.trainer import lora, models
from sdplug.trainer.config import SAMPLE_PROMPTS, read_prompts_file
from sdplug.trainer.files import atomic, write_text
from sdplug.trainer.plot import loss_curve_plot, loss_per_timestep_plot, validation_curve_plot
from sdplug.trainer.sampling import sample_grid

DESCRIPTIONS = {
    "embedded-data/": "the built-in synthetic shapes trained on (no --data given); reused by the next run here",
    "samples-before.png": "sample grid before training (rows: prompts; columns: guidance x seed)",
    "samples-after.png": "sample grid after training (same prompts, seeds and start noise)",
    "preset.toml": "the resolved preset (also in the weights' metadata)",
    "lora.safetensors": "the LoRA, kohya/A1111 keys: diffusers load_lora_weights, or sdplug sample --lora",
    "model/": "the trained model, a diffusers StableDiffusionPipeline folder: sdplug sample --model",
    "lora-ema.safetensors": "the LoRA with the [ema] averaged weights (same keys as lora.safetensors)",
    "model-ema/": "the model with the [ema] averaged weights (same layout as model/)",
    "samples-after-ema.png": "sample grid after training, with the [ema] averaged weights",
    "loss-per-timestep.png": "mean loss per timestep bin, unweighted and weighted",
    "loss-curve.png": "training loss per step, with a moving average",
    "validation-loss.png": "validation loss on the held-out images (fixed timesteps and noise)",
    "audit.json": "what every strategy did (summary below)",
    "sdplug/": "tensorboard logs (tensorboard --logdir <output>)",
}


# -- what the run shows ----------------------------------------------------------------------
def sample_prompts(trainer) -> tuple[tuple[str, ...], str]:
    """(prompts, where they came from): given, a --sample-prompts file, the data's captions, built-in."""
    config = trainer.config
    if config.sample_prompts is not None:
        return tuple(config.sample_prompts), "given"
    if config.sample_prompts_file is not None:
        return read_prompts_file(config.sample_prompts_file), str(config.sample_prompts_file)
    if config.data is not None:
        captions = list(dict.fromkeys(e.caption for e in trainer.examples if e.caption))
        if captions:  # four captions spread over the data (its order: file names)
            count = min(4, len(captions))
            return tuple(captions[i * len(captions) // count] for i in range(count)), f"captions from {config.data}"
    return SAMPLE_PROMPTS, "built-in shape prompts"


def banner(trainer) -> str:
    config, bundle, accelerator = trainer.config, trainer.bundle, trainer.accelerator
    if config.mode == "lora":
        mode = f"LoRA rank {config.lora_rank}, alpha {trainer.lora_alpha:g}"
    else:
        mode = "DreamBooth (full UNet)" + (f", prior preservation x{config.prior_loss_weight:g}" if config.class_data else "")
    mode += ", text encoder " + ("trained" if config.train_text_encoder else "frozen")
    if config.data is None:
        data = f"built-in synthetic shapes: {len(trainer.examples)} images written to {config.output / 'embedded-data'}/"
    else:
        data = f"{config.data} ({len(trainer.examples)} images with repeats)"
    if trainer.class_examples:
        data += f"; class images: {config.class_data} ({len(trainer.class_examples)})"
    steps = f"{config.steps} x batch {config.batch_size}, seed {config.seed}"
    if config.stop_after is not None:
        steps += f", stopping after step {config.stop_after} with a checkpoint"
    if config.resume is not None:
        steps += f", resuming from {config.resume}"
    rows = [
        ("preset", f"{trainer.preset.name} ({trainer.preset.path})"),
        ("model", f"{bundle.source} ({bundle.resolution}x{bundle.resolution}, {bundle.prediction_type})"),
        ("data", data),
        ("output", str(config.output.resolve())),
        ("device", f"{trainer.device}, {accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}"),
        ("steps", steps),
    ]
    if config.samples:
        prompts, source = sample_prompts(trainer)
        rows.append(
            (
                "samples",
                f"{len(prompts)} prompts ({source}) x {len(config.sample_seeds)} seeds x guidance "
                f"{', '.join(f'{g:g}' for g in config.guidance_scales)}",
            )
        )
    lines = [f"sdplug train: {mode}", *(f"  {k:<8} {v}" for k, v in rows)]
    if config.model is None and config.mode == "lora":
        lines.append(
            "WARNING: LoRA on the embedded tiny model, whose weights are random: a LoRA adapts a trained model, "
            "and here it learns next to nothing. To see training work on the embedded model, train it whole: "
            "--mode dreambooth --train-text-encoder (the README's main job)."
        )
    if config.model is not None and config.data is None:
        lines.append(
            f"WARNING: --model without --data: training {config.model} on the built-in 32x32 synthetic shapes, "
            "not on your images. Pass --data DIR (images with same-named .txt captions) to train on yours."
        )
    return "\n".join(lines)


def progress_bar(trainer, total: int):
    if not (trainer.config.progress and trainer.accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    # tqdm shows the rate itself; the postfix carries only the loss
    return tqdm(total=total, initial=trainer.step, desc=f"sdplug {trainer.config.mode}", unit="step")


def write_grid(trainer, name: str) -> dict | None:
    config = trainer.config
    if not (config.samples and trainer.accelerator.is_main_process):
        return None
    with evaluating(getattr(trainer, "optimizer", None)):  # a schedule-free optimizer's evaluation weights
        images, grid = sample_grid(
            trainer.bundle,
            trainer.accelerator.unwrap_model(trainer.unet),
            trainer.plan.training_noise,
            list(sample_prompts(trainer)[0]),
            list(config.sample_seeds),
            list(config.guidance_scales),
            steps=config.sample_steps,
            device=trainer.device,
        )
    with atomic(config.output / f"samples-{name}.png") as tmp:
        grid.save(tmp, format="PNG")
    trainer.written.append(f"samples-{name}.png")
    return images


def closing_table(trainer) -> str:
    output = trainer.config.output
    names = list(dict.fromkeys(trainer.written))
    width = max(len(n) for n in names) if names else 0
    descriptions = dict(DESCRIPTIONS)
    if trainer.bundle.pixel_space:
        descriptions["model/"] += " (no VAE: from_pretrained(..., vae=None))"
    described = [f"  {n:<{width}}  {descriptions.get(n, 'resumable checkpoint: --resume ' + str(output / n))}" for n in names]
    lines = [f"\nsdplug wrote to {output}/:", *described]
    if "audit.json" in names:
        lines += [f"\nsdplug audit ({output / 'audit.json'}):", trainer.plan.summary()]
    return "\n".join(lines)


# -- the end of a run ------------------------------------------------------------------------
def peak_memory(device) -> dict:
    peak = {"process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def _record_run(trainer) -> None:
    config, accelerator = trainer.config, trainer.accelerator
    trainer.plan.record_host(
        run={
            "mode": config.mode,
            "model": trainer.bundle.source,
            "prediction_type": trainer.bundle.prediction_type,
            "processes": accelerator.num_processes,
            "seconds_per_step": round(trainer.seconds_per_step, 4),
            "peak_memory": peak_memory(trainer.device),
        },
    )


def _write_weights(trainer, preset_toml: str, suffix: str = "") -> None:
    """The trained weights (``suffix`` "-ema": while the EMA weights are applied, beside them)."""
    config, out = trainer.config, trainer.config.output
    unwrapped = trainer.accelerator.unwrap_model(trainer.unet)
    if config.mode == "lora":
        # what `sdplug sample --lora` needs to rebuild the base: the embedded model is made from the seed
        base = {"base_model": "embedded" if config.model is None else str(Path(config.model).resolve())}
        run = {"steps": trainer.step, "seed": config.seed, "prediction_type": trainer.bundle.prediction_type, **base}
        with atomic(out / f"lora{suffix}.safetensors") as tmp:
            lora.save_kohya_lora(
                tmp,
                unwrapped,
                trainer.bundle.text_encoder if config.train_text_encoder else None,
                rank=config.lora_rank,
                alpha=trainer.lora_alpha,
                preset_toml=preset_toml,
                extra=run,
            )
        trainer.written.append(f"lora{suffix}.safetensors")
    else:
        trainer.bundle.unet = unwrapped
        with atomic(out / f"model{suffix}") as tmp:
            models.save_folder(trainer.bundle, tmp)
            (tmp / "sdplug_preset.toml").write_text(preset_toml)
        trainer.written.append(f"model{suffix}/")


def _loss_bins(trainer) -> dict:
    bins, steps = trainer.loss_bins, trainer.plan.num_train_timesteps
    count = len(bins["count"])
    means = [[s / c if c else None for s, c in zip(bins[key], bins["count"], strict=True)] for key in ("raw_sum", "weighted_sum")]
    edges = [i * steps // count for i in range(count + 1)]
    return {"bin_edges": edges, "mean_loss": means[0], "mean_weighted_loss": means[1]}


def final_output_bytes(trainer) -> int:
    """About what the final outputs take on disk: the weights (twice with [ema]), plus plots and grids."""
    modules = [trainer.bundle.unet, trainer.bundle.text_encoder]
    if trainer.config.mode == "dreambooth" and trainer.bundle.vae is not None:
        modules.append(trainer.bundle.vae)
    trained_only = trainer.config.mode == "lora"
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad or not trained_only)
    copies = 2 if trainer.plan.ema_average is not None else 1
    return weights * copies + (16 << 20)


def check_free_space(trainer, when: str) -> None:
    """Refuse to start (or to write the final outputs) on a disk that cannot hold them."""
    out = trainer.config.output
    need, free = final_output_bytes(trainer), shutil.disk_usage(out).free
    if free < need:
        kept = f" {what_is_kept(trainer)}" if when == "after training" else ""
        raise FinalWriteError(
            f"{out}: {free / 2**20:.0f} MiB free, and the final outputs need about {need / 2**20:.0f} MiB "
            f"({when}). Free some space, or give another --output.{kept}"
        )


def finish(trainer) -> dict:
    """Record the run, then (main process) write every final output; returns the audit report."""
    accelerator, plan = trainer.accelerator, trainer.plan
    eval_mode(trainer.optimizer)  # training is over: a schedule-free optimizer's weights to save and sample
    trainer.stop_if_diverged()  # non-finite weights are never written as the result
    _record_run(trainer)
    problems = trainer.plan.report()["problems"]  # the policy: save everything, record them, then fail
    from accelerate.utils import gather_object

    ranks = gather_object([{"rank": trainer.rank, "draws": trainer.draw_log[:3], "audit": plan.state_dict()["audit"]}])
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return plan.report()
    from safetensors import SafetensorError

    check_free_space(trainer, "after training")
    try:
        report = _write_final_outputs(trainer, ranks)
    except (OSError, RuntimeError, SafetensorError) as exc:  # a disk that filled up while writing
        raise FinalWriteError(
            f"writing the final outputs to {trainer.config.output} failed ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). {what_is_kept(trainer)}"
        ) from None
    accelerator.wait_for_everyone()
    if problems:
        raise AuditProblems(
            f"the run finished and its outputs are saved in {trainer.config.output}, but the audit found strategies that "
            f"did not apply: {'; '.join(problems)} (audit.json, 'problems')."
        )
    return report


def _write_final_outputs(trainer, ranks: list) -> dict:
    out = trainer.config.output
    preset_toml = trainer.preset.to_toml()
    write_text(out / "preset.toml", preset_toml)
    trainer.written.append("preset.toml")
    _write_weights(trainer, preset_toml)
    bins = _loss_bins(trainer)
    name, steps = trainer.preset.name, trainer.step
    with atomic(out / "loss-per-timestep.png") as tmp:
        loss_per_timestep_plot(
            tmp,
            bins["bin_edges"],
            bins["mean_loss"],
            bins["mean_weighted_loss"],
            f"{name}: loss per timestep bin ({steps} steps)",
        )
    with atomic(out / "loss-curve.png") as tmp:
        loss_curve_plot(tmp, trainer.losses, f"{name}: training loss ({steps} steps)")
    trainer.written += ["loss-per-timestep.png", "loss-curve.png"]
    if trainer.validator is not None:
        steps, values = [s for s, _ in trainer.validation_curve], [v for _, v in trainer.validation_curve]
        with atomic(out / "validation-loss.png") as tmp:
            validation_curve_plot(tmp, steps, values, f"{name}: validation loss ({trainer.validator.count} held-out images)")
        trainer.written.append("validation-loss.png")
    trainer.samples_after = write_grid(trainer, "after")
    ema = trainer.plan.ema_average
    if ema is not None:
        with ema.applied():  # the averaged weights, saved and sampled beside the plain ones
            _write_weights(trainer, preset_toml, suffix="-ema")
            write_grid(trainer, "after-ema")
    if trainer.config.log_with and (out / "sdplug").is_dir():
        trainer.written.append("sdplug/")
    per_rank = [
        {
            "rank": r["rank"],
            "first_draws": r["draws"],
            "caption": r["audit"]["caption"],
            "noise_draws": r["audit"]["noise"]["draws"],
        }
        for r in ranks
    ]
    trainer.written.append("audit.json")  # written last; a refused or failed run writes one with completed = false
    sections = {"loss_per_timestep_bin": bins, "per_rank": per_rank, "files": list(dict.fromkeys(trainer.written))}
    if trainer.validator is not None:
        sections["validation"] = trainer.validator.record(trainer.config.validate_every, trainer.validation_curve)
    return json.loads(trainer.plan.write_audit(out, **sections).read_text())


class FinalWriteError(SdplugError):
    """The final outputs could not be written (a full disk); the newest checkpoint is kept."""


class AuditProblems(SdplugError):
    """A finished run whose audit found a strategy that did not apply. Its outputs are saved and
    ``audit.json`` lists the problems; the run still fails (non-zero exit), so it is never
    mistaken for a run that applied its preset."""


# -- a failed run ----------------------------------------------------------------------------
def what_is_kept(trainer) -> str:
    """One sentence: the newest checkpoint a failed run keeps, and how to continue from it."""
    from sdplug.trainer.checkpoint import complete_checkpoints, read_step

    kept = complete_checkpoints(trainer.config.output)
    if not kept:
        return "No checkpoint was kept (--save-every N writes one every N steps)."
    return (
        f"The newest checkpoint kept is {kept[-1]} (step {read_step(kept[-1])}): --resume latest continues from it, "
        "and its weights are finite."
    )


def write_failure_audit(folder, exc: BaseException, trainer=None) -> Path | None:
    """A refused, failed or interrupted run still writes its audit: ``completed`` false, the
    reason in ``problems``, and whatever the audit had counted (nothing, when refused before
    training) -- into ``audit.json``, or beside it when that holds another run's record."""
    from sdplug.plan.audit_file import REFUSED, write_refusal

    if folder.rank != 0 or not folder.path.is_dir():
        return None
    plan = getattr(trainer, "plan", None)
    steps = int(getattr(trainer, "step", 0) or 0)
    refused = isinstance(exc, SdplugError) and steps == 0
    name = folder.failure_audit_name(steps, refused=refused)
    # said by the command itself: Ctrl-C in one line, a divergence in its error
    interrupted = isinstance(exc, (KeyboardInterrupt, DivergedRun))
    if plan is not None:
        plan.record_failure(exc)
        path = plan.write_audit(folder.path, audit_name=name, announce=not interrupted)
    else:  # refused before the plan was built (a model that does not load): the trainer's own host record is empty
        problem = f"{REFUSED}{exc}" if refused else f"stopped at step 0 by {type(exc).__name__}: {exc}"
        preset = getattr(trainer, "preset", None)
        path = write_refusal(folder.path, problem, host={}, preset=preset, name=name, announce=not interrupted)
    if name != "audit.json":
        logger.warning(f"{folder.path / 'audit.json'} is another run's record and stays; this run's audit is {path.name}")
    return path
