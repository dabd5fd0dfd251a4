"""The diffusion process a plan is bound to: how a clean latent becomes a training input, what
the model predicts, and the signal-to-noise ratio of every training timestep.

Two kinds:

- ``DDPM`` (SD1.5, SDXL): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` over a table of
  ``alphas_cumprod`` ``a_t``; ``SNR = a_t / (1 - a_t)``; the model predicts ``epsilon``, ``v``
  (``v_prediction``) or ``x0`` (``sample``); the model's time is the index ``t``.
- ``Flow`` (rectified flow: SD3, FLUX, Lumina, ...): ``x_t = (1 - s) x0 + s eps`` with
  ``s = sigma`` in ``(0, 1]``; ``SNR = ((1 - s) / s)**2``; the model predicts the velocity
  ``eps - x0`` (``velocity``: SD3, FLUX, diffusers' scripts) or its negative ``x0 - eps`` with
  its time reversed (``velocity_reversed``: Lumina 2); the model's time is ``s * 1000``
  (``(1 - s) * 1000`` reversed).

How a host reads the model's output before the loss (``Flow.output``, kohya's
``--model_prediction_type``, expressed on the process; ``x_t = x0 + s v`` with ``v = eps - x0``):

- ``raw`` (kohya's recommended setting, diffusers' FLUX scripts): the output ``v^`` is compared
  with the velocity ``v``;
- ``sigma_scaled`` (EDM's preconditioning, Karras et al. 2022 section 5, as SD3's scripts use
  it: kohya's ``sd3_train_network.py``, diffusers' ``--precondition_outputs``): the x0 the output
  implies, ``x_t - s v^``, is compared with ``x0``. Its error is ``-s (v^ - v)``, so its MSE is
  ``s**2 |v^ - v|**2``: the loss is in x0 space (``loss_space`` ``"sample"``) and every
  weighting applies to it as written in x0 (``sigma_sqrt``, ``s**-2``, then gives the plain
  velocity MSE). kohya's FLUX, Chroma and HunyuanImage scripts (where it is the default)
  compare that same ``x_t - s v^`` with the velocity target ``eps - x0`` instead, a loss whose
  minimiser, ``v^ = (x_t - E[v | x_t]) / s``, is not the velocity their samplers step with;
  sdplug implements the SD3 form;
- ``additive`` (kohya's FLUX scripts): ``v^ + x_t`` is compared with ``v``, so the network
  learns ``v - x_t`` and its velocity is ``output + x_t`` (``Flow.velocity``); kohya's FLUX
  sampler steps with the output itself.

Training timesteps are indices into the process's table on both kinds, lowest noise first. A
flow table is the unshifted grid ``(i + 1) / N``; a sampler draws a position ``u`` along it
(``TimestepStrategy.position``) and the process maps it (``Flow.index``): to the grid point
``(floor(u N) + 1) / N``, as diffusers' flow scripts index their table, then through the shift,
``s x / (1 + (s - 1) x)`` (diffusers' ``FlowMatchEulerDiscreteScheduler`` ``shift``), or the
resolution-dependent shift ``e^mu / (e^mu + 1 / x - 1)`` with ``mu`` linear in the image's token
count (``DynamicShift``: FLUX's ``base_shift`` / ``max_shift``), to the nearest table entry:
within ``1 / (2N)`` of the continuous sigma kohya's flow scripts draw.

Every strategy that reads a schedule reads ``alphas_cumprod``. A flow process gives the
variance-preserving table with the same SNR at every index, ``a = SNR / (1 + SNR)``, so a
weighting or threshold written from SNR means the same on both kinds; the conversion of a
weight into the model's prediction space is the one place that differs
(``sdplug.strategies.loss_weighting``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.schedule import DDPM_PREDICTION_TYPES, FLOW_PREDICTION_TYPES, noisy_sample, prediction_target, same_schedule

KINDS = ("ddpm", "flow")
# how a host reads a flow model's output before the loss (see the module's docstring)
FLOW_OUTPUTS = ("raw", "sigma_scaled", "additive")


@dataclasses.dataclass(frozen=True, eq=False)
class DDPM:
    """The DDPM process of a table of ``alphas_cumprod`` (float32, on the CPU)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    kind: str = dataclasses.field(default="ddpm", init=False)

    def __post_init__(self) -> None:
        _check_prediction_type(self.prediction_type, "a DDPM model", DDPM_PREDICTION_TYPES, FLOW_PREDICTION_TYPES)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def noisy_input(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noisy_sample(self.alphas_cumprod, latents, noise, timesteps)

    @property
    def loss_space(self) -> str:
        """The space the loss compares in, which a weighting is converted into: the prediction's."""
        return self.prediction_type

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return prediction_target(self.alphas_cumprod, self.prediction_type, latents, noise, timesteps)

    def prediction(self, model_output: torch.Tensor, noisy_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the loss compares with ``target``: the model's output itself."""
        return model_output

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The time the model takes: the index itself."""
        return timesteps

    def same_as(self, other: Any) -> bool:
        return isinstance(other, DDPM) and same_schedule(other.alphas_cumprod, self.alphas_cumprod)

    def record(self) -> dict[str, Any]:
        """The audit's ``schedule`` facts of this process."""
        return {
            "process": self.kind,
            "alpha_cumprod_first": float(self.alphas_cumprod[0]),
            "alpha_cumprod_last": float(self.alphas_cumprod[-1]),  # 0 under zero-terminal SNR
            "prediction_type": self.prediction_type,
        }


@dataclasses.dataclass(frozen=True)
class DynamicShift:
    """The resolution-dependent shift: ``mu`` linear in the image's token count, from
    ``base_shift`` at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (FLUX.1:
    0.5 at 256, 1.15 at 4096), tokens being the latent's ``(H / patch) (W / patch)``."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch_size: int = 2

    def mu(self, height: int, width: int) -> float:
        tokens = (height // self.patch_size) * (width // self.patch_size)
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (tokens - self.base_seq_len)


@dataclasses.dataclass(frozen=True, eq=False)
class Flow:
    """A rectified-flow process over a table of ``sigmas`` (ascending, in ``(0, 1]``, float32 on
    the CPU: the grid ``flow_sigmas(N)`` by default), with the ``shift`` (or ``dynamic`` shift)
    that maps a sampler's position to sigma (``index``)."""

    sigmas: torch.Tensor
    prediction_type: str = "velocity"
    shift: float = 1.0
    dynamic: DynamicShift | None = None
    output: str = "raw"
    # the model's latent patch, a fact of its architecture: its image tokens are the latent's
    # (H / patch) (W / patch), what a dynamic shift counts (FLUX.1, SD3, Lumina 2, Anima, Qwen-Image,
    # Z-Image: 2; HunyuanImage-2.1's 1x1 patches and FLUX.2's already packed latents: 1). None: the
    # host does not say, and [schedule] patch_size (FLUX's 2 unless written) stands.
    patch_size: int | None = None
    kind: str = dataclasses.field(default="flow", init=False)

    def __post_init__(self) -> None:
        _check_prediction_type(self.prediction_type, "a rectified-flow model", FLOW_PREDICTION_TYPES, DDPM_PREDICTION_TYPES)
        if self.output not in FLOW_OUTPUTS:
            raise SdplugError(f"flow output {self.output!r} is not one of {', '.join(FLOW_OUTPUTS)}.")
        sigmas = self.sigmas
        if sigmas.dim() != 1 or len(sigmas) < 2 or not bool(((sigmas > 0) & (sigmas <= 1)).all()):
            raise SdplugError("a flow process needs a table of at least 2 sigmas in (0, 1].")
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise SdplugError("a flow process's sigmas ascend (index 0 is the least noise).")

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The variance-preserving table with this process's SNR at every index:
        ``a = (1 - s)**2 / ((1 - s)**2 + s**2)`` (0 at ``s = 1``, pure noise). In float64: at the
        smallest sigmas ``1 - a`` is about ``s**2``, below float32's resolution next to 1."""
        s = self.sigmas.to(torch.float64)
        return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)

    def index(self, position: torch.Tensor, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The table index of each sampler position in ``[0, 1)`` (see the module's docstring).
        ``latent_size`` ``(H, W)``: the step's latents, which a dynamic shift needs."""
        n = self.num_train_timesteps
        x = (torch.floor(position.double() * n).clamp(0, n - 1) + 1) / n  # the grid point, in (0, 1]
        if self.dynamic is not None:
            if latent_size is None:
                raise SdplugError(
                    "this flow process shifts by resolution (a dynamic shift): give the step's latent size, "
                    "plan.timesteps(batch, latent_size=(height, width))."
                )
            e_mu = math.exp(self.dynamic.mu(*latent_size))
            x = e_mu / (e_mu + 1 / x - 1)
        elif self.shift != 1.0:
            x = self.shift * x / (1 + (self.shift - 1) * x)
        table = self.sigmas.to(device=x.device, dtype=torch.float64)
        above = torch.searchsorted(table, x).clamp(max=n - 1)
        below = (above - 1).clamp(min=0)
        nearer_below = (x - table[below]).abs() < (table[above] - x).abs()
        return torch.where(nearer_below, below, above)

    def sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each sample's sigma, shaped to broadcast over ``like``."""
        s = self.sigmas.to(like.device)[timesteps.to(like.device).long()].to(like.dtype)
        return s.view(-1, *([1] * (like.dim() - 1)))

    def noisy_input(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - s) x0 + s noise``."""
        s = self.sigma(timesteps, latents)
        return (1 - s) * latents + s * noise

    @property
    def loss_space(self) -> str:
        """The space the loss compares in, which a weighting is converted into: the velocity's,
        or x0's (``"sample"``) when the output is ``sigma_scaled``."""
        return "sample" if self.output == "sigma_scaled" else self.prediction_type

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``noise - x0`` (velocity) or ``x0 - noise`` (velocity_reversed); ``x0`` itself when the
        output is ``sigma_scaled``."""
        if self.output == "sigma_scaled":
            return latents
        if self.prediction_type == "velocity_reversed":
            return latents - noise
        return noise - latents

    def _signed_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``s`` such that ``x_t = x0 + s * velocity`` in this prediction type's sign."""
        s = self.sigma(timesteps, like)
        return -s if self.prediction_type == "velocity_reversed" else s

    def prediction(self, model_output: torch.Tensor, noisy_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the loss compares with ``target``: the output (``raw``), the x0 it implies
        ``x_t - s v^`` (``sigma_scaled``), or ``v^ + x_t`` (``additive``)."""
        if self.output == "sigma_scaled":
            return noisy_input - self._signed_sigma(timesteps, noisy_input) * model_output
        if self.output == "additive":
            return model_output + noisy_input
        return model_output

    def velocity(self, model_output: torch.Tensor, noisy_input: torch.Tensor) -> torch.Tensor:
        """The velocity a sampler steps with: the output, or ``output + x_t`` for ``additive``."""
        return model_output + noisy_input if self.output == "additive" else model_output

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The time the model takes: ``s * 1000`` (SD3, FLUX, diffusers' scripts), or
        ``(1 - s) * 1000`` for the reversed convention (Lumina 2)."""
        s = self.sigmas.to(timesteps.device)[timesteps.long()]
        return (1 - s) * 1000 if self.prediction_type == "velocity_reversed" else s * 1000

    def same_as(self, other: Any) -> bool:
        return (
            isinstance(other, Flow)
            and other.sigmas.shape == self.sigmas.shape
            and bool(torch.allclose(other.sigmas.float().cpu(), self.sigmas.float().cpu(), atol=1e-6))
        )

    def record(self) -> dict[str, Any]:
        """The audit's ``schedule`` facts of this process."""
        shift: dict[str, Any] = {"shift": self.shift, "output": self.output}
        if self.dynamic is not None:
            shift = {"shift": "dynamic", "dynamic_shift": dataclasses.asdict(self.dynamic), "output": self.output}
        return {
            "process": self.kind,
            **shift,
            "sigma_first": float(self.sigmas[0]),
            "sigma_last": float(self.sigmas[-1]),
            "prediction_type": self.prediction_type,
        }


Process = DDPM | Flow


def _check_prediction_type(given: str, model: str, allowed: tuple[str, ...], others: tuple[str, ...]) -> None:
    if given not in allowed:
        raise SdplugError(
            f"prediction type {given!r} is not one of {model} ({', '.join(allowed)}); {', '.join(others)} are the other process's."
        )


def flow_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """The training sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler`` without dynamic
    shifting, ascending: ``s_i = (i + 1) / N``, then ``shift * s / (1 + (shift - 1) * s)``
    (a flow process's table is the unshifted grid; its shift maps positions onto it)."""
    if num_train_timesteps < 2 or not shift > 0:
        raise SdplugError(f"flow sigmas need at least 2 timesteps and a shift > 0 (got {num_train_timesteps}, {shift}).")
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return (shift * s / (1 + (shift - 1) * s)).to(torch.float32)


def flow_from_scheduler(noise_scheduler: Any, prediction_type: str | None, output: str = "raw") -> Flow:
    """The flow process of a diffusers ``FlowMatchEulerDiscreteScheduler`` (its ``config``:
    ``num_train_timesteps``, ``shift``, or ``use_dynamic_shifting`` with ``base_shift``,
    ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``); ``output``: how the host
    reads the model's output (``FLOW_OUTPUTS``)."""
    config: Any = getattr(noise_scheduler, "config", None)
    name = type(noise_scheduler).__name__
    steps = int(getattr(config, "num_train_timesteps", 1000))
    dynamic = None
    if getattr(config, "use_dynamic_shifting", False):
        if getattr(config, "time_shift_type", "exponential") != "exponential":
            raise SdplugError(f"{name} has time_shift_type {config.time_shift_type!r}: sdplug knows 'exponential' only.")
        dynamic = DynamicShift(
            float(config.base_shift), float(config.max_shift), int(config.base_image_seq_len), int(config.max_image_seq_len)
        )
    for option in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if getattr(config, option, None):
            raise SdplugError(f"{name} has {option} set: sdplug knows the plain (shifted) flow-matching sigmas only.")
    shift = 1.0 if dynamic is not None else float(getattr(config, "shift", 1.0))
    return Flow(flow_sigmas(steps), prediction_type or "velocity", shift, dynamic, output)


def is_flow_scheduler(noise_scheduler: Any) -> bool:
    """Whether a scheduler is a flow-matching one (diffusers' ``FlowMatch*`` schedulers, which
    have sigmas and a shift and no ``alphas_cumprod``)."""
    return type(noise_scheduler).__name__.startswith("FlowMatch") and not hasattr(noise_scheduler, "alphas_cumprod")
