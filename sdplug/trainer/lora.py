"""LoRA adapters (peft), their export in the kohya / A1111 key format, and reading such files back.

Keys: ``lora_unet_<module path, dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``, and ``lora_te_...`` for the text encoder: what kohya sd-scripts writes, A1111
reads and diffusers' ``load_lora_weights`` converts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdplug.errors import SdplugError, printable

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, targets: list[str], seed: int) -> int:
    """Attach LoRA adapters to ``targets`` of ``model``; returns the trainable parameter count.

    peft draws the initial down-projections from torch's global generator, whose state depends
    on whatever ran before (loading a model from disk draws nothing, building one draws a lot):
    the draw is made from ``seed`` alone, with the global state put back afterwards.

    peft's own ``inject_adapter_in_model``, not the ``add_adapter`` mixins of diffusers and
    transformers: those are that same call behind their own peft version gates (transformers
    5.24 demands a peft 0.22 that is not released, so every released peft failed there), plus
    bookkeeping for their adapter loading and saving, which sdplug does not use (it writes and
    merges kohya keys itself, lora.py / generate.py).
    """
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # ignore: peft types lora_alpha as int, but only ever divides by it (scaling = alpha / r),
        # and kohya LoRAs (which sdplug writes) have float alphas
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)  # type: ignore[arg-type]
        inject_adapter_in_model(config, model, adapter_name="default")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_trainable(bundle, *, mode: str, rank: int, alpha: float, train_text_encoder: bool, seed: int) -> None:
    """LoRA adapters (``mode`` "lora") or the whole weights ("dreambooth") of the UNet, and of
    the text encoder with ``train_text_encoder``, become trainable; everything else is frozen."""
    if mode == "lora":
        # initial weights from the run's seed: two seeds, so the UNet's and the text encoder's
        # adapters do not start as copies of one draw
        add_lora(bundle.unet, rank=rank, alpha=alpha, targets=UNET_TARGETS, seed=2 * seed)
        if train_text_encoder:
            add_lora(bundle.text_encoder, rank=rank, alpha=alpha, targets=TEXT_ENCODER_TARGETS, seed=2 * seed + 1)
    else:
        bundle.unet.requires_grad_(True)
        bundle.text_encoder.requires_grad_(train_text_encoder)
    # from_pretrained returns modules in eval mode, and transformers checkpoints (and drops out)
    # only in train mode: trained modules train, a frozen text encoder stays in eval
    bundle.unet.train()
    bundle.text_encoder.train(train_text_encoder)


def lora_layers(model: torch.nn.Module):
    """(module path, down weight, up weight, scaling alpha) for each peft LoRA layer."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            down = module.lora_A["default"].weight
            up = module.lora_B["default"].weight
            alpha = module.scaling["default"] * down.shape[0]
            yield name, down, up, alpha


def kohya_state_dict(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for prefix, model in (("lora_unet", unet), ("lora_te", text_encoder)):
        if model is None:
            continue
        for name, down, up, alpha in lora_layers(model):
            if prefix == "lora_te" and not name.startswith("text_model."):
                # transformers 5 flattened CLIPTextModel; kohya keys keep the SD-era path
                name = f"text_model.{name}"
            key = f"{prefix}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            state[f"{key}.lora_up.weight"] = up.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state


def save_kohya_lora(
    path: Path, unet, text_encoder, *, rank: int, alpha: float, preset_toml: str, extra: dict | None = None
) -> int:
    """Write the LoRA file; the resolved preset goes into its metadata. Returns the key count."""
    state = kohya_state_dict(unet, text_encoder)
    if not state:
        raise ValueError("no LoRA layers found to save")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "sdplug_preset": preset_toml,
        "sdplug_run": json.dumps(extra or {}),
    }
    save_file(state, str(path), metadata=metadata)
    # safetensors creates its file 0600; a LoRA is meant to be shared, so it follows the umask
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return len(state)


@dataclasses.dataclass(frozen=True)
class KohyaLayer:
    """One layer of a kohya LoRA file: ``delta = alpha / rank * up @ down``."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return self.alpha / self.rank * (self.up.float() @ self.down.float())


def read_kohya_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA .safetensors file; the tensors are not checked yet (``kohya_layers``)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise SdplugError(f"--lora {printable(str(path))}: no such file.")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise SdplugError(f"--lora {printable(str(path))}: not a readable .safetensors file ({printable(str(exc))}).") from None


def kohya_layers(state: dict[str, torch.Tensor], path: Path) -> dict[str, KohyaLayer]:
    """The layers of a kohya LoRA's tensors by key stem, each checked: a down and an up matrix of
    one rank of at least 1, floating point, finite, and a finite single-number alpha (the rank
    when absent). A file that is not one is refused whole, naming the first offending key."""
    where = f"--lora {printable(str(path))}"
    others = sorted(k for k in state if not k.endswith(KOHYA_SUFFIXES))
    if others:
        raise SdplugError(
            f"{where}: keys that are not kohya LoRA keys (.lora_down.weight / .lora_up.weight / .alpha): "
            f"{', '.join(printable(k) for k in others[:5])}. sdplug sample applies plain LoRA on linear layers."
        )
    stems = sorted({k[: -len(suffix)] for k in state for suffix in KOHYA_SUFFIXES if k.endswith(suffix)})
    layers = {}
    for stem in stems:
        shown = printable(stem)
        for suffix in (".lora_down.weight", ".lora_up.weight"):
            if f"{stem}{suffix}" not in state:
                raise SdplugError(
                    f"{where}: layer {shown} has no {suffix}; each layer needs .lora_down.weight and "
                    ".lora_up.weight (and may have .alpha). The file is incomplete."
                )
        for key in (f"{stem}{suffix}" for suffix in KOHYA_SUFFIXES if f"{stem}{suffix}" in state):
            tensor = state[key]
            if not tensor.is_floating_point():
                raise SdplugError(
                    f"{where}: {printable(key)} is {str(tensor.dtype).removeprefix('torch.')}; LoRA tensors are floating point."
                )
            if not bool(torch.isfinite(tensor).all()):
                raise SdplugError(
                    f"{where}: {printable(key)} is not finite (it holds NaN or inf): the file is damaged "
                    "or its training diverged."
                )
        down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
        for key, matrix, layout in (
            (f"{stem}.lora_down.weight", down, "(rank, in_features)"),
            (f"{stem}.lora_up.weight", up, "(out_features, rank)"),
        ):
            if matrix.dim() != 2:
                raise SdplugError(
                    f"{where}: {printable(key)} has shape {tuple(matrix.shape)}; it must be a 2-D {layout} matrix "
                    "(sdplug sample applies LoRA to linear layers only)."
                )
        if down.shape[0] == 0:
            raise SdplugError(
                f"{where}: layer {shown} has rank 0 (its .lora_down.weight is {tuple(down.shape)}): a LoRA layer has rank 1 or more."
            )
        if up.shape[1] != down.shape[0]:
            raise SdplugError(
                f"{where}: layer {shown}: .lora_up.weight is {tuple(up.shape)} (rank {up.shape[1]}), .lora_down.weight "
                f"is {tuple(down.shape)} (rank {down.shape[0]}); the two ranks must be equal."
            )
        alpha = state.get(f"{stem}.alpha")
        if alpha is not None and alpha.numel() != 1:
            raise SdplugError(f"{where}: {shown}.alpha has shape {tuple(alpha.shape)}; it must be one number.")
        layers[stem] = KohyaLayer(down=down, up=up, alpha=float(down.shape[0]) if alpha is None else float(alpha.reshape(())))
    return layers
