"""Optimizers, including bitsandbytes' 8-bit ones (imported only when chosen)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from sdplug.errors import MissingDependencyError
from sdplug.optional import require
from sdplug.params import strategy_params
from sdplug.strategies.base import OptimizerStrategy

_LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
_Betas = Annotated[list[_Beta], Field(min_length=2, max_length=2)]
# A list, as a preset gives it (strict validation reads a TOML array as a list, never a tuple).
_ADAM_BETAS = [0.9, 0.999]
_LION_BETAS = [0.9, 0.99]
_WeightDecay = Annotated[float, Field(ge=0.0, le=1.0)]
_Eps = Annotated[float, Field(gt=0.0, le=1e-2)]


@strategy_params
class AdamW(OptimizerStrategy):
    """AdamW, PyTorch's (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019): 8 bytes of state per parameter."""

    lr: _LearningRate = 1e-4
    betas: _Betas = Field(default_factory=lambda: list(_ADAM_BETAS))
    weight_decay: _WeightDecay = 1e-2
    eps: _Eps = 1e-8

    def build(self, params):
        betas = (self.betas[0], self.betas[1])
        return torch.optim.AdamW(params, lr=self.lr, betas=betas, weight_decay=self.weight_decay, eps=self.eps)


# bitsandbytes keeps 32-bit states for tensors under ``min_8bit_size`` elements (its default
# 4096). A rank-4 LoRA matrix of SD 1.5 has 4 x 320 ... 4 x 1280 elements, so with the default
# most LoRA states stay 32-bit; lower it to quantise them too.
_Min8bitSize = Annotated[int, Field(ge=1, le=2**31)]


class _Bitsandbytes8bit(OptimizerStrategy):
    requires = ("bitsandbytes",)
    implementation_parameters = ("min_8bit_size",)
    bnb_class = ""
    if TYPE_CHECKING:  # the parameters every subclass declares as fields
        lr: float
        betas: list[float]
        weight_decay: float
        min_8bit_size: int

    def check_available(self, device: torch.device | str | None = None) -> None:
        """Importable is not enough: bitsandbytes before 0.50 imports on a CPU-only machine and
        then fails inside ``step()`` ("Torch not compiled with CUDA enabled"). So take one real
        step on the training device, with a tensor large enough for the 8-bit state path."""
        super().check_available()
        import importlib.metadata

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        parameter = torch.nn.Parameter(torch.ones(max(self.min_8bit_size, 4096), device=device))
        parameter.grad = torch.full_like(parameter, 0.5)
        try:
            optimizer = self.build([parameter])
            optimizer.step()
            optimizer.step()  # the second step reads the quantised state the first one wrote
            if not torch.isfinite(parameter).all():
                raise RuntimeError("the step gave non-finite weights")
        except Exception as exc:  # a broken kernel fails in many ways; all mean "cannot train with it"
            version = importlib.metadata.version("bitsandbytes")
            hint = (
                'bitsandbytes 0.50.2 and newer step on a CPU: pip install "bitsandbytes>=0.50.2"'
                if device.type == "cpu"
                else "install the bitsandbytes build for this CUDA version"
            )
            raise MissingDependencyError(
                f"optimizer {self.bnb_class} cannot step on {device} with the installed bitsandbytes {version} "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}). {hint}; "
                "or name a fallback in the preset (optimizer.fallback)."
            ) from exc

    def build(self, params):
        bnb = require("bitsandbytes", feature=f"optimizer {self.bnb_class}")
        cls = getattr(bnb.optim, self.bnb_class)
        return cls(
            params,
            lr=self.lr,
            betas=tuple(self.betas),
            weight_decay=self.weight_decay,
            min_8bit_size=self.min_8bit_size,
            **self._extra(),
        )

    def _extra(self) -> dict:
        """Keyword arguments only some of the bitsandbytes optimizers take."""
        return {}


@strategy_params
class AdamW8bit(_Bitsandbytes8bit):
    """AdamW with block-wise 8-bit states, bitsandbytes (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022): about 2 bytes of state per parameter."""

    bnb_class = "AdamW8bit"
    lr: _LearningRate = 1e-4
    betas: _Betas = Field(default_factory=lambda: list(_ADAM_BETAS))
    weight_decay: _WeightDecay = 1e-2
    eps: _Eps = 1e-8
    min_8bit_size: _Min8bitSize = 4096

    def _extra(self) -> dict:
        return {"eps": self.eps}


@strategy_params
class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose states live in paged memory that can spill to CPU RAM, bitsandbytes (Dettmers et al., 2022)."""

    bnb_class = "PagedAdamW8bit"


@strategy_params
class Lion8bit(_Bitsandbytes8bit):
    """Lion with 8-bit momentum, bitsandbytes (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023): about 1 byte of state per parameter.

    Lion wants a learning rate 3-10x below AdamW's and a weight decay 3-10x above it.
    """

    bnb_class = "Lion8bit"
    lr: _LearningRate = 3e-5
    betas: _Betas = Field(default_factory=lambda: list(_LION_BETAS))
    weight_decay: _WeightDecay = 1e-1
    min_8bit_size: _Min8bitSize = 4096


@strategy_params
class Adafactor(OptimizerStrategy):
    """Adafactor, transformers' (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018).

    Factored second moments: far below one float of state per parameter for matrices. With no
    ``lr`` it uses the paper's relative step size.
    """

    lr: _LearningRate | None = None
    weight_decay: _WeightDecay = 0.0
    clip_threshold: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0

    def build(self, params):
        from transformers.optimization import Adafactor as TransformersAdafactor

        relative = self.lr is None
        return TransformersAdafactor(
            params,
            lr=self.lr,
            relative_step=relative,
            scale_parameter=relative,
            warmup_init=False,
            clip_threshold=self.clip_threshold,
            weight_decay=self.weight_decay,
        )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (moments, scales, quantisation maps).

    Tensors shared between parameters (bitsandbytes' quantisation maps) count once.
    """
    total = 0
    seen: set[int] = set()
    for state in optimizer.state.values():
        for value in state.values():
            for tensor in _data_tensors(value) if torch.is_tensor(value) and value.numel() else []:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in seen:
                    seen.add(pointer)
                    total += tensor.untyped_storage().nbytes()
    return total


def _data_tensors(value: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``value``'s data: a tensor subclass wrapping others (torchao's
    8-bit states: codes, block scales, quantisation map) has no storage of its own."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(value):
        return [value]
    names, _ = value.__tensor_flatten__()
    return [inner for name in names for inner in _data_tensors(getattr(value, name))]
