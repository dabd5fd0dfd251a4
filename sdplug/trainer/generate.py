"""``sdplug sample``: a grid of images from a trained model or LoRA.

It draws exactly as training's sample grids do (``sampling.sample_grid``): DDIM with
classifier-free guidance, starting from the preset's training noise family. The preset is the
one given, else the one saved with the LoRA (its metadata) or the model folder
(``sdplug_preset.toml``). A LoRA trained on the embedded tiny model is applied to that model
rebuilt from the seed recorded in the LoRA; the LoRA is merged into the weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from sdplug.errors import SdplugError
from sdplug.plan import NoisePipeline
from sdplug.presets import Preset, load_preset, parse_preset
from sdplug.trainer import models
from sdplug.trainer.config import TrainConfig
from sdplug.trainer.outputs import atomic
from sdplug.trainer.sampling import sample_grid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


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


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise SdplugError(f"--lora {path}: no such file.")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise SdplugError(f"--lora {path}: not a readable .safetensors file ({exc}).") from None


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

    Every key must belong to a layer of this model: a LoRA for another model is refused, not
    partly applied."""
    others = sorted(k for k in state if not k.endswith(LORA_SUFFIXES))
    if others:
        raise SdplugError(
            f"--lora {path}: keys that are not kohya LoRA keys (.lora_down.weight / .lora_up.weight / .alpha): "
            f"{', '.join(others[:5])}. sdplug sample applies plain LoRA on linear layers."
        )
    targets = _lora_targets(bundle)
    stems = sorted({k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")})
    unknown = [s for s in stems if s not in targets]
    if unknown or not stems:
        raise SdplugError(
            f"--lora {path}: {len(unknown)} of its {len(stems)} layers are not linear layers of this model "
            f"(e.g. {', '.join(unknown[:3]) or 'none at all'}). Was it trained on another model? Pass that one as --model."
        )
    with torch.no_grad():
        for stem in stems:
            down, up, layer = state[f"{stem}.lora_down.weight"].float(), state[f"{stem}.lora_up.weight"].float(), targets[stem]
            alpha = float(state[f"{stem}.alpha"]) if f"{stem}.alpha" in state else float(down.shape[0])
            if (up.shape[0], down.shape[1]) != tuple(layer.weight.shape):
                raise SdplugError(
                    f"--lora {path}: {stem} is {up.shape[0]}x{down.shape[1]}, the model's layer is "
                    f"{tuple(layer.weight.shape)}. Was it trained on another model? Pass that one as --model."
                )
            layer.weight += (alpha / down.shape[0] * (up @ down)).to(layer.weight.dtype)
    return len(stems)


def base_model(request: SampleRequest, run: dict) -> models.ModelBundle:
    if request.model is not None:
        return models.load(request.model)
    if request.lora is None:
        raise SdplugError("sdplug sample needs --model (a model folder) or --lora (a LoRA that sdplug train wrote), or both.")
    if run.get("base_model") == "embedded":
        return models.embedded(prediction_type=run.get("prediction_type", "epsilon"), seed=int(run.get("seed", 0)))
    recorded = f" It records its base model as {run['base_model']}." if run.get("base_model") else ""
    raise SdplugError(f"--lora {request.lora}: give the model it was trained on as --model.{recorded}")


def choose_preset(request: SampleRequest, metadata: dict[str, str]) -> tuple[Preset | None, str]:
    """(preset, where it came from); None when no preset is known: the start noise is then N(0, I)."""
    if request.preset is not None:
        return load_preset(request.preset), request.preset
    if "sdplug_preset" in metadata:
        source = f"{request.lora} (its metadata)"
        return parse_preset(tomllib.loads(metadata["sdplug_preset"]), path=source), source
    if request.model is not None and (Path(request.model) / "sdplug_preset.toml").is_file():
        return load_preset(Path(request.model) / "sdplug_preset.toml"), str(Path(request.model) / "sdplug_preset.toml")
    return None, "none"


def generate(request: SampleRequest) -> tuple[dict, str]:
    """Write the grid to ``request.output``; returns (images by guidance, a one-line description)."""
    from sdplug.trainer.requirements import check_trainer_requirements

    check_trainer_requirements()
    if request.steps < 1:
        raise SdplugError(f"--steps must be >= 1, got {request.steps}.")
    output = Path(request.output)
    image_format = Image.registered_extensions().get(output.suffix.lower())
    if image_format is None:
        raise SdplugError(f"-o {output}: not an image file name; end it in .png, .jpg or .webp.")
    state, metadata = read_lora(Path(request.lora)) if request.lora is not None else ({}, {})
    try:
        run = json.loads(metadata.get("sdplug_run", "{}"))
    except ValueError:  # only --model can then say what the base is (base_model raises without it)
        run = {"base_model": "(unreadable: its 'sdplug_run' metadata is not JSON)"}
    bundle = base_model(request, run)
    merged = merge_kohya_lora(bundle, state, Path(request.lora)) if request.lora is not None else 0
    preset, source = choose_preset(request, metadata)
    family = request.noise
    noise = NoisePipeline([spec.create() for spec in preset.noise]) if preset is not None else NoisePipeline([])
    kinds = ", ".join(s.type for s in preset.noise) if preset is not None and preset.noise else "gaussian"
    start = f"{kinds} noise (preset {preset.name}, from {source})" if preset is not None else "N(0, I) (no preset given or saved)"
    if family == "gaussian":
        start = "N(0, I) (--noise gaussian)"
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules: tuple[torch.nn.Module | None, ...] = (bundle.unet, bundle.text_encoder, bundle.vae)
    for module in modules:
        if module is not None:
            module.to(device).eval()
    images, grid = sample_grid(
        bundle, bundle.unet, noise, list(request.prompts), list(request.seeds), list(request.guidance_scales),
        steps=request.steps, device=device, noise_family=family,
    )  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic(output) as tmp:
        grid.save(tmp, format=image_format)
    lora_note = f" + LoRA {request.lora} ({merged} layers)" if request.lora is not None else ""
    return images, f"wrote {output}: {bundle.source}{lora_note}; start noise: {start}"
