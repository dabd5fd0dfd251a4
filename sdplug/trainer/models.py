"""Loading the model to train: the embedded tiny default, or a local Stable Diffusion 1.x/2.x.

Nothing is fetched from a hub: every load is ``local_files_only``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sdplug.errors import SdplugError
from sdplug.trainer import tiny

if TYPE_CHECKING:
    # Not ``from diffusers import ...``: type checkers read diffusers' top level as its dummy
    # objects (the branch for a missing torch), which have none of the real attributes.
    from diffusers.models import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

PIXEL_MARKER = "sdplug_model.json"


class ModelError(SdplugError):
    """A --model path that is not a model sdplug can train."""


@dataclasses.dataclass
class ModelBundle:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None  # None: pixel space, "latents" are images in [-1, 1]
    resolution: int
    source: str

    @property
    def flow(self) -> bool:
        """Whether the model is a rectified flow (a flow-matching scheduler)."""
        return type(self.scheduler).__name__.startswith("FlowMatch")

    @property
    def prediction_type(self) -> str:
        if self.flow:
            return "velocity"  # what the flow-matching schedulers' step takes
        # diffusers types config as a dict (it is one, a FrozenDict, that also allows attribute access)
        return self.scheduler.config["prediction_type"]

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def latent_scale(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config["scaling_factor"])


def embedded(*, prediction_type: str = "epsilon", seed: int = 0) -> ModelBundle:
    """The embedded tiny model: DDPM with ``prediction_type`` epsilon, v_prediction or sample,
    or a rectified flow with ``velocity`` (the same UNet; the flow-matching scheduler)."""
    tokenizer = tiny.build_tokenizer()
    flow = prediction_type == "velocity"
    return ModelBundle(
        unet=tiny.build_unet(seed),
        text_encoder=tiny.build_text_encoder(len(tokenizer), seed),
        tokenizer=tokenizer,
        scheduler=tiny.build_flow_scheduler() if flow else tiny.build_scheduler(prediction_type),
        vae=None,
        resolution=tiny.IMAGE_SIZE,
        source="embedded tiny pixel-space model",
    )


def load(path: Path, *, resolution: int | None = None) -> ModelBundle:
    """A model from a local diffusers folder, an sdplug pixel-space folder, or a single file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if path.is_file():
        return _single_file(path, resolution)
    if not path.is_dir():
        raise ModelError(f"--model {path}: no such file or folder.")
    if (path / "text_encoder_2").is_dir():
        raise ModelError(
            f"--model {path}: an SDXL model; the reference trainer trains SD 1.x/2.x (use the kohya adapter for SDXL)."
        )
    pixel = (path / PIXEL_MARKER).is_file()
    if not pixel and not (path / "model_index.json").is_file():
        raise ModelError(
            f"--model {path}: not a model folder (no model_index.json). Give a diffusers Stable Diffusion folder, "
            "a single-file .safetensors/.ckpt checkpoint, or a folder sdplug saved."
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = _scheduler_class(path).from_pretrained(path, subfolder="scheduler", local_files_only=True)
        vae = None if pixel else AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {path}: cannot load its components ({exc}).") from None
    if vae is None:  # pixel space
        native = unet.config.sample_size
    else:
        native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelBundle(unet, text_encoder, tokenizer, scheduler, vae, resolution or native, str(path))


def _scheduler_class(path: Path) -> Any:
    """The training scheduler of a saved folder: a flow-matching one when its config names it,
    else DDPM's (whatever inference scheduler the folder names, its betas are DDPM's)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = path / "scheduler" / "scheduler_config.json"
    name = json.loads(config.read_text()).get("_class_name", "") if config.is_file() else ""
    return FlowMatchEulerDiscreteScheduler if str(name).startswith("FlowMatch") else DDPMScheduler


def _single_file(path: Path, resolution: int | None) -> ModelBundle:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if path.suffix not in (".safetensors", ".ckpt"):
        raise ModelError(f"--model {path}: not a model file (expected .safetensors or .ckpt, or a diffusers folder).")
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds here; all mean "cannot use this file offline"
        raise ModelError(
            f"--model {path}: cannot load this single-file checkpoint offline ({type(exc).__name__}: {exc}). "
            "Convert it once to a diffusers folder (diffusers' convert_original_stable_diffusion_to_diffusers.py) and pass the folder."
        ) from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return ModelBundle(pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, pipe.vae, resolution or native, str(path))


def save_folder(bundle: ModelBundle, directory: Path) -> None:
    """A diffusers StableDiffusionPipeline folder (``model_index.json``), which ``load`` reads back.

    A pixel-space model has no VAE: its folder records ``vae`` as null and carries PIXEL_MARKER.
    diffusers loads it with ``StableDiffusionPipeline.from_pretrained(folder, vae=None)``, and
    ``output_type="latent"`` returns its images (pixels in [-1, 1]); ``sdplug sample`` writes PNGs.
    """
    # the class diffusers' top level exports, imported where type checkers see the real one
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    directory.mkdir(parents=True, exist_ok=True)
    # Passed as one dict: diffusers annotates ``scheduler`` as its KarrasDiffusionSchedulers enum
    # (it takes a scheduler instance) and vae/safety_checker/feature_extractor as required, though
    # None is what a pixel-space model and requires_safety_checker=False are documented to pass.
    components: dict[str, Any] = {
        "vae": bundle.vae,
        "text_encoder": bundle.text_encoder,
        "tokenizer": bundle.tokenizer,
        "unet": bundle.unet,
        "scheduler": bundle.scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    pipeline = StableDiffusionPipeline(**components)
    # diffusers warns that the absent VAE "cannot be saved"; a pixel-space model has none by design
    notices = logging.getLogger("diffusers.pipelines.pipeline_utils")
    drop = lambda record: "self.vae=None" not in str(record.msg)  # noqa: E731
    notices.addFilter(drop)
    try:
        pipeline.save_pretrained(directory)
    finally:
        notices.removeFilter(drop)
    if bundle.vae is None:
        marker = {
            "pixel_space": True,
            "resolution": bundle.resolution,
            "diffusers": "StableDiffusionPipeline.from_pretrained(folder, vae=None); output_type='latent' gives pixels in [-1, 1]",
        }
        (directory / PIXEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def zero_terminal(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The same scheduler with its betas rescaled to zero-terminal SNR (diffusers'
    ``rescale_betas_zero_snr``: the rescale of Lin et al. 2023 that ``[schedule]`` names)."""
    # a keyword, not a config key: from_config resets keys listed in the config's _use_default_values
    rescaled = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
    return cast("DDPMScheduler", rescaled)  # from_config returns a tuple only with return_unused_kwargs
