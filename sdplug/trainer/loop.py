"""The reference trainer: LoRA or DreamBooth on diffusers + accelerate + peft, driven by a plan.

The training step calls the plan exactly where every other host does (the order in
sdplug/plan/plan.py's docstring): caption -> noise -> timesteps -> noisy input / target -> weight ->
step, and the audit proves it.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.log import show_messages
from sdplug.plan import bind
from sdplug.plan.audit import TIMESTEP_BINS
from sdplug.plan.runs_here import check_memory_runs_here
from sdplug.preset import load_preset
from sdplug.trainer import checkpoint, data, lora, models, outputs, resume, synthetic, validation
from sdplug.trainer.batches import TEXT_ENCODERS, TrainingInputs, check_no_mask_options
from sdplug.trainer.config import OptionError, TrainConfig, check_before_loading, preflight
from sdplug.trainer.files import remove_path
from sdplug.trainer.gradient_checkpointing import CheckpointedCalls
from sdplug.trainer.requirements import check_trainer_requirements
from sdplug.trainer.run_folder import RunFolder
from sdplug.trainer.step import diffusion_loss


def _resolve_data(config: TrainConfig, accelerator) -> Path:
    if config.data is not None:
        return Path(config.data)
    folder = config.output / "embedded-data"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (folder / "0000.png").is_file():
            synthetic.write_dataset(folder)
    return folder


class Trainer:
    """One training run. ``run()`` returns the audit report."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        config.check()
        check_trainer_requirements()
        if config.log_with == "tensorboard":
            from sdplug.optional import is_available

            if not (is_available("tensorboard") or is_available("tensorboardX")):
                raise MissingDependencyError(
                    "--log-with tensorboard needs the package 'tensorboard'. Install it with: pip install tensorboard"
                )
        self.config = config
        self.preset = load_preset(config.preset)
        config.output = Path(config.output)
        mixed = self.preset.memory.mixed_precision
        check_memory_runs_here(self.preset)  # before the Accelerator exists: it would fail (or fall back) on its own terms
        # Under torchrun / accelerate launch without CUDA, accelerate forms a gloo group only
        # when told the run is on CPU; otherwise every process would train alone.
        multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=multi_process_cpu,
            mixed_precision=mixed,
            log_with=config.log_with,
            project_dir=str(config.output) if config.log_with else None,
        )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        config.output.mkdir(parents=True, exist_ok=True)

        if config.model is None:
            self.bundle = models.embedded(prediction_type=config.prediction_type or "epsilon", seed=config.seed)
        else:
            self.bundle = models.load(config.model, resolution=config.resolution)
        if config.resolution is not None and config.model is None and config.resolution != self.bundle.resolution:
            raise OptionError(
                f"--resolution applies to --model; the embedded model is {self.bundle.resolution}x{self.bundle.resolution}."
            )
        self.examples = data.find_examples(_resolve_data(config, self.accelerator))
        held = data.find_examples(config.validation_data) if config.validation_data else []
        if config.validation_split:  # held out of --data by a fixed seed: never trained on
            self.examples, held = validation.hold_out(self.examples, config.validation_split)
        self.class_examples = data.find_examples(config.class_data) if config.class_data else []

        if (
            self.preset.schedule.zero_terminal_snr and not self.bundle.flow
        ):  # training and sampling alike (a flow plan refuses it)
            self.bundle.scheduler = models.zero_terminal(self.bundle.scheduler)
        self.plan = bind(self.preset, self.bundle.scheduler, seed=config.seed, rank=self.rank, text_encoders=TEXT_ENCODERS)
        preflight(self.preset, config)
        self._prepare_random_streams()  # first: caching latents draws from them
        self._prepare_models()
        self._prepare_data()
        self._prepare_optimizer()
        if self.accelerator.is_main_process:
            outputs.check_free_space(self, "before training")
        self.step = 0
        self.loss_bins: dict[str, list[float]] = {
            "raw_sum": [0.0] * TIMESTEP_BINS,
            "weighted_sum": [0.0] * TIMESTEP_BINS,
            "count": [0] * TIMESTEP_BINS,
        }
        self.draw_log: list[dict] = []
        self.losses: list[float] = []
        self.validation_curve: list[tuple[int, float]] = []
        self.validator = validation.ValidationLoss(self.bundle, held, self.plan.process, self.device) if held else None
        resume.register(self)  # the plan, the samplers and these records in accelerate's save_state

    # -- set-up ------------------------------------------------------------------------------
    def _prepare_models(self):
        bundle, config, memory = self.bundle, self.config, self.preset.memory
        bundle.unet.requires_grad_(False)
        bundle.text_encoder.requires_grad_(False)
        if bundle.vae is not None:
            bundle.vae.requires_grad_(False).to(self.device)
        self.lora_alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
        lora.make_trainable(
            bundle,
            mode=config.mode,
            rank=config.lora_rank,
            alpha=self.lora_alpha,
            train_text_encoder=config.train_text_encoder,
            seed=config.seed,
        )
        self.plan.attention(bundle.unet)  # recorded: the processors before and after
        self.checkpointed, self.checkpointed_recorded = None, False
        if memory.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            checkpointed: dict[str, torch.nn.Module] = {"unet": bundle.unet}
            if config.train_text_encoder:
                bundle.text_encoder.gradient_checkpointing_enable()
                checkpointed["text_encoder"] = bundle.text_encoder
            self.checkpointed = CheckpointedCalls(checkpointed)
        bundle.text_encoder.to(self.device)
        bundle.unet.to(self.device)  # before the optimizer: a learned weighting trains where the model is
        self.trainable_parameters = sum(
            p.numel() for m in (bundle.unet, bundle.text_encoder) for p in m.parameters() if p.requires_grad
        )

    def _prepare_data(self):
        self.inputs = TrainingInputs(
            self.bundle,
            self.plan,
            self.examples,
            self.class_examples,
            memory=self.preset.memory,
            device=self.device,
            latent_generator=self.latent_generator,
        )
        self.plan.record_host(
            memory={
                "gradient_checkpointing": self.preset.memory.gradient_checkpointing,
                "mixed_precision": self.preset.memory.mixed_precision,
                **self.inputs.memory_record(),
            }
        )
        if self.config.masked_loss or check_no_mask_options(self.preset):
            self.plan.record_host(masked_loss=self.inputs.load_masks(self.examples))

    def _prepare_optimizer(self):
        bundle = self.bundle
        params = [p for m in (bundle.unet, bundle.text_encoder) for p in m.parameters() if p.requires_grad]
        # a learned weighting's parameters move to the model's device and join as a group of their own
        self.optimizer = self.plan.optimizer(params, default=functools.partial(torch.optim.AdamW, lr=1e-4))
        self.learned_parameters = self.plan.trainable_parameters()
        self.plan.ema(params)  # the preset's [ema] of the trained weights, updated after each optimizer step
        prepared = self.accelerator.prepare(bundle.unet, self.optimizer)
        self.unet, self.optimizer = prepared
        if self.config.train_text_encoder:
            self.text_encoder = self.accelerator.prepare(bundle.text_encoder)
        else:
            self.text_encoder = bundle.text_encoder

    def _prepare_random_streams(self):
        # Every stream is the plan's (sdplug.plan.streams: one per --seed, rank and purpose), so the
        # noise, timesteps and caption decisions are those any host draws for this preset and
        # seed; data order and a VAE's posterior samples are streams of their own.
        plan = self.plan
        self.sampler = data.BatchSampler(len(self.examples), self.config.batch_size, plan.stream_generator("data"))
        self.class_sampler = (
            data.BatchSampler(len(self.class_examples), self.config.batch_size, plan.stream_generator("class-data"))
            if self.class_examples
            else None
        )
        self.latent_generator = plan.stream_generator("latents", self.device)

    # -- one step -----------------------------------------------------------------------------
    def _loss(self, sampler: data.BatchSampler, examples, images, masks=None) -> tuple[torch.Tensor, dict]:
        epochs, indices = sampler.next()
        captions = [examples[i].caption for i in indices]
        states, dropped = self.inputs.text(self.text_encoder, captions, epochs, train_text_encoder=self.config.train_text_encoder)
        mask = masks[indices].to(self.device) if masks is not None else None
        step = diffusion_loss(self.plan, self.unet, self.inputs.latents(images[indices]), states, self.accelerator.autocast, mask)
        bins = (step.timesteps * TIMESTEP_BINS // self.plan.num_train_timesteps).clamp(max=TIMESTEP_BINS - 1).tolist()
        for b, r, w in zip(bins, step.unweighted.detach().tolist(), step.weighted.detach().tolist(), strict=True):
            self.loss_bins["raw_sum"][b] += r
            self.loss_bins["weighted_sum"][b] += w
            self.loss_bins["count"][b] += 1
        draw = {
            "indices": indices,
            "timesteps": step.timesteps.tolist(),
            "dropped": dropped,
            "noise_sum": float(step.noise.target.double().sum()),
        }
        return step.weighted.mean(), draw

    def train_step(self) -> float:
        loss, draw = self._loss(self.sampler, self.examples, self.inputs.images, self.inputs.masks)
        if self.class_sampler is not None:
            prior_loss, _ = self._loss(self.class_sampler, self.class_examples, self.inputs.class_images)
            loss = loss + self.config.prior_loss_weight * prior_loss
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.learned_parameters:  # not inside the DDP module: average by hand
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.plan.step()
        self.step += 1
        if self.checkpointed is not None and not self.checkpointed_recorded:
            # what really ran in one step, not the switch (see gradient_checkpointing.py)
            calls = dict(self.checkpointed.calls)
            self.plan.extend_host_record("memory", gradient_checkpointing={"checkpointed_calls_in_step_1": calls})
            self.checkpointed_recorded = True
            idle = [name for name, count in calls.items() if count == 0]
            if idle:
                raise SdplugError(
                    f"{self.preset.path}: memory.gradient_checkpointing = true, but {' and '.join(idle)} checkpointed "
                    "nothing in the first step; refusing to train without it."
                )
        if self.config.record_draws or len(self.draw_log) < 3:  # the first draws prove ranks differ
            self.draw_log.append({"step": self.step, **draw, "loss": loss.item()})
        return loss.item()

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> None:
        self.stop_if_diverged()  # a checkpoint holds finite weights only
        try:
            resume.save_run(self, directory)
        except (OSError, RuntimeError) as exc:  # a full disk: torch's writer raises RuntimeError
            remove_path(checkpoint.partial_dir(directory))
            raise checkpoint.CheckpointError(
                f"writing {directory.name} failed ({_first_line(exc)}). {outputs.what_is_kept(self)}"
            ) from None

    def stop_if_diverged(self) -> None:
        """Stop the run once a loss or the weights went non-finite (the plan's watch; read where the
        step already waited for the device)."""
        if self.plan.first_nonfinite_step() is not None:
            self.plan.stop_if_diverged(
                f"The run stopped; nothing from then on is saved as its result. {outputs.what_is_kept(self)}"
            )

    def load_checkpoint(self, directory: Path) -> None:
        resume.load_run(self, directory)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        config, accelerator = self.config, self.accelerator
        self.written = ["embedded-data/"] if config.data is None else []  # for the closing list
        if config.resume is not None:  # before the banner, which names the folder 'latest' resolved to
            config.resume = checkpoint.resolve(Path(config.resume), config.output)
        if accelerator.is_main_process:
            print(outputs.banner(self), flush=True)  # the trainer's own screen, like its progress bar
        if config.resume is not None:
            self.load_checkpoint(config.resume)
        elif config.samples:
            self.samples_before = outputs.write_grid(self, "before")
        if config.log_with:
            accelerator.init_trackers("sdplug", config={"preset": self.preset.name, "mode": config.mode, "steps": config.steps})
        last = config.stop_after or config.steps
        validation.maybe_validate(self)  # step 0: where the curve starts (a resumed run has it)
        progress = outputs.progress_bar(self, last)
        started, first_step = time.perf_counter(), self.step
        try:
            while self.step < last:
                loss = self.train_step()  # waits for the device (the loss as a number)
                self.losses.append(loss)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}")
                    progress.update(1)
                self.stop_if_diverged()
                if config.log_with:
                    accelerator.log({"loss": loss}, step=self.step)
                validation.maybe_validate(self)
                if config.save_every and self.step % config.save_every == 0 and self.step < last:
                    self.save_checkpoint(config.output / f"checkpoint-{self.step}")
                    self.written.append(f"checkpoint-{self.step}/")
        finally:
            if progress is not None:
                progress.close()  # what follows (an error, the kept files) starts on a line of its own
        self.seconds_per_step = (time.perf_counter() - started) / max(self.step - first_step, 1)
        if config.stop_after is not None:
            self.save_checkpoint(config.output / f"checkpoint-{self.step}")
            self.written.append(f"checkpoint-{self.step}/")
            return self.plan.report()
        validation.maybe_validate(self, final=True)
        report = outputs.finish(self)
        if config.log_with:
            accelerator.end_training()
        return report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def train(config: TrainConfig, *, checked: bool = False) -> dict:
    """One run, then the list of what it wrote.

    Options, preset, data and ``--output`` are checked first: a refusal there creates nothing.
    The run then holds ``--output`` (``run_folder``). A run that fails or is interrupted writes
    its audit (``completed`` false, ``problems``) where it does not replace another run's
    record, and removes what a rerun writes again unless it keeps checkpoints. ``checked``: the
    caller ran ``check_before_loading`` already (the CLI does, before diffusers loads)."""
    show_messages()  # the reference trainer's session: its messages on stderr
    if not checked:
        check_before_loading(config)
    folder = RunFolder(Path(config.output)).open()
    trainer = None
    try:
        trainer = Trainer(config)
        report = trainer.run()
    except outputs.AuditProblems:
        raise  # everything is saved and audit.json lists the problems: nothing to clean up
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            outputs.write_failure_audit(folder, exc, trainer)
        folder.clean_after_failure()
        raise
    finally:
        folder.close()
    if trainer.accelerator.is_main_process:
        print(outputs.closing_table(trainer))  # the trainer's own screen
    return report
