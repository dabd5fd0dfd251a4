"""Learned per-noise-level loss weighting (EDM2's uncertainty weighting).

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024),
section 2 / eq. 21: a tiny network predicts a log-variance ``u`` per noise level and the loss
becomes ``L / exp(u) + u``, so each level's weight adapts to its own loss scale; the answer to
the open question at the end of the min-SNR article (Hang et al., "Efficient Diffusion
Training via Min-SNR Weighting Strategy", 2023).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from sdplug.params import strategy_params
from sdplug.schedule import check_prediction_type, snr
from sdplug.strategies.base import LossWeighting

# log-SNR spans about [-10, 10] on SD and zero-terminal schedules; SNR = 0 maps to the low end.
_LOG_SNR_RANGE = 12.0


class UncertaintyNetwork(torch.nn.Module):
    """u(log SNR): fixed random Fourier features of the noise level, then one linear layer.

    The layer starts at zero, so training starts from the host's unweighted loss (u = 0).
    """

    # registered buffers, declared so type checkers do not take them for Tensor | Module
    frequencies: torch.Tensor
    phases: torch.Tensor

    def __init__(self, num_features: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(num_features, generator=generator))
        self.register_buffer("phases", torch.rand(num_features, generator=generator))
        self.linear = torch.nn.Linear(num_features, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, log_snr: torch.Tensor) -> torch.Tensor:
        x = (log_snr.clamp(-_LOG_SNR_RANGE, _LOG_SNR_RANGE) / _LOG_SNR_RANGE).unsqueeze(-1)
        features = torch.cos(2 * math.pi * (x * self.frequencies + self.phases)) * math.sqrt(2)
        return self.linear(features).squeeze(-1)


@strategy_params
class LearnedWeighting(LossWeighting):
    """Learned uncertainty weighting, loss ``L / exp(u(t)) + u(t)`` (Karras et al., EDM2, 2024).

    The host must train ``parameters()`` together with the model (the adapters add them to the
    optimizer). ``weights`` reports the current effective weight ``exp(-u)``. ``u`` reads the
    noise level as log SNR alone and weights the loss in the model's own space, so it is the
    same weighting on a rectified flow (log SNR = 2 log((1 - sigma) / sigma)).
    """

    processes = frozenset({"ddpm", "flow"})
    learnable = True
    num_features: Annotated[int, Field(ge=1, le=1024)] = 64
    seed: Annotated[int, Field(ge=0)] = 0

    def __post_init__(self):
        self.network = UncertaintyNetwork(self.num_features, self.seed)

    def uncertainty(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        ratio = snr(timesteps, alphas_cumprod)
        log_snr = ratio.clamp_min(torch.finfo(torch.float32).tiny).log()
        param = self.network.linear.weight
        return self.network(log_snr.to(device=param.device, dtype=param.dtype))

    def weight_for(self, snr_values, prediction_type):
        raise NotImplementedError("learned weighting depends on timesteps; use weights() or apply()")

    def weights(self, timesteps, alphas_cumprod, prediction_type):
        check_prediction_type(prediction_type)
        with torch.no_grad():
            return torch.exp(-self.uncertainty(timesteps, alphas_cumprod)).to(torch.float32)

    def apply(self, loss, timesteps, alphas_cumprod, prediction_type):
        check_prediction_type(prediction_type)
        u = self.uncertainty(timesteps, alphas_cumprod).to(device=loss.device, dtype=loss.dtype)
        return loss / torch.exp(u) + u

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.parameters())

    def buffers(self) -> list[torch.Tensor]:
        return list(self.network.buffers())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in self.network.state_dict().items():
                value.copy_(state[key].to(value.device, value.dtype))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LearnedWeighting:
        # Module.to moves parameters AND buffers (frequencies, phases) in place: the Parameter
        # objects, and so an optimizer's references to them, stay the same.
        self.network.to(device=device, dtype=dtype)
        return self
