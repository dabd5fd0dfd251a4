"""``sdplug sample``: a grid of images from a trained model or LoRA.

It draws exactly as training's sample grids do (``sampling.sample_grid``): DDIM with
classifier-free guidance, starting from the preset's training noise family. The preset is the
one given, else the one saved with the LoRA (its metadata) or the model folder
(``sdplug_preset.toml``). A LoRA trained on the embedded tiny model is applied to that model
rebuilt from the seed recorded in the LoRA, and one trained on a model folder is applied to the
folder its metadata records when that still exists; the LoRA is merged into the weights.

A LoRA file is untrusted input (LoRAs are shared and downloaded): its tensors are checked before
they touch the model, its metadata is checked before it chooses anything, and text from it is
escaped before it is shown. A grid is written only when every image is finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from PIL import Image

from sdplug.errors import SdplugError, printable
from sdplug.log import logger
from sdplug.plan import NoisePipeline
from sdplug.preset import Preset, load_preset, parse_preset_text
from sdplug.trainer import models
from sdplug.trainer.config import EMBEDDED_PREDICTION_TYPES as PREDICTION_TYPES
from sdplug.trainer.config import TrainConfig
from sdplug.trainer.files import atomic
from sdplug.trainer.lora import kohya_layers, read_kohya_lora
from sdplug.trainer.sampling import sample_grid

# torch generators take seeds from 0 to 2**64 - 1 (negative ones are folded into that range)
MAX_SEED = 2**64 - 1
# classifier-free guidance: 1 is the conditional model alone, 0 the unconditional one, above 1
# pushes towards the prompt (3-12 is usual), below 0 away from it. Past +-100 the images are
# only saturated (and at 1e30 not finite): such values are refused as typos.
MAX_GUIDANCE = 100.0


@dataclasses.dataclass
class SampleRequest:
    prompts: list[str]
    output: Path
    model: Path | None = None
    lora: Path | None = None
    preset: str | None = None
    # training's grid defaults, so a run's prompts reproduce its samples-after.png
    guidance_scales: list[float] = dataclasses.field(default_factory=lambda: list(TrainConfig.guidance_scales))
    seeds: list[int] = dataclasses.field(default_factory=lambda: list(TrainConfig.sample_seeds))
    steps: int = TrainConfig.sample_steps
    noise: str = "training"  # or "gaussian"
    device: str | None = None


def _lora_targets(bundle) -> dict[str, torch.nn.Linear]:
    """kohya key stem -> Linear layer, for every Linear of the UNet and the text encoder."""
    targets = {}
    for prefix, model in (("lora_unet", bundle.unet), ("lora_te", bundle.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                if prefix == "lora_te" and not name.startswith("text_model."):
                    name = f"text_model.{name}"  # kohya keys keep the SD-era CLIP path (see lora.py)
                targets[f"{prefix}_{name.replace('.', '_')}"] = module
    return targets


def merge_kohya_lora(bundle, state: dict[str, torch.Tensor], path: Path) -> int:
    """Add each LoRA's ``alpha / rank * up @ down`` to its layer; returns the layers changed.

    The tensors are checked first (``lora.kohya_layers``), then every layer must be a layer of
    this model: a LoRA for another model is refused, not partly applied. A layer whose merged
    weights overflow is refused as it is reached; the bundle is then half-merged, to be discarded."""
    layers = kohya_layers(state, path)
    where = f"--lora {printable(str(path))}"
    targets = _lora_targets(bundle)
    unknown = [s for s in layers if s not in targets]
    if unknown or not layers:
        raise SdplugError(
            f"{where}: {len(unknown)} of its {len(layers)} layers are not linear layers of this model "
            f"(e.g. {', '.join(printable(s) for s in unknown[:3]) or 'none at all'}). "
            "Was it trained on another model? Pass that one as --model."
        )
    for stem, layer in layers.items():
        if (layer.up.shape[0], layer.down.shape[1]) != tuple(targets[stem].weight.shape):
            raise SdplugError(
                f"{where}: {printable(stem)} is {layer.up.shape[0]}x{layer.down.shape[1]}, the model's layer is "
                f"{tuple(targets[stem].weight.shape)}. Was it trained on another model? Pass that one as --model."
            )
    with torch.no_grad():
        for stem, layer in layers.items():
            weight = targets[stem].weight
            merged = weight + layer.delta().to(weight.device, weight.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise SdplugError(
                    f"{where}: layer {printable(stem)} overflows: alpha / rank * up @ down (alpha {layer.alpha:g}, "
                    f"rank {layer.rank}) added to the model's weights is not finite. The file is damaged or not a LoRA "
                    "for this model."
                )
            weight.copy_(merged)
    return len(layers)


def recorded_run(path: Path, metadata: dict[str, str]) -> dict:
    """The LoRA's ``sdplug_run`` metadata (what sdplug train records about the run), checked."""
    try:
        run = json.loads(metadata.get("sdplug_run", "{}"))
    except ValueError as exc:
        raise SdplugError(
            f"--lora {printable(str(path))}: its metadata 'sdplug_run' is not JSON ({printable(str(exc))}). Pass the model it was trained on as --model."
        ) from None
    if not isinstance(run, dict):
        raise SdplugError(
            f"--lora {printable(str(path))}: its metadata 'sdplug_run' is a JSON {type(run).__name__}, not a JSON object. "
            "Pass the model it was trained on as --model."
        )
    return run


def _recorded_embedded(path: Path, run: dict) -> models.ModelBundle:
    """The embedded model rebuilt as the run's ``seed`` and ``prediction_type`` made it."""
    where = f"--lora {printable(str(path))}: its metadata"
    seed = run.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SdplugError(
            f"{where} sdplug_run.seed is {printable(repr(seed))}; it must be an integer from 0 to 2**64 - 1 "
            "(the seed the embedded model was built from)."
        )
    prediction_type = run.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise SdplugError(
            f"{where} sdplug_run.prediction_type is {printable(repr(prediction_type))}; allowed: {', '.join(PREDICTION_TYPES)}."
        )
    return models.embedded(prediction_type=prediction_type, seed=seed)


def _recorded_model(path: Path, run: dict) -> models.ModelBundle:
    """The model folder or file the LoRA records as its base, when it exists here."""
    where = f"--lora {printable(str(path))}: its metadata"
    base = run.get("base_model")
    if base is None:
        raise SdplugError(
            f"--lora {printable(str(path))}: its metadata does not record the model it was trained on "
            "(no sdplug_run.base_model): give the model it was trained on as --model."
        )
    if not isinstance(base, str):
        raise SdplugError(f"{where} sdplug_run.base_model is {printable(repr(base))}, not a string (a model path). Pass --model.")
    shown = printable(base)
    if base == "embedded":
        return _recorded_embedded(path, run)
    recorded = Path(base)
    if not recorded.is_absolute() or not recorded.exists():
        problem = "is not an absolute path" if not recorded.is_absolute() else "does not exist"
        raise SdplugError(
            f"{where} key sdplug_run.base_model names {shown}, which {problem} here. Give the model it was trained on as --model."
        )
    if recorded.is_file() and recorded.suffix != ".safetensors":
        # a .ckpt is a pickle, which runs code when loaded: a downloaded LoRA must not choose one
        raise SdplugError(
            f"{where} key sdplug_run.base_model names {shown}, a file that is not .safetensors (a .ckpt is a pickle, "
            "which can run code when loaded); sdplug loads such a file only when you pass it as --model yourself."
        )
    logger.info("no --model given: using the base model that %s records (sdplug_run.base_model): %s", printable(str(path)), shown)
    try:
        return models.load(recorded)
    except SdplugError as exc:
        raise SdplugError(f"{where} key sdplug_run.base_model names a model that cannot be used: {exc}") from None


def base_model(request: SampleRequest, metadata: dict[str, str]) -> models.ModelBundle:
    if request.model is not None:
        return models.load(request.model)
    if request.lora is None:
        raise SdplugError("sdplug sample needs --model (a model folder) or --lora (a LoRA that sdplug train wrote), or both.")
    return _recorded_model(Path(request.lora), recorded_run(Path(request.lora), metadata))


def choose_preset(request: SampleRequest, metadata: dict[str, str]) -> tuple[Preset | None, str]:
    """(preset, where it came from); None when no preset is known: the start noise is then N(0, I)."""
    if request.preset is not None:
        return load_preset(request.preset), request.preset
    # a preset saved with a LoRA or a model folder came with a download: it may not 'extends'
    # (which could open any file here), and its text is escaped wherever it is shown
    saved = Path(request.model) / "sdplug_preset.toml" if request.model is not None else None
    try:
        if "sdplug_preset" in metadata and request.lora is not None:
            lora = Path(request.lora)
            text = metadata["sdplug_preset"]
            source = f"{lora} (its metadata 'sdplug_preset')"
            return parse_preset_text(text, path=source, embedded_from=f"the LoRA {lora}"), f"{lora} (its metadata)"
        if saved is not None and saved.is_file():
            return load_preset(saved, embedded_from=f"the model folder {request.model}"), str(saved)
    except SdplugError as exc:
        raise SdplugError(f"{exc} (--preset P chooses the start noise instead.)") from None
    return None, "none"


def _check_request(request: SampleRequest) -> None:
    """Options that need no model: refused before anything is loaded."""
    for name, values in (("--prompt", request.prompts), ("--seed", request.seeds), ("--guidance", request.guidance_scales)):
        if not values:
            raise SdplugError(f"{name}: give at least one value.")
    for seed in request.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise SdplugError(f"--seed {seed}: a seed is an integer from 0 to 2**64 - 1.")
    for guidance in request.guidance_scales:
        if not (math.isfinite(guidance) and -MAX_GUIDANCE <= guidance <= MAX_GUIDANCE):
            raise SdplugError(
                f"--guidance {guidance}: a guidance scale is a number from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g} "
                "(1: the prompt alone, 0: no prompt, 3-12 usual, below 0 away from the prompt)."
            )
    if request.steps < 1:
        raise SdplugError(f"--steps {request.steps}: must be from 1 to the model's schedule length (1000 for SD).")
    if request.noise not in ("training", "gaussian"):
        raise SdplugError(f"--noise {printable(str(request.noise))}: must be 'training' or 'gaussian'.")


def _check_output(output: Path) -> str:
    """The PIL format to write ``output`` in; refused before sampling when it cannot be written."""
    image_format = Image.registered_extensions().get(output.suffix.lower())
    if image_format is None:
        raise SdplugError(f"-o {printable(str(output))}: not an image file name; end it in .png, .jpg or .webp.")
    if output.is_dir():
        raise SdplugError(
            f"-o {printable(str(output))}: is a folder; give the image file's name (e.g. {printable(str(output / 'grid.png'))})."
        )
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SdplugError(f"-o {printable(str(output))}: {printable(str(parent))} is not a folder.")
    return image_format


def choose_device(name: str | None) -> torch.device:
    """``--device``, checked by placing a tensor there; default cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shown = printable(name)
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch says "not compiled with CUDA" by assertion
        reason = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise SdplugError(
            f"--device {shown}: not usable here ({reason}). Use cpu, or cuda / cuda:N where CUDA is available."
        ) from None
    if device.type == "meta":
        raise SdplugError(f"--device {shown}: the meta device holds no data to draw images with. Use cpu or cuda.")
    return device


def generate(request: SampleRequest) -> tuple[dict, str]:
    """Write the grid to ``request.output``; returns (images by guidance, a one-line description)."""
    from sdplug.trainer.requirements import check_trainer_requirements

    check_trainer_requirements()
    _check_request(request)
    output = Path(request.output)
    image_format = _check_output(output)
    device = choose_device(request.device)
    state, metadata = read_kohya_lora(Path(request.lora)) if request.lora is not None else ({}, {})
    if request.lora is not None:
        kohya_layers(state, Path(request.lora))  # a damaged file is refused before any model is loaded
    preset, source = choose_preset(request, metadata)
    bundle = base_model(request, metadata)
    schedule_length = bundle.scheduler.config["num_train_timesteps"]
    if request.steps > schedule_length:
        raise SdplugError(
            f"--steps {request.steps}: must be from 1 to {schedule_length}, the length of the model's noise schedule."
        )
    merged = merge_kohya_lora(bundle, state, Path(request.lora)) if request.lora is not None else 0
    family = request.noise
    noise = NoisePipeline([spec.create() for spec in preset.noise]) if preset is not None else NoisePipeline([])
    kinds = ", ".join(s.type for s in preset.noise) if preset is not None and preset.noise else "gaussian"
    start = f"{kinds} noise (preset {preset.name}, from {source})" if preset is not None else "N(0, I) (no preset given or saved)"
    if family == "gaussian":
        start = "N(0, I) (--noise gaussian)"
    modules: tuple[torch.nn.Module | None, ...] = (bundle.unet, bundle.text_encoder, bundle.vae)
    for module in modules:
        if module is not None:
            module.to(device).eval()
    images, grid = sample_grid(
        bundle, bundle.unet, noise, list(request.prompts), list(request.seeds), list(request.guidance_scales),
        steps=request.steps, device=device, noise_family=family, refuse_non_finite=True,
    )  # fmt: skip
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic(output) as tmp:
            grid.save(tmp, format=image_format)
    except OSError as exc:
        raise SdplugError(f"-o {printable(str(output))}: cannot write it ({printable(str(exc))}).") from None
    lora_note = f" + LoRA {request.lora} ({merged} layers)" if request.lora is not None else ""
    return images, printable(f"wrote {output}: {bundle.source}{lora_note}; start noise: {start}")
