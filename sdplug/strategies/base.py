"""The base class of each strategy family: the contract hosts rely on.

Strategies are pure: tensors and keyword arguments in, tensors (or strings) out. They never
import a host, the trainer or the CLI, and never set attributes on a host's objects.
"""

from __future__ import annotations

import inspect
import random
import typing
from collections.abc import Collection
from typing import Any, ClassVar, Literal, Protocol, cast

import torch

from sdplug.schedule import check_prediction_type, snr

PROCESS_KINDS = ("ddpm", "flow")  # sdplug.process.KINDS: the processes a strategy may declare


class Strategy:
    """What every family's strategies share: the capabilities a strategy declares.

    A capability is a class attribute or a method of the family's base class (this one's, or
    one below it), with its default there; a strategy -- a third-party plugin's too -- declares
    one by setting or overriding it. The plan, presets and hosts read the declaration, never
    probe for it, and the registry refuses a strategy that declares one wrongly when it
    registers (``declaration_problems``), naming the plugin.
    """

    # The diffusion processes (``sdplug.process.KINDS``) the strategy is written for: a preset
    # naming it for a model of another process is refused when the plan is bound. A family whose
    # strategies never read the process (captions, optimizers, attention) declares both.
    processes: ClassVar[frozenset[str]] = frozenset({"ddpm"})

    def schedule_problem(self, num_train_timesteps: int) -> tuple[str, str] | None:
        """``(parameter, sentence)`` when a parameter (a timestep) does not fit a schedule of
        ``num_train_timesteps`` steps; None when all fit, as for a strategy without such parameters."""
        return None

    def alphas_problem(self, alphas_cumprod: torch.Tensor) -> tuple[str, str] | None:
        """``(parameter, sentence)`` when a parameter does not fit the schedule's values (a
        zero-terminal one); None when all fit, as for a strategy that does not read them."""
        return None

    @classmethod
    def declaration_problems(cls) -> list[str]:
        """What ``cls`` declares wrongly, one sentence each (empty when nothing): every capability
        of its family's base classes checked against the kind of its default there, then the
        rules between capabilities (``related_declaration_problems``)."""
        problems = []
        for base in reversed(cls.__mro__):
            if not (issubclass(base, Strategy) and base.__module__ == __name__):
                continue  # capabilities are what the base classes here declare
            hints = typing.get_type_hints(base)
            for name, default in vars(base).items():
                if name.startswith("_") or name in ("declaration_problems", "related_declaration_problems"):
                    continue
                problem = _declaration_problem(name, default, getattr(cls, name), hints.get(name))
                if problem is not None:
                    problems.append(problem)
        if not problems and (not cls.processes or not set(cls.processes) <= set(PROCESS_KINDS)):
            problems.append(f"processes is {set(cls.processes)!r}; allowed: a non-empty set of {', '.join(PROCESS_KINDS)}")
        return problems or cls.related_declaration_problems()

    @classmethod
    def related_declaration_problems(cls) -> list[str]:
        """Rules between a family's capabilities (a family's base class adds its own)."""
        return []


def _declaration_problem(name: str, default: Any, value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` declared for the capability ``name`` whose default is ``default``."""
    if isinstance(default, (classmethod, staticmethod)) or inspect.isfunction(default):
        return None if callable(value) else f"{name} is {value!r}, which is not callable (it is a method of the base class)"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{name} is {value!r}, not true or false"
    if isinstance(default, (tuple, frozenset)):
        kind = type(default).__name__
        if isinstance(value, type(default)) and all(isinstance(item, str) for item in value):
            return None
        return f"{name} is {value!r}; allowed: a {kind} of strings"
    if isinstance(default, str):
        # ClassVar[Literal[...]]: the values the base class allows
        choices = typing.get_args(typing.get_args(hint)[0]) if typing.get_args(hint) else (default,)
        if value in choices:
            return None
        return f"{name} is {value!r}; allowed: {', '.join(repr(c) for c in choices)}"
    return None


class NoiseStrategy(Strategy):
    """Makes or reshapes the training noise for a batch of latents.

    ``role`` tells hosts which noise a strategy changes: ``"target"`` strategies change the
    noise the loss is measured against (and mixed into the model input); ``"input"``
    strategies change only the noise mixed into the model's input, leaving the target clean.
    """

    role: ClassVar[Literal["target", "input"]] = "target"
    # True: ``transform`` also takes ``host_rng`` (a ``random.Random``) for what it decides on
    # the host -- shapes, counts -- so a draw on a GPU never waits to read a number back
    uses_host_rng: ClassVar[bool] = False
    # True: ``transform`` also takes ``timesteps`` (one per sample) and ``alphas_cumprod`` (the
    # plan's schedule), so hosts draw the step's timesteps first (``plan.noise(latents, timesteps=t)``)
    uses_timesteps: ClassVar[bool] = False

    def transform(self, noise: torch.Tensor | None, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return new noise shaped like ``latents``; ``noise`` is the noise so far (None: none yet)."""
        raise NotImplementedError

    def audit_facts(self, height: int, width: int) -> dict[str, Any]:
        """What the audit records of this strategy on a ``height`` x ``width`` latent, where that
        decides what it does (Perlin's octaves); nothing for most strategies."""
        return {}

    def prepare(self, alphas_cumprod: torch.Tensor) -> None:
        """Compute, once before any step, what a ``uses_timesteps`` strategy reads of the plan's
        schedule, so that no draw waits on the device; nothing for most strategies."""

    @classmethod
    def related_declaration_problems(cls) -> list[str]:
        if cls.prepare is not NoiseStrategy.prepare and not cls.uses_timesteps:
            return [
                "it defines prepare but does not declare uses_timesteps = True: the plan prepares only time-dependent strategies"
            ]
        return []

    def __call__(self, latents: torch.Tensor, generator: torch.Generator | None = None, **schedule: Any) -> torch.Tensor:
        """This strategy alone: noise of ``latents``' shape, dtype and device (``timesteps=`` and
        ``alphas_cumprod=`` too, for a strategy that ``uses_timesteps``)."""
        if self.uses_timesteps:
            return self.transform(None, latents, generator, **schedule)
        return self.transform(None, latents, generator)


class TimestepStrategy(Strategy):
    """Draws one integer training timestep per sample.

    A sampler that draws a position along the schedule (``u`` in ``[0, 1)``, 0 the least
    noise; DDPM's timestep is ``floor(u T)``) gives it by ``position`` and declares the flow
    process too: a flow plan maps the position to sigma (its shift, or its resolution-dependent
    shift) and then to its table (``sdplug.process.Flow.index``).
    """

    def sample(self, batch_size: int, num_train_timesteps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def position(self, batch_size: int, num_train_timesteps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each sample's position along the schedule in ``[0, 1)`` (float64, on the generator's
        device): for the samplers that declare the flow process."""
        raise NotImplementedError

    def __call__(
        self,
        batch_size: int,
        num_train_timesteps: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A LongTensor of ``batch_size`` timesteps in ``[0, num_train_timesteps)``.

        Drawn on the generator's device (CPU when none) so a seed gives the same timesteps
        wherever the model lives, then moved to ``device``.
        """
        t = self.sample(batch_size, num_train_timesteps, generator=generator)
        return t.to(device) if device is not None else t


class LossWeighting(Strategy):
    """Weights a per-sample diffusion loss by its timestep.

    Subclasses give ``weight_for(snr, prediction_type)``: the weight of a loss measured in the
    model's own prediction space (epsilon, v or x0), finite for every SNR in ``[0, inf)``.
    """

    learnable: ClassVar[bool] = False
    # Parameters that act on the epsilon-prediction weight alone: an SNR floor bounds the division
    # by SNR there, while the v and x0 weights of the same weighting are finite without one. Written
    # in a preset for a v_prediction or sample model they would change nothing, so they are refused.
    epsilon_only_parameters: ClassVar[tuple[str, ...]] = ()

    def weight_for(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        raise NotImplementedError

    def prediction_problem(self, prediction_type: str, given: Collection[str]) -> tuple[str, str] | None:
        """``(parameter, sentence)`` when a parameter the preset wrote (``given``) does nothing for
        a model of ``prediction_type``; None when every one acts."""
        if prediction_type == "epsilon":
            return None
        for name in self.epsilon_only_parameters:
            if name in given:
                return (
                    name,
                    f"{name} has no effect with a {prediction_type} model: it bounds the SNR that the "
                    f"epsilon-prediction weight of {type(self).__name__} divides by, and its {prediction_type} weight "
                    f"is finite at every SNR (0 included) without it. Allowed: leave {name} out with a "
                    f"{prediction_type} model; it applies to epsilon-prediction models only.",
                )
        return None

    def weights(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """One weight per sample."""
        check_prediction_type(prediction_type)
        return self.weight_for(snr(timesteps, alphas_cumprod), prediction_type)

    def apply(
        self, loss: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
    ) -> torch.Tensor:
        """Per-sample loss in, weighted per-sample loss out."""
        w = self.weights(timesteps, alphas_cumprod, prediction_type).to(device=loss.device, dtype=loss.dtype)
        return loss * w

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters the host must add to its optimizer (none for fixed weightings)."""
        return []

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LossWeighting:
        """Move any tensors the weighting holds (none for fixed weightings), in place."""
        return self

    def buffers(self) -> list[torch.Tensor]:
        """Tensors the weighting holds besides its parameters (none for fixed weightings)."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs of the weighting (nothing for fixed weightings)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s tensors in place (optimizer references stay valid)."""


class LossType(Strategy):
    """The loss between a prediction and its target, one value per sample, in float32.

    Subclasses give ``elementwise(model_pred, target, timesteps, alphas_cumprod)``: the loss of
    every element (the prediction's shape, float32). ``per_sample`` applies a loss mask to that
    elementwise loss *before* the mean over the non-batch dimensions, so a masked-out pixel
    never enters the mean. ``timesteps`` may be None for loss types whose ``needs_timesteps()``
    is False (they use no per-sample schedule).
    """

    # a threshold schedule reads SNR, which a flow process gives as DDPM's does
    processes: ClassVar[frozenset[str]] = frozenset({"ddpm", "flow"})

    def needs_timesteps(self) -> bool:
        """Whether ``elementwise`` reads the timesteps (a per-sample threshold schedule)."""
        return False

    def elementwise(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor | None, alphas_cumprod: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def apply_mask(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The elementwise loss times the mask (1 = train, 0 = ignore); the built-ins add options."""
        return loss * mask.to(device=loss.device, dtype=loss.dtype)

    def per_sample(
        self,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor | None,
        alphas_cumprod: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B,)``: the elementwise loss (masked when ``mask`` is given), mean over non-batch dims."""
        loss = self.elementwise(model_pred.float(), target.float(), timesteps, alphas_cumprod)
        if mask is not None:
            loss = self.apply_mask(loss, mask)
        return loss.mean(dim=tuple(range(1, loss.dim())))


class CaptionTransform(Strategy):
    """Rewrites one caption.

    ``needs_text`` False declares a transform that only decides whether a caption is dropped
    (``decide``, ``drop_probability``): the one kind that works on cached text-encoder outputs,
    by substituting the empty caption's embedding.
    """

    # text, before any model: the same on every process
    processes: ClassVar[frozenset[str]] = frozenset({"ddpm", "flow"})

    needs_text: ClassVar[bool] = True

    def dropped_encoders(self) -> tuple[str, ...]:
        """The text encoders a drop decision applies to (a model with several); empty: all of
        them, the caption dropped whole (``dropout``'s ``encoders`` parameter)."""
        return ()

    def __call__(self, caption: str, *, epoch: int = 0, rng: random.Random | None = None) -> str:
        raise NotImplementedError

    def decide(self, *, epoch: int = 0, rng: random.Random | None = None) -> bool:
        """Whether this sample's caption is dropped (a transform with ``needs_text`` False)."""
        raise NotImplementedError(f"{type(self).__name__} needs the caption text: it decides no drop on its own")

    def drop_probability(self, epoch: int = 0) -> float:
        """The chance ``decide`` returns True in ``epoch`` (a transform with ``needs_text`` False)."""
        raise NotImplementedError(f"{type(self).__name__} needs the caption text: it decides no drop on its own")

    def count(self, before: str, after: str) -> Any:
        """What one call did, measured from its input and output, for the audit (tag dropout's
        ``TagCount``); None for a transform the audit counts by calls alone."""
        return None

    @classmethod
    def related_declaration_problems(cls) -> list[str]:
        missing = [name for name in ("decide", "drop_probability") if getattr(cls, name) is getattr(CaptionTransform, name)]
        if not cls.needs_text and missing:
            return [
                f"it declares needs_text = False but does not define {', '.join(missing)}: a transform that works on "
                "cached text-encoder outputs only decides whether the caption is dropped"
            ]
        return []


class OptimizerStrategy(Strategy):
    """Builds a ``torch.optim.Optimizer`` for the given parameters."""

    # parameters and gradients: the same on every process
    processes: ClassVar[frozenset[str]] = frozenset({"ddpm", "flow"})

    requires: ClassVar[tuple[str, ...]] = ()
    # True: the optimizer it builds has train and eval modes (schedule-free ones), built in train
    # mode; hosts switch it with ``sdplug.strategies.optimizer_modes`` (eval around sampling, validation and
    # saving, train for steps). Those functions do nothing for other optimizers.
    schedule_free: ClassVar[bool] = False
    # True: the optimizer estimates its own step size (Prodigy, D-Adaptation) and its ``lr`` only
    # multiplies that estimate (about 1.0). A host's learning rate, meant for AdamW, would make
    # every step ~10,000x too small, so ``plan.optimizer`` gives every trained group the
    # strategy's own ``lr`` (its default when the preset names none), and a fallback never
    # inherits it. Such a strategy has an ``lr`` field.
    adapts_step_size: ClassVar[bool] = False
    # Settings of how this implementation stores or runs its update, not of the update itself
    # (bitsandbytes' min_8bit_size): a fallback without them is the same optimizer, so they do
    # not carry to ``optimizer.fallback`` (its warning names them); every other setting must.
    implementation_parameters: ClassVar[tuple[str, ...]] = ()

    def check_available(self) -> None:
        """Raise ``MissingDependencyError`` when this optimizer cannot be built here."""
        from sdplug.optional import require

        for package in self.requires:
            require(package, feature=f"optimizer {type(self).__name__}")

    def build(self, params: Any) -> torch.optim.Optimizer:
        raise NotImplementedError

    @classmethod
    def related_declaration_problems(cls) -> list[str]:
        from sdplug.params import field_names

        parameters = field_names(cls)
        problems = []
        if cls.adapts_step_size and "lr" not in parameters:
            problems.append(
                "it declares adapts_step_size = True but has no 'lr' parameter: the plan gives every trained group "
                "the strategy's own lr"
            )
        problems += [
            f"implementation_parameters names {name!r}, which is not one of its parameters ({', '.join(parameters) or 'none'})"
            for name in cls.implementation_parameters
            if name not in parameters
        ]
        return problems


class ProcessorModel(Protocol):
    """The part of a diffusers model (``AttentionMixin``) that attention strategies use."""

    @property
    def attn_processors(self) -> dict[str, Any]: ...

    def set_attn_processor(self, processor: Any) -> None: ...


class AttentionStrategy(Strategy):
    """Installs an attention implementation in a diffusers model."""

    # the model's attention: the same on every process
    processes: ClassVar[frozenset[str]] = frozenset({"ddpm", "flow"})

    def check_available(self) -> None:
        """Raise ``MissingDependencyError`` when this attention cannot run here."""

    def processor(self) -> Any:
        raise NotImplementedError

    def apply(self, model: torch.nn.Module) -> int:
        """Swap the processor of every attention module of ``model``; return how many changed."""
        from sdplug.errors import SdplugError

        self.check_available()
        if not hasattr(model, "attn_processors") or not hasattr(model, "set_attn_processor"):
            raise SdplugError(
                f"{type(self).__name__} applies to diffusers models with attention processors; "
                f"{type(model).__name__} has none (hosts with their own attention use their adapter)."
            )
        diffusers_model = cast(ProcessorModel, model)  # it has both, checked just above
        names = list(diffusers_model.attn_processors)
        if not names:
            raise SdplugError(f"{type(model).__name__} has no attention modules to apply {type(self).__name__} to.")
        diffusers_model.set_attn_processor(self.processor())
        return len(names)
