"""The preset's settings sections -- not strategies, plain keys that hosts apply or refuse.

``[memory]`` trades speed for memory; ``[schedule]`` changes the noise schedule the plan and
the host train and sample with. Both merge key by key under ``extends``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from sdplug.params import field_names, strategy_params


@strategy_params
class MemorySettings:
    """Host settings that trade speed for memory; hosts apply them or refuse loudly."""

    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cache_latents: bool = False
    cache_text_encoder_outputs: bool = False


@strategy_params
class ScheduleSettings:
    """The noise schedule. ``zero_terminal_snr``: Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed" -- the schedule rescaled so that ``a_T = 0`` (the last
    step is pure noise) with ``a_0`` kept (``sdplug.schedule.rescale_zero_terminal_snr``). An
    epsilon-prediction model cannot learn SNR 0 (its target there carries no information about
    the image), so the paper trains v-prediction; ``epsilon_ok = true`` says the preset knows.

    Peers: kohya sd-scripts ``--zero_terminal_snr`` and diffusers' ``rescale_betas_zero_snr``
    rescale the same way; EveryDream2's ``zero_terminal_snr`` rescales the betas of its
    training scheduler only. sdplug's hosts rescale the training schedule and sampling alike."""

    zero_terminal_snr: bool = False
    epsilon_ok: bool = False
    # rectified flow only (``sdplug.process.Flow``): the shift of the sigmas (SD3's 3.0; kohya
    # ``--discrete_flow_shift``), or the resolution-dependent shift (FLUX; kohya
    # ``--timestep_sampling flux_shift``, OneTrainer's dynamic timestep shifting): ``mu`` from
    # ``base_shift`` at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len``, tokens being
    # the latent's ``(H / patch_size) (W / patch_size)``. Refused with a scheduler that shifts itself.
    # ``patch_size`` is the model's, which a host that knows its model supplies (HunyuanImage-2.1: 1,
    # FLUX.1: 2); written, it must agree with that; unwritten where the host does not say, FLUX's 2.
    flow_shift: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    dynamic_shift: bool = False
    base_shift: Annotated[float, Field(ge=-10.0, le=10.0)] = 0.5
    max_shift: Annotated[float, Field(ge=-10.0, le=10.0)] = 1.15
    base_seq_len: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    max_seq_len: Annotated[int, Field(ge=2, le=1_000_000)] = 4096
    patch_size: Annotated[int, Field(ge=1, le=64)] | None = None


@strategy_params
class EMASettings:
    """An exponential moving average of the trained weights (``sdplug.plan.ema``); on when ``decay``
    is set. ``update_every``: optimizer steps between updates; ``start_step``: the step from
    which it averages (before it, it follows the weights); ``device``: ``"cpu"`` keeps the
    averaged copy off the GPU, ``"same"`` beside the weights."""

    decay: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    update_every: Annotated[int, Field(ge=1, le=100_000)] = 1
    start_step: Annotated[int, Field(ge=0)] = 0
    device: Literal["same", "cpu"] = "same"


def settings_table(settings: Any) -> dict[str, Any]:
    """The settings by name. Not ``dataclasses.asdict``: type checkers do not see a
    ``strategy_params`` class as a stdlib dataclass (it is a pydantic one)."""
    return {name: getattr(settings, name) for name in field_names(type(settings))}
