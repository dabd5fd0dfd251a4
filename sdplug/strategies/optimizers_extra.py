"""Optimizers from their own packages: Prodigy, D-Adaptation Adam, schedule-free AdamW, CAME, AdEMAMix 8-bit.

Each package is an extra of sdplug (``pip install "sdplug[prodigy]"``, ...), imported only when
its optimizer is chosen; a missing one is a ``MissingDependencyError`` with that command, raised
by ``check_available`` so a plan refuses the preset before anything loads. Their conventions are
kept here, not left to the user:

- Prodigy and D-Adaptation estimate the step size themselves (``adapts_step_size``); ``lr``
  multiplies that estimate, so it is about 1.0 (the default). ``plan.optimizer`` gives every
  trained group that lr whatever lrs a host's groups carry (groups at lr 0 stay frozen). They
  estimate one step size from all parameter groups together, so every trained group must have
  the same lr: ``build`` alone refuses groups with different lrs, which the packages would
  refuse only at the first step.
- Schedule-free AdamW needs no lr schedule (keep the host's schedule constant; it warms up by
  ``warmup_steps``) and has train and eval modes: ``build`` returns it in train mode, and hosts
  switch it to eval around sampling, validation and saving (``sdplug.strategies.optimizer_modes``).
"""

from __future__ import annotations

import importlib.metadata
import math
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field

from sdplug import optional
from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.log import logger
from sdplug.params import strategy_params
from sdplug.strategies.base import OptimizerStrategy
from sdplug.strategies.optimizer import (
    _ADAM_BETAS,
    _Beta,
    _Betas,
    _Bitsandbytes8bit,
    _Eps,
    _LearningRate,
    _Min8bitSize,
    _WeightDecay,
)

# A multiplier of the optimizer's own step-size estimate: about 1.0; above 10 is a typo.
_AdaptiveLr = Annotated[float, Field(gt=0.0, le=10.0)]
_Betas3 = Annotated[list[_Beta], Field(min_length=3, max_length=3)]
_ADEMAMIX_BETAS = [0.9, 0.999, 0.9999]  # fast EMA, second moment, slow EMA
_CAME_BETAS = [0.9, 0.999, 0.9999]  # first moment, second moment, confidence
_CAME_EPS = [1e-30, 1e-16]  # second moment, confidence
_Steps = Annotated[int, Field(ge=1)]
# Below this lr an adaptive optimizer is almost surely running on an lr meant for AdamW.
_ADAPTIVE_LR_WARNING = 0.1


def _require(package: str, distribution: str, extra: str, feature: str) -> ModuleType:
    """``sdplug.optional.require``, its install command naming sdplug's extra."""
    if not optional.is_available(package):
        raise MissingDependencyError(
            f"{feature} needs the package {distribution!r}, which is not installed. "
            f'Install it with: pip install "sdplug[{extra}]"  (or: pip install {distribution})'
        )
    return optional.require(package, feature=feature)


class _PackageOptimizer(OptimizerStrategy):
    """An optimizer class from an optional package: found, checked and imported only when chosen."""

    package: ClassVar[str] = ""  # the import name
    distribution: ClassVar[str] = ""  # the name pip installs
    extra: ClassVar[str] = ""  # sdplug's extra that installs it
    class_name: ClassVar[str] = ""

    def _optimizer_class(self) -> Any:
        feature = f"optimizer {self.class_name}"
        module = _require(self.package, self.distribution, self.extra, feature)
        cls = getattr(module, self.class_name, None)
        if cls is None:
            version = importlib.metadata.version(self.distribution)
            raise MissingDependencyError(
                f"{feature}: the installed {self.distribution} {version} has no {self.class_name}. "
                f'Upgrade it with: pip install -U "sdplug[{self.extra}]"'
            )
        return cls

    def check_available(self) -> None:
        self._optimizer_class()


class _OneLearningRate(_PackageOptimizer):
    """Optimizers that estimate one step size for all groups together (D-Adaptation's family)."""

    adapts_step_size = True
    if TYPE_CHECKING:  # a field of every subclass
        lr: float

    def _groups(self, params: Any) -> list[Any]:
        """``params`` as a list, refused when its trained groups do not share one lr."""
        params = list(params)
        lrs = {float(g.get("lr", self.lr)) if isinstance(g, dict) else self.lr for g in params}
        trained = sorted(lr for lr in lrs if lr != 0)
        name = self.class_name
        if len(trained) > 1:
            raise SdplugError(
                f"optimizer {name}: the parameter groups have different learning rates "
                f"({', '.join(f'{lr:g}' for lr in trained)}). {name} estimates one step size for all "
                "parameters together and multiplies it by one lr, so different group lrs break that "
                f"estimate ({self.distribution} itself refuses them at the first step). Groups at lr 0 "
                "(frozen) are fine. Give every trained group the same lr: set lr in the preset's "
                "[optimizer] table (it then becomes every trained group's lr), or give the host one "
                "learning rate (kohya: leave --unet_lr and --text_encoder_lr unset, or set them equal)."
            )
        if trained and trained[0] < _ADAPTIVE_LR_WARNING:
            logger.warning(
                f"optimizer {name}: lr {trained[0]:g} is far below 1.0. {name} estimates the step size "
                "itself and lr multiplies that estimate (use about 1.0), so this makes every step about "
                f"{1 / trained[0]:.0f}x smaller; an lr meant for AdamW (a host's learning rate) does that."
            )
        return params


@strategy_params
class Prodigy(_OneLearningRate):
    """Prodigy, prodigyopt (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", 2024).

    Adam that estimates its own step size: ``lr`` about 1.0 multiplies the estimate, one lr for
    every parameter group (lr 0 groups allowed). ``d_coef`` scales the estimate (below 1 for a
    smaller step); ``safeguard_warmup`` keeps it from growing too fast under an lr warmup;
    ``use_bias_correction`` is Adam's, off by default as in the package. 16 bytes of state per
    parameter (two moments, a third for the estimate, the initial weights).
    """

    package = "prodigyopt"
    distribution = "prodigyopt"
    extra = "prodigy"
    class_name = "Prodigy"
    lr: _AdaptiveLr = 1.0
    betas: _Betas = Field(default_factory=lambda: list(_ADAM_BETAS))
    weight_decay: _WeightDecay = 0.0
    decouple: bool = True
    use_bias_correction: bool = False
    safeguard_warmup: bool = False
    d_coef: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0

    def build(self, params):
        groups = self._groups(params)
        return self._optimizer_class()(
            groups,
            lr=self.lr,
            betas=tuple(self.betas),
            weight_decay=self.weight_decay,
            decouple=self.decouple,
            use_bias_correction=self.use_bias_correction,
            safeguard_warmup=self.safeguard_warmup,
            d_coef=self.d_coef,
        )


@strategy_params
class DAdaptAdam(_OneLearningRate):
    """D-Adaptation Adam, dadaptation (Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", 2023).

    Adam that estimates its own step size: ``lr`` about 1.0 multiplies the estimate, one lr for
    every parameter group (lr 0 groups allowed). ``decouple = true`` is AdamW-style weight decay
    (the package's default is Adam's L2). 12 bytes of state per parameter (two moments, a third
    for the estimate).
    """

    package = "dadaptation"
    distribution = "dadaptation"
    extra = "dadapt"
    class_name = "DAdaptAdam"
    lr: _AdaptiveLr = 1.0
    betas: _Betas = Field(default_factory=lambda: list(_ADAM_BETAS))
    weight_decay: _WeightDecay = 0.0
    decouple: bool = False
    use_bias_correction: bool = False

    def build(self, params):
        groups = self._groups(params)
        return self._optimizer_class()(
            groups,
            lr=self.lr,
            betas=tuple(self.betas),
            weight_decay=self.weight_decay,
            decouple=self.decouple,
            use_bias_correction=self.use_bias_correction,
        )


@strategy_params
class AdamWScheduleFree(_PackageOptimizer):
    """Schedule-free AdamW, schedulefree (Defazio et al., "The Road Less Scheduled", 2024).

    No lr schedule: keep the host's constant and warm up with ``warmup_steps``; it takes 1-10x
    AdamW's lr (the package's default 0.0025). Train and eval modes: built in train mode; hosts
    switch it to eval around sampling, validation and saving (``sdplug.strategies.optimizer_modes``).
    8 bytes of state per parameter.
    """

    package = "schedulefree"
    distribution = "schedulefree"
    extra = "schedulefree"
    class_name = "AdamWScheduleFree"
    schedule_free = True
    lr: _LearningRate = 2.5e-3
    betas: _Betas = Field(default_factory=lambda: list(_ADAM_BETAS))
    weight_decay: _WeightDecay = 0.0
    eps: _Eps = 1e-8
    warmup_steps: Annotated[int, Field(ge=0)] = 0

    def build(self, params):
        optimizer = self._optimizer_class()(
            params,
            lr=self.lr,
            betas=tuple(self.betas),
            weight_decay=self.weight_decay,
            eps=self.eps,
            warmup_steps=self.warmup_steps,
        )
        optimizer.train()  # the package refuses a step in eval mode, the mode it starts in
        return optimizer


@strategy_params
class CAME(_PackageOptimizer):
    """CAME, came-pytorch (Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", 2023).

    Adafactor's factored second moments plus a confidence term, with a first moment. Three betas
    (first moment, second moment, confidence) and two eps (second moment, confidence), the
    package's defaults; lr 2e-4 as its README uses.

    State (float32; ``state_bytes_per_parameter``): a full first moment (4 bytes per parameter)
    plus, for a tensor of 2 or more dimensions, row and column factors of the second moment and
    of the confidence over its last two dimensions: ``4 + 8 (1/R + 1/C)`` bytes per parameter of
    an R x C matrix. That is about 4 (AdamW: 8) only when both sides are large: 4.05 for 320 x 320.
    A rank-r LoRA matrix pays ``8 / r`` on its rank side, so rank-4 LoRAs measured 6.1 to 7.2 bytes
    per parameter (AdamW 8, 8-bit AdamW about 2); 1-D tensors keep a full second moment (8), and a
    convolution kernel is factored over its kernel window (a 1 x 1 LoRA kernel: 20).
    """

    package = "came_pytorch"
    distribution = "came-pytorch"
    extra = "came"
    class_name = "CAME"
    lr: _LearningRate = 2e-4
    betas: _Betas3 = Field(default_factory=lambda: list(_CAME_BETAS))
    weight_decay: _WeightDecay = 0.0
    eps: Annotated[list[Annotated[float, Field(gt=0.0, le=1e-2)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: list(_CAME_EPS)
    )
    clip_threshold: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0

    @staticmethod
    def state_bytes_per_parameter(shape: tuple[int, ...]) -> float:
        """Bytes of state CAME keeps per parameter of a float32 tensor of ``shape``."""
        count = math.prod(shape)
        rms = 4.0 / count  # the tensor's RMS, one float
        if len(shape) < 2:
            return 8.0 + rms  # first and second moment, both full
        rows, columns = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
        return 4.0 + 8.0 * (rows + columns) / count + rms  # full first moment; two (row, column) factor pairs

    def build(self, params):
        return self._optimizer_class()(
            params,
            lr=self.lr,
            betas=tuple(self.betas),
            weight_decay=self.weight_decay,
            eps=tuple(self.eps),
            clip_threshold=self.clip_threshold,
        )


@strategy_params
class AdEMAMix8bit(_Bitsandbytes8bit):
    """AdEMAMix with 8-bit states, bitsandbytes >= 0.44 (Pagliardini et al., "The AdEMAMix Optimizer: Better, Faster, Older", 2024).

    Adam plus a slow EMA of the gradients (``betas[2]``) mixed in with weight ``alpha``; the paper
    warms ``alpha`` and ``betas[2]`` up over ``t_alpha`` / ``t_beta3`` steps (set both to the run's
    length; none: no warmup). About 3 bytes of state per parameter.
    """

    bnb_class = "AdEMAMix8bit"
    lr: _LearningRate = 1e-4
    betas: _Betas3 = Field(default_factory=lambda: list(_ADEMAMIX_BETAS))
    alpha: Annotated[float, Field(ge=0.0, le=100.0)] = 5.0
    t_alpha: _Steps | None = None
    t_beta3: _Steps | None = None
    weight_decay: _WeightDecay = 1e-2
    eps: _Eps = 1e-8
    min_8bit_size: _Min8bitSize = 4096

    def check_available(self, device: torch.device | str | None = None) -> None:
        """bitsandbytes before 0.44 (sd-scripts v0.8.7 pins 0.43) has no AdEMAMix: say so, not 'cannot step'."""
        bnb = optional.require("bitsandbytes", feature=f"optimizer {self.bnb_class}")
        if not hasattr(bnb.optim, self.bnb_class):
            raise MissingDependencyError(
                f"optimizer {self.bnb_class} needs bitsandbytes 0.44 or newer; the installed bitsandbytes "
                f'{importlib.metadata.version("bitsandbytes")} has none. Upgrade it with: pip install -U "bitsandbytes>=0.50.2"; '
                "or name a fallback in the preset (optimizer.fallback)."
            )
        super().check_available(device)

    def _extra(self) -> dict:
        return {"alpha": self.alpha, "t_alpha": self.t_alpha, "t_beta3": self.t_beta3, "eps": self.eps}
