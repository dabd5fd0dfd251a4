"""What a training step feeds the model: latents (or pixels) and text-encoder states.

Latents are cached once when the preset says so (or when there is no VAE: pixel space);
text-encoder outputs likewise, with the empty caption's, which a dropped caption gets. Every
caption decision is the plan's (``plan.caption`` / ``plan.caption_dropped``), made with each
sample's own epoch.
"""

from __future__ import annotations

import torch

from sdplug.plan.pipelines import CaptionDraw
from sdplug.trainer import data
from sdplug.trainer.config import OptionError
from sdplug.trainer.sampling import encode_prompts

# the reference trainer's models have one text encoder; a preset's dropout may name it
TEXT_ENCODERS = ("clip",)


class TrainingInputs:
    """The images of a run (as the model takes them) and the text states for its captions."""

    def __init__(self, bundle, plan, examples, class_examples, *, memory, device, latent_generator):
        self.bundle, self.plan, self.device, self.latent_generator = bundle, plan, device, latent_generator
        self.latents_cached = bundle.vae is not None and memory.cache_latents
        # pixel space: the images are the model's input, there is nothing to encode
        prepare = self._encode if bundle.vae is None or memory.cache_latents else self._load
        self.images = prepare(examples)
        self.masks: torch.Tensor | None = None  # see load_masks
        self.class_images = prepare(class_examples) if class_examples else None
        self.text_cache = None
        if memory.cache_text_encoder_outputs:
            captions = sorted({e.caption for e in (*examples, *class_examples)} | {""})
            with torch.no_grad():
                encoded = torch.cat([encode_prompts(bundle, captions[i : i + 32], device) for i in range(0, len(captions), 32)])
            self.text_cache = dict(zip(captions, encoded.cpu(), strict=True))

    def load_masks(self, examples) -> dict:
        """Each image's loss mask (all ones for an image without one); what was found, for the audit."""
        resolution = self.bundle.resolution
        found = [data.load_mask(e.image, resolution) for e in examples]
        if not any(m is not None for m in found):
            raise data.DataError(
                f"--masked-loss: none of the {len(examples)} images has a mask (a same-named '{data.MASK_SUFFIX}' file "
                "or an alpha channel); give masks, or train without --masked-loss."
            )
        ones = torch.ones(1, resolution, resolution)
        self.masks = torch.stack([m if m is not None else ones for m in found])
        return {
            "images_with_mask": sum(m is not None for m in found),
            "images": len(found),
            "mean_mask": float(self.masks.mean()),
        }

    def memory_record(self) -> dict:
        return {
            "cache_latents": "pixel space: no VAE" if self.bundle.vae is None else self.latents_cached,
            "cache_text_encoder_outputs": self.text_cache is not None,
        }

    def _load(self, examples) -> torch.Tensor:
        return torch.stack([data.load_image(e.image, self.bundle.resolution) for e in examples])

    def _vae(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.bundle.vae.encode(images.to(self.device)).latent_dist
        return posterior.sample(generator=self.latent_generator) * self.bundle.latent_scale

    def _encode(self, examples) -> torch.Tensor:
        images = self._load(examples)
        if self.bundle.vae is None:
            return images
        with torch.no_grad():
            return torch.cat([self._vae(chunk) for chunk in images.split(8)]).cpu()

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        if self.bundle.vae is None or self.latents_cached:
            return images.to(self.device)
        with torch.no_grad():
            return self._vae(images)

    def text(self, text_encoder, captions: list[str], epochs: list[int], *, train_text_encoder: bool):
        """The text-encoder states of ``captions`` and which of them a dropout emptied."""
        if self.text_cache is not None:
            dropped = [bool(self.plan.dropped_encoders(TEXT_ENCODERS, epoch=e)) for e in epochs]
            states = [self.text_cache["" if d else c] for c, d in zip(captions, dropped, strict=True)]
            return torch.stack(states).to(self.device), dropped
        drawn = [self.plan.caption(c, epoch=e) for c, e in zip(captions, epochs, strict=True)]
        # the model's one encoder, named by a dropout: its caption goes in empty
        texts = [CaptionDraw("", True) if TEXT_ENCODERS[0] in t.dropped_encoders else t for t in drawn]
        tokenizer = self.bundle.tokenizer
        tokens = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        with torch.set_grad_enabled(train_text_encoder):
            return text_encoder(tokens)[0], [t.dropped for t in texts]


def check_no_mask_options(preset) -> bool:
    """A run without --masked-loss: a preset whose ``[loss]`` sets mask options is refused (they
    would silently do nothing). False when it sets none."""
    loss = preset.loss
    if loss is not None and any(k in loss.params for k in ("unmasked_weight", "normalize_by_mask_area")):
        raise OptionError(
            f"{loss.path or preset.path}: [loss] sets mask options, and this run has no masks: add --masked-loss "
            f"(masks from '{data.MASK_SUFFIX}' files or the images' alpha channel), or remove the options."
        )
    return False
