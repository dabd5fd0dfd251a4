"""The reference trainer: LoRA or DreamBooth on diffusers + accelerate + peft, driven by a plan.

The training step calls the plan exactly where every other host does (docs/architecture.md):
caption -> noise -> timesteps -> noisy input / target -> weight, and the audit proves it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.plan import Plan
from sdplug.presets import load_preset
from sdplug.strategies.optimizer import state_bytes
from sdplug.trainer import checkpoint, data, lora, models, synthetic
from sdplug.trainer.config import OptionError, TrainConfig
from sdplug.trainer.plot import loss_per_timestep_plot
from sdplug.trainer.requirements import check_trainer_requirements
from sdplug.trainer.sampling import encode_prompts, sample_grid

TIMESTEP_BINS = 10


class BatchSampler:
    """Shuffled batches, a new permutation each epoch, from a generator of this rank's own."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order: list[int] = []
        self.position = 0
        self.epoch = -1

    def next(self) -> tuple[int, list[int]]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.size, generator=self.generator).tolist()
                self.position = 0
                self.epoch += 1
            batch.append(self.order[self.position])
            self.position += 1
        return self.epoch, batch

    def state_dict(self):
        return {"order": self.order, "position": self.position, "epoch": self.epoch, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.order, self.position, self.epoch = state["order"], state["position"], state["epoch"]
        self.generator.set_state(state["generator"])


def preflight(preset, config: TrainConfig) -> None:
    """Refuse, before training, every preset entry or option that could not take effect."""
    memory = preset.memory
    if memory.cache_text_encoder_outputs and config.train_text_encoder:
        raise OptionError(
            f"{preset.path}: memory.cache_text_encoder_outputs = true conflicts with --train-text-encoder "
            "(a trained text encoder's outputs change every step)."
        )


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
        if mixed == "fp16" and not torch.cuda.is_available():
            # checked before the Accelerator exists: it would fail (or fall back) on its own terms
            raise SdplugError(
                f"{self.preset.path}: memory.mixed_precision = 'fp16' needs a CUDA GPU and this machine has none. "
                "Allowed here: 'bf16' or 'no' (write a preset that extends this one and sets it)."
            )
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
        self.class_examples = data.find_examples(config.class_data) if config.class_data else []

        self.plan = Plan(
            self.preset, alphas_cumprod=self.bundle.scheduler.alphas_cumprod, prediction_type=self.bundle.prediction_type
        )
        self.audit = self.plan.audit
        preflight(self.preset, config)
        self._prepare_models()
        self._prepare_data()
        self._prepare_optimizer()
        self._prepare_random_streams()
        self.step = 0
        self.loss_bins = {"raw_sum": [0.0] * TIMESTEP_BINS, "weighted_sum": [0.0] * TIMESTEP_BINS, "count": [0] * TIMESTEP_BINS}
        self.draw_log: list[dict] = []
        self.losses: list[float] = []

    # -- set-up ------------------------------------------------------------------------------
    def _prepare_models(self):
        bundle, config, memory = self.bundle, self.config, self.preset.memory
        bundle.unet.requires_grad_(False)
        bundle.text_encoder.requires_grad_(False)
        if bundle.vae is not None:
            bundle.vae.requires_grad_(False).to(self.device)
        self.lora_alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
        if config.mode == "lora":
            lora.add_lora(bundle.unet, rank=config.lora_rank, alpha=self.lora_alpha, targets=lora.UNET_TARGETS)
            if config.train_text_encoder:
                lora.add_lora(
                    bundle.text_encoder, rank=config.lora_rank, alpha=self.lora_alpha, targets=lora.TEXT_ENCODER_TARGETS
                )
        else:
            bundle.unet.requires_grad_(True)
            if config.train_text_encoder:
                bundle.text_encoder.requires_grad_(True)
        changed = self.plan.attention(bundle.unet)
        processors = {type(p).__name__ for p in bundle.unet.attn_processors.values()}
        self.audit.record_host(
            attention={
                "strategy": self.preset.attention.type if self.preset.attention else "(host default)",
                "processor": ",".join(sorted(processors)),
                "modules": len(bundle.unet.attn_processors),
                "changed": changed,
            }
        )
        if memory.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            if not bundle.unet.is_gradient_checkpointing:
                raise SdplugError("gradient checkpointing did not switch on in the UNet")
            if config.train_text_encoder:
                bundle.text_encoder.gradient_checkpointing_enable()
        bundle.text_encoder.to(self.device)
        self.trainable_parameters = sum(
            p.numel() for m in (bundle.unet, bundle.text_encoder) for p in m.parameters() if p.requires_grad
        )

    def _encode_images(self, examples) -> torch.Tensor:
        images = torch.stack([data.load_image(e.image, self.bundle.resolution) for e in examples])
        if self.bundle.vae is None:
            return images
        encoded = []
        with torch.no_grad():
            for chunk in images.split(8):
                encoded.append(self.bundle.vae.encode(chunk.to(self.device)).latent_dist.sample() * self.bundle.latent_scale)
        return torch.cat(encoded).cpu()

    def _prepare_data(self):
        memory = self.preset.memory
        if self.bundle.vae is None or memory.cache_latents:
            # pixel space: the images are the model's input, there is nothing to encode
            self.images = self._encode_images(self.examples)
            self.class_images = self._encode_images(self.class_examples) if self.class_examples else None
            self.latents_cached = self.bundle.vae is not None
        else:
            self.images = torch.stack([data.load_image(e.image, self.bundle.resolution) for e in self.examples])
            self.class_images = (
                torch.stack([data.load_image(e.image, self.bundle.resolution) for e in self.class_examples])
                if self.class_examples
                else None
            )
            self.latents_cached = False
        self.text_cache = None
        if memory.cache_text_encoder_outputs:
            captions = sorted({e.caption for e in (*self.examples, *self.class_examples)} | {""})
            with torch.no_grad():
                encoded = torch.cat(
                    [encode_prompts(self.bundle, captions[i : i + 32], self.device) for i in range(0, len(captions), 32)]
                )
            self.text_cache = dict(zip(captions, encoded.cpu(), strict=True))
        self.audit.record_host(
            memory={
                "gradient_checkpointing": self.preset.memory.gradient_checkpointing,
                "mixed_precision": self.preset.memory.mixed_precision,
                "cache_latents": "pixel space: no VAE" if self.bundle.vae is None else self.latents_cached,
                "cache_text_encoder_outputs": self.text_cache is not None,
            }
        )

    def _prepare_optimizer(self):
        bundle = self.bundle
        params = [p for m in (bundle.unet, bundle.text_encoder) for p in m.parameters() if p.requires_grad]
        learned = self.plan.trainable_parameters()
        for p in learned:
            p.data = p.data.to(self.device)
        groups = [{"params": params}] + ([{"params": learned}] if learned else [])
        self.optimizer = self.plan.optimizer(groups, default_factory=lambda g: torch.optim.AdamW(g, lr=1e-4))
        self.learned_parameters = learned
        prepared = self.accelerator.prepare(bundle.unet, self.optimizer)
        self.unet, self.optimizer = prepared
        if self.config.train_text_encoder:
            self.text_encoder = self.accelerator.prepare(bundle.text_encoder)
        else:
            self.text_encoder = bundle.text_encoder

    def _prepare_random_streams(self):
        seed, rank = self.config.seed, self.rank
        # Each rank has its own streams (different noise, timesteps, data order and caption
        # decisions); all are derived from --seed, so a run repeats exactly.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + 2 * rank + 1)
        self.sampler = BatchSampler(
            len(self.examples), self.config.batch_size, torch.Generator().manual_seed(seed * 1_000_003 + 2 * rank + 2)
        )
        self.class_sampler = (
            BatchSampler(
                len(self.class_examples), self.config.batch_size, torch.Generator().manual_seed(seed * 1_000_003 + 2 * rank + 3)
            )
            if self.class_examples
            else None
        )
        self.caption_rng = random.Random(f"sdplug-captions-{seed}-{rank}")

    # -- one step -----------------------------------------------------------------------------
    def _text(self, captions: list[str], epoch: int) -> tuple[torch.Tensor, list[bool]]:
        if self.text_cache is not None:
            dropped = [self.plan.caption_dropped(epoch=epoch, rng=self.caption_rng) for _ in captions]
            states = [self.text_cache["" if d else c] for c, d in zip(captions, dropped, strict=True)]
            return torch.stack(states).to(self.device), dropped
        draws = [self.plan.caption(c, epoch=epoch, rng=self.caption_rng) for c in captions]
        tokens = self.bundle.tokenizer(
            [d.text for d in draws],
            padding="max_length",
            max_length=self.bundle.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with torch.set_grad_enabled(self.config.train_text_encoder):
            return self.text_encoder(tokens)[0], [d.dropped for d in draws]

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        if self.bundle.vae is None or self.latents_cached:
            return images.to(self.device)
        with torch.no_grad():
            return self.bundle.vae.encode(images.to(self.device)).latent_dist.sample() * self.bundle.latent_scale

    def _loss(self, sampler: BatchSampler, examples, images) -> tuple[torch.Tensor, dict]:
        epoch, indices = sampler.next()
        hidden, dropped = self._text([examples[i].caption for i in indices], epoch)
        latents = self._latents(images[indices])
        noise = self.plan.noise(latents, self.noise_generator)
        t = self.plan.timesteps(len(indices), generator=self.noise_generator, device=self.device)
        noisy = self.plan.noisy_input(latents, noise, t)
        target = self.plan.target(latents, noise, t)
        with self.accelerator.autocast():
            prediction = self.unet(noisy, t, encoder_hidden_states=hidden).sample
        raw = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, prediction.dim())))
        weighted = self.plan.weight(raw, t)
        bins = (t * TIMESTEP_BINS // self.plan.num_train_timesteps).clamp(max=TIMESTEP_BINS - 1).tolist()
        for b, r, w in zip(bins, raw.detach().tolist(), weighted.detach().tolist(), strict=True):
            self.loss_bins["raw_sum"][b] += r
            self.loss_bins["weighted_sum"][b] += w
            self.loss_bins["count"][b] += 1
        draw = {"indices": indices, "timesteps": t.tolist(), "dropped": dropped, "noise_sum": float(noise.target.double().sum())}
        return weighted.mean(), draw

    def train_step(self) -> float:
        loss, draw = self._loss(self.sampler, self.examples, self.images)
        if self.class_sampler is not None:
            prior_loss, _ = self._loss(self.class_sampler, self.class_examples, self.class_images)
            loss = loss + self.config.prior_loss_weight * prior_loss
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.learned_parameters:  # not inside the DDP module: average by hand
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.audit.step()
        self.step += 1
        if self.config.record_draws or len(self.draw_log) < 3:  # the first draws prove ranks differ
            self.draw_log.append({"step": self.step, **draw, "loss": loss.item()})
        return loss.item()

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> None:
        unwrapped = self.accelerator.unwrap_model(self.unet)
        shared = None
        if self.accelerator.is_main_process:
            shared = {
                "weights": checkpoint.trainable_state(unwrapped, self.bundle.text_encoder),
                "learned": [p.detach().cpu() for p in self.learned_parameters],
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "loss_bins": self.loss_bins,
                "losses": self.losses,
            }
        streams = {
            "noise": self.noise_generator.get_state(),
            "sampler": self.sampler.state_dict(),
            "class_sampler": self.class_sampler.state_dict() if self.class_sampler else None,
            "captions": self.caption_rng.getstate(),
            "audit": self.audit.state_dict(),
            "draw_log": self.draw_log,
        }
        checkpoint.save(directory, rank=self.rank, shared=shared, streams=streams)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, directory: Path) -> None:
        shared, streams = checkpoint.load(Path(directory), rank=self.rank)
        checkpoint.load_trainable_state(shared["weights"], self.accelerator.unwrap_model(self.unet), self.bundle.text_encoder)
        with torch.no_grad():
            for p, saved in zip(self.learned_parameters, shared["learned"], strict=True):
                p.copy_(saved.to(p.device))
        self.optimizer.load_state_dict(shared["optimizer"])
        self.step, self.loss_bins, self.losses = shared["step"], shared["loss_bins"], shared["losses"]
        self.noise_generator.set_state(streams["noise"])
        self.sampler.load_state_dict(streams["sampler"])
        if self.class_sampler is not None:
            self.class_sampler.load_state_dict(streams["class_sampler"])
        self.caption_rng.setstate(streams["captions"])
        self.audit.load_state_dict(streams["audit"])
        self.draw_log = streams["draw_log"]

    # -- the run -------------------------------------------------------------------------------
    def _grid(self, name: str) -> dict | None:
        if not (self.config.samples and self.accelerator.is_main_process):
            return None
        unet = self.accelerator.unwrap_model(self.unet)
        images, grid = sample_grid(
            self.bundle,
            unet,
            self.plan,
            list(self.config.sample_prompts),
            list(self.config.sample_seeds),
            list(self.config.guidance_scales),
            steps=self.config.sample_steps,
            device=self.device,
        )
        grid.save(self.config.output / f"samples-{name}.png")
        return images

    def run(self) -> dict:
        config, accelerator = self.config, self.accelerator
        if config.resume is not None:
            self.load_checkpoint(config.resume)
        elif config.samples:
            self.samples_before = self._grid("before")
        if config.log_with:
            accelerator.init_trackers("sdplug", config={"preset": self.preset.name, "mode": config.mode, "steps": config.steps})
        last = config.stop_after or config.steps
        progress = None
        if config.progress and accelerator.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=last, initial=self.step, desc=f"sdplug {config.mode}", unit="step")
        started, first_step = time.perf_counter(), self.step
        while self.step < last:
            loss = self.train_step()
            self.losses.append(loss)
            if progress is not None:
                rate = (self.step - first_step) / max(time.perf_counter() - started, 1e-9)
                progress.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
                progress.update(1)
            if config.log_with:
                accelerator.log({"loss": loss}, step=self.step)
            if config.save_every and self.step % config.save_every == 0 and self.step < last:
                self.save_checkpoint(config.output / f"checkpoint-{self.step}")
        if progress is not None:
            progress.close()
        elapsed = time.perf_counter() - started
        self.seconds_per_step = elapsed / max(self.step - first_step, 1)
        if config.stop_after is not None:
            self.save_checkpoint(config.output / f"checkpoint-{self.step}")
            return self.audit.report()
        report = self._finish()
        if config.log_with:
            accelerator.end_training()
        return report

    def _finish(self) -> dict:
        config, accelerator = self.config, self.accelerator
        problems = self.audit.problems()
        if problems:
            raise SdplugError("the audit found strategies that did not apply: " + "; ".join(problems))
        unwrapped = accelerator.unwrap_model(self.unet)
        self.audit.record_host(
            optimizer={
                "class": f"{type(self.optimizer.optimizer if hasattr(self.optimizer, 'optimizer') else self.optimizer).__module__}."
                f"{type(self.optimizer.optimizer if hasattr(self.optimizer, 'optimizer') else self.optimizer).__name__}",
                "state_bytes_per_trainable_parameter": round(
                    state_bytes(self.optimizer)
                    / max(self.trainable_parameters + sum(p.numel() for p in self.learned_parameters), 1),
                    4,
                ),
                "trainable_parameters": self.trainable_parameters,
                "fell_back": self.plan.optimizer_fell_back,
            },
            run={
                "mode": config.mode,
                "model": self.bundle.source,
                "prediction_type": self.bundle.prediction_type,
                "processes": accelerator.num_processes,
                "seconds_per_step": round(self.seconds_per_step, 4),
                "peak_memory": self._peak_memory(),
            },
        )
        from accelerate.utils import gather_object

        ranks = gather_object([{"rank": self.rank, "draws": self.draw_log[:3], "audit": self.audit.state_dict()}])
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return self.audit.report()
        out = config.output
        preset_toml = self.preset.to_toml()
        (out / "preset.toml").write_text(preset_toml)
        if config.mode == "lora":
            lora.save_kohya_lora(
                out / "lora.safetensors",
                unwrapped,
                self.bundle.text_encoder if config.train_text_encoder else None,
                rank=config.lora_rank,
                alpha=self.lora_alpha,
                preset_toml=preset_toml,
                extra={"steps": self.step, "seed": config.seed},
            )
        else:
            self.bundle.unet = unwrapped
            models.save_folder(self.bundle, out / "model")
            (out / "model" / "sdplug_preset.toml").write_text(preset_toml)
        edges = [i * self.plan.num_train_timesteps // TIMESTEP_BINS for i in range(TIMESTEP_BINS + 1)]
        means = lambda key: [s / c if c else None for s, c in zip(self.loss_bins[key], self.loss_bins["count"], strict=True)]  # noqa: E731
        loss_per_timestep_plot(
            out / "loss-per-timestep.png",
            edges,
            means("raw_sum"),
            means("weighted_sum"),
            f"{self.preset.name}: loss per timestep bin ({self.step} steps)",
        )
        self.samples_after = self._grid("after")
        report = self.audit.report()
        report["loss_per_timestep_bin"] = {
            "bin_edges": edges,
            "mean_loss": means("raw_sum"),
            "mean_weighted_loss": means("weighted_sum"),
        }
        report["per_rank"] = [
            {
                "rank": r["rank"],
                "first_draws": r["draws"],
                "caption": r["audit"]["caption"],
                "noise_draws": r["audit"]["noise"]["draws"],
            }
            for r in ranks
        ]
        (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
        accelerator.wait_for_everyone()
        return report

    def _peak_memory(self) -> dict:
        peak = {"process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if self.device.type == "cuda":
            peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return peak


def train(config: TrainConfig) -> dict:
    trainer = Trainer(config)
    report = trainer.run()
    if trainer.accelerator.is_main_process and config.stop_after is None:
        print(f"\nsdplug audit ({config.output / 'audit.json'}):\n{trainer.audit.summary()}")
    return report
