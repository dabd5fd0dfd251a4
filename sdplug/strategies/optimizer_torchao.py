"""AdamW with 8-bit states from torchao: the 8-bit optimizer for machines bitsandbytes does not serve.

torchao's optimizers are plain PyTorch (tensor subclasses plus ``torch.compile``) and use
none of torchao's native kernels, so they run wherever torch runs. torchao is an extra of sdplug
(``pip install "sdplug[torchao]"``), imported only when ``torchao_adamw8bit`` is chosen; it
requires no torch of its own, so pip never replaces yours. Two of its conventions matter here:

- every parameter's update is compiled with ``torch.compile`` (one compilation per distinct
  parameter shape and state kind, about 5-10 s each on a CPU, less once inductor's disk cache
  holds them), so the first steps of a run take seconds to minutes, longer the more shapes the
  model has, and need the toolchain inductor uses (a C++ compiler on CPU, Triton on GPU).
  ``compile_step = false`` runs the same update eagerly under
  ``torch.compiler.set_stance("force_eager")``: no compilation, slower steps;
- it keeps each group's ``lr`` as a 0-d tensor (changed in place, as PyTorch's lr schedulers
  do); the audit records it as a float (``sdplug.plan.optimizer_groups.describe``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any, Literal

import torch
from pydantic import Field

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.params import strategy_params
from sdplug.strategies.optimizer import _ADAM_BETAS, _Betas, _Eps, _LearningRate, _WeightDecay
from sdplug.strategies.optimizers_extra import _PackageOptimizer, _require

# torchao quantises a state in blocks of this many values, and only when the parameter has at
# least 4096 values and a multiple of the block size; powers of two divide every SD shape.
_BlockSize = Literal[32, 64, 128, 256, 512, 1024, 2048, 4096]


@functools.cache
def _eager(cls: Any) -> Any:
    """``cls`` whose step runs torchao's compiled update eagerly (no ``torch.compile`` cost)."""

    def step(self: Any, closure: Any = None) -> Any:
        with torch.compiler.set_stance("force_eager"):
            return cls.step(self, closure)

    return type(f"Eager{cls.__name__}", (cls,), {"step": step, "__module__": __name__, "__doc__": cls.__doc__})


@strategy_params
class TorchaoAdamW8bit(_PackageOptimizer):
    """AdamW with block-wise 8-bit states, torchao's ``torchao.optim.AdamW8bit`` (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022).

    The same method as bitsandbytes' AdamW8bit (sdplug's ``adamw8bit``): both moments stored as
    8-bit codes of a dynamic quantisation map with one fp32 scale per block of ``block_size``
    values, about 2 bytes of state per parameter. Unlike ``adamw8bit`` it needs no bitsandbytes
    build for the machine's CUDA (pure PyTorch, compiled by ``torch.compile``), and its small
    tensors stay fp32 at a fixed threshold: fewer than 4096 values (biases, norms, most rank-4
    LoRA matrices), or a count not a multiple of ``block_size`` (bitsandbytes: ``min_8bit_size``).
    Defaults are torchao's (lr 1e-3 where ``adamw8bit`` has 1e-4). ``compile_step = false``
    skips the compilation of the first steps (see the module docstring).
    """

    package = "torchao"
    distribution = "torchao"
    extra = "torchao"
    class_name = "AdamW8bit"
    implementation_parameters = ("block_size", "compile_step")

    lr: _LearningRate = 1e-3
    betas: _Betas = Field(default_factory=lambda: list(_ADAM_BETAS))
    eps: _Eps = 1e-8
    weight_decay: _WeightDecay = 1e-2
    block_size: _BlockSize = 256
    compile_step: bool = True

    def _optimizer_class(self) -> Any:
        """``torchao.optim.AdamW8bit`` (torchao 0.10 and newer; 0.9 had it only as a prototype)."""
        feature = "optimizer torchao_adamw8bit"
        _require(self.package, self.distribution, self.extra, feature)
        try:
            cls = getattr(importlib.import_module("torchao.optim"), self.class_name, None)
        except ModuleNotFoundError:
            cls = None
        if cls is None:
            raise MissingDependencyError(
                f"{feature}: the installed torchao {importlib.metadata.version('torchao')} has no "
                f'torchao.optim.AdamW8bit (0.10 and newer have it). Upgrade it with: pip install -U "sdplug[{self.extra}]"'
            )
        return cls

    def build(self, params):
        cls = self._optimizer_class()
        if not self.compile_step:
            if not hasattr(torch.compiler, "set_stance"):
                raise SdplugError(
                    f"optimizer torchao_adamw8bit: compile_step = false needs torch 2.6 or newer "
                    f"(torch.compiler.set_stance); this torch is {torch.__version__}. Remove the key to compile the step."
                )
            cls = _eager(cls)
        return cls(
            params,
            lr=self.lr,
            betas=tuple(self.betas),
            eps=self.eps,
            weight_decay=self.weight_decay,
            block_size=self.block_size,
        )
