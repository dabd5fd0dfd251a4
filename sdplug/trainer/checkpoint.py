"""Checkpoints that resume with the same random streams as an uninterrupted run.

A checkpoint holds the trainable weights, the optimizer, the step, the audit and loss
records, and every random stream of every rank: noise/timestep generator, data order, and
the caption RNG. Weights and optimizer are identical across data-parallel ranks and saved
once; each rank saves its own streams.
"""

from __future__ import annotations

from pathlib import Path

import torch


def trainable_state(*modules: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    state = {}
    for index, module in enumerate(modules):
        if module is None:
            continue
        for name, param in module.named_parameters():
            if param.requires_grad:
                state[f"{index}.{name}"] = param.detach().cpu().clone()
    return state


def load_trainable_state(state: dict[str, torch.Tensor], *modules: torch.nn.Module | None) -> None:
    for index, module in enumerate(modules):
        if module is None:
            continue
        for name, param in module.named_parameters():
            key = f"{index}.{name}"
            if param.requires_grad:
                if key not in state:
                    raise KeyError(f"checkpoint has no weights for {name}; was it saved by a run with other options?")
                with torch.no_grad():
                    param.copy_(state[key].to(param.device, param.dtype))


def save(directory: Path, *, rank: int, shared: dict | None, streams: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if shared is not None:
        torch.save(shared, directory / "shared.pt")
    torch.save(streams, directory / f"rank{rank}.pt")


def load(directory: Path, *, rank: int) -> tuple[dict, dict]:
    from sdplug.errors import SdplugError

    shared_path, streams_path = directory / "shared.pt", directory / f"rank{rank}.pt"
    if not shared_path.is_file() or not streams_path.is_file():
        raise SdplugError(
            f"--resume {directory}: not a checkpoint of this run's shape (needs shared.pt and rank{rank}.pt; "
            "resume with the same number of processes)."
        )
    return torch.load(shared_path, weights_only=False), torch.load(streams_path, weights_only=False)
