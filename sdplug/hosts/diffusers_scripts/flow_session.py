"""A diffusers flow-matching script's run with a preset (``flow_edits``): the plan bound to the
rectified flow the script trains, and the values its step takes from the plan.

What the scripts train without sdplug, read in their code (diffusers main, 2026-08):

- sigma is ``noise_scheduler_copy.sigmas`` at ``(u * N).long()`` of a descending table, so ``u``
  lands on sigma ``1 - u``: ``--logit_mean m`` is the preset's mean ``-m`` (kohya's ``sigma``
  sampling has the same flip). Lumina 2 builds ``x_t = (1 - s) noise + s x0``: its ``s`` is the
  data fraction, its target ``x0 - noise`` (the process's ``velocity_reversed``), its noise level
  ``u`` itself, and its scheduler's static ``shift`` k is, on the noise level, a shift of ``1/k``;
- the table is the scheduler's ``__init__`` one: shifted by ``shift`` unless
  ``use_dynamic_shifting``, whose ``mu`` the scripts never pass (FLUX.1 and Qwen-Image train on
  unshifted sigmas; only inference shifts by resolution);
- SD3's ``--precondition_outputs`` (on by default) compares ``x_t - sigma * output`` with ``x0``:
  the process's ``sigma_scaled`` output, whose weights are x0 weights.

With a preset, the plan draws sigma (the preset's ``[timesteps]`` and ``[schedule]``; without
them, the script's own density and shift, translated) and the noise for every step, the
weighting is the preset's (the script's own ``--weighting_scheme`` weighting stands without a
``[loss_weighting]``), and the loss type is the preset's on the script's prediction and target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sdplug.hosts.diffusers_scripts import flags, flow_edits
from sdplug.hosts.diffusers_scripts.script_run import ScriptRun
from sdplug.hosts.flow_density import density_timesteps
from sdplug.log import logger
from sdplug.plan import bind as bind_plan
from sdplug.preset import parse_preset
from sdplug.process import Flow, flow_sigmas

# the names a caption dropout may give each script's text encoders (``caption[i].encoders``)
TEXT_ENCODERS: dict[str, tuple[str, ...]] = {
    flow_edits.FLUX: ("clip_l", "t5xxl"),
    flow_edits.FLUX2: ("mistral",),
    flow_edits.SD3: ("clip_l", "clip_g", "t5xxl"),
    flow_edits.QWEN_IMAGE: ("qwen",),
    flow_edits.Z_IMAGE: ("qwen",),
    flow_edits.LUMINA2: ("gemma",),
}

# each script's model's latent patch on the latent the draw sees (its tokens: (H / p) (W / p)), what
# the plan's dynamic shift counts; FLUX.2 draws on latents already packed 2x2 (128 channels)
MODEL_PATCH: dict[str, int] = {
    flow_edits.FLUX: 2,
    flow_edits.FLUX2: 1,
    flow_edits.SD3: 2,
    flow_edits.QWEN_IMAGE: 2,
    flow_edits.Z_IMAGE: 2,
    flow_edits.LUMINA2: 2,
}


class FlowScriptRun(ScriptRun):
    """``ScriptRun`` on a flow script: the plan's sigma, noise, weights and loss in its step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timesteps: torch.Tensor | None = None  # the plan's indices for the step's draw
        self.weights: torch.Tensor | None = None  # one weight per sample, the step's
        self.empty_rows: Any = None  # the script's encoding of "" (computed once)

    def bind_flow(self, noise_scheduler: Any, args: Any) -> None:
        config = noise_scheduler.config
        reversed_ = self.script == flow_edits.LUMINA2
        output = "sigma_scaled" if self.script == flow_edits.SD3 and bool(getattr(args, "precondition_outputs", False)) else "raw"
        # the script's own training table: the scheduler's __init__ sigmas (no mu is ever passed)
        script_shift = 1.0 if getattr(config, "use_dynamic_shifting", False) else float(getattr(config, "shift", 1.0))
        schedule = self.preset.schedule
        preset_draws = self.preset.timesteps is not None or schedule.flow_shift != 1.0 or schedule.dynamic_shift
        default = None
        shift = 1.0
        if preset_draws:
            self.rules.append(
                f"{self.script}'s --weighting_scheme {args.weighting_scheme} sampling and its scheduler's shift "
                f"{script_shift:g} -> the preset's [timesteps] and [schedule]"
            )
        else:
            shift = 1.0 / script_shift if reversed_ else script_shift
            spec = density_timesteps(vars(args), flip=not reversed_)
            default = parse_preset({"timesteps": spec}, path=self.script).timesteps
            self.rules.append(
                f"{self.script}'s --weighting_scheme {args.weighting_scheme} sampling drawn by the plan as {spec}, "
                f"shift {shift:g}"
            )
        process = Flow(
            flow_sigmas(int(config.num_train_timesteps)),
            "velocity_reversed" if reversed_ else "velocity",
            shift=shift,
            output=output,
            patch_size=MODEL_PATCH[self.script],
        )
        plan = bind_plan(
            self.preset,
            process=process,
            seed=args.seed or 0,
            rank=self.lifecycle.rank,
            default_timesteps=default.create() if default is not None else None,
            text_encoders=TEXT_ENCODERS[self.script],
        )
        self.lifecycle.bind(plan)
        if self.preset.attention is not None:  # 'sdpa' (flags refused others): what diffusers' transformers run
            plan.attention(torch.nn.Module(), install=_model_attention)
        logger.info(f"preset {self.preset.name!r} bound to {self.script} (rectified flow, output {output})")

    def flow_draw(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor, noisy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan's noise, the script's ``timesteps`` (the model time, ``sigmas * 1000``), its
        ``sigmas`` and noisy input, for the step's latents (Qwen-Image's ``(B, C, 1, H, W)`` too)."""
        plan = self.bound()
        frames = latents.squeeze(2) if latents.dim() == 5 else latents
        size = (int(frames.shape[-2]), int(frames.shape[-1]))
        drawn = plan.timesteps(len(latents), device=latents.device, latent_size=size)
        draw = plan.noise(frames, timesteps=drawn)
        self.timesteps, self.draw = drawn, draw
        model_time = plan.model_time(drawn)  # the script's sigma * 1000 (Lumina 2's: the data fraction's)
        script_sigmas = (model_time / 1000).view(-1, *([1] * (latents.dim() - 1)))
        noisy_input = plan.noisy_input(frames, draw, drawn).view_as(latents)
        return (
            draw.target.view_as(latents).to(noise.dtype),
            model_time.to(timesteps.device, timesteps.dtype),
            script_sigmas.to(sigmas.device, sigmas.dtype),
            noisy_input.to(noisy.dtype),
        )

    def flow_weighting(self, host_weighting: torch.Tensor) -> torch.Tensor:
        """The preset's per-sample weights in the script's weighting shape (the script's own
        ``--weighting_scheme`` weighting without a ``[loss_weighting]``)."""
        plan, drawn = self.bound(), self._drawn()
        if self.preset.loss_weighting is None:
            self.weights = host_weighting.detach().reshape(len(drawn), -1)[:, 0].float()
            return host_weighting
        self.weights = plan.sample_weights(drawn)
        return self.weights.to(host_weighting.device, host_weighting.dtype).view(-1, *([1] * (host_weighting.dim() - 1)))

    def flow_loss(self, model_pred: torch.Tensor, target: torch.Tensor, prior: Any) -> torch.Tensor:
        """The preset's loss type on the script's prediction and target, times the step's weights,
        the mean per sample then over the batch (the script's reduction); the prior-preservation
        half weighted by ``--prior_loss_weight``."""
        plan, drawn = self.bound(), self._drawn()
        weights = self.weights if self.weights is not None else torch.ones(len(drawn))
        weights = weights.to(model_pred.device)
        if prior is None:
            return (plan.unweighted_loss(model_pred, target, timesteps=drawn) * weights).mean()
        pred_prior, target_prior, prior_weight = prior
        (instance_t, prior_t), (instance_w, prior_w) = drawn.chunk(2), weights.chunk(2)
        instance = (plan.unweighted_loss(model_pred, target, timesteps=instance_t) * instance_w).mean()
        return instance + prior_weight * (plan.unweighted_loss(pred_prior, target_prior, timesteps=prior_t) * prior_w).mean()

    def drop_rows(
        self, epoch: int, samples: int, rows: Sequence[torch.Tensor], empty: Callable[[], Sequence[torch.Tensor]]
    ) -> tuple[torch.Tensor, ...] | None:
        """Caption dropout on prompt embeddings the script holds (one row per sample, or one
        shared row): a dropped sample's rows become the script's encoding of ``""``. None when no
        sample is dropped (the script's own tensors stand)."""
        if not self.preset.caption:
            return None
        dropped = [bool(self.bound().dropped_encoders(TEXT_ENCODERS[self.script], epoch=epoch)) for _ in range(samples)]
        if not any(dropped):
            return None
        if self.empty_rows is None:
            self.empty_rows = tuple(empty())
        return tuple(_swap_rows(row, empty_row, dropped) for row, empty_row in zip(rows, self.empty_rows, strict=True))

    def drop_encoder_rows(
        self, epoch: int, samples: int, rows: Mapping[str, torch.Tensor], empty: Callable[[], Mapping[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, ...]:
        """Caption dropout per text encoder: each encoder's rows (``rows``, by the names in
        ``TEXT_ENCODERS``) of a sample whose draw drops that encoder become the encoder's own
        encoding of ``""``. The tensors come back in ``rows``' order."""
        if not self.preset.caption:
            return tuple(rows.values())
        plan = self.bound()
        draws = [plan.dropped_encoders(tuple(rows), epoch=epoch) for _ in range(samples)]
        if not any(draws):
            return tuple(rows.values())
        if self.empty_rows is None:
            self.empty_rows = dict(empty())
        return tuple(_swap_rows(row, self.empty_rows[name], [name in draw for draw in draws]) for name, row in rows.items())

    def encode_empty_caption(self, encode: Callable[[], Any]) -> None:
        """The script's encoding of ``""``, taken before it deletes its text encoder (with a
        ``[[caption]]`` only)."""
        if self.preset.caption and self.empty_rows is None:
            self.empty_rows = encode()

    def _decisions(self, epoch: int, samples: int) -> list[frozenset[str]]:
        plan = self.bound()
        return [plan.dropped_encoders(TEXT_ENCODERS[self.script], epoch=epoch) for _ in range(samples)]

    def _empty(self) -> Any:
        if self.empty_rows is None:
            raise flags.DiffusersConflictError(
                f'{self.script}: a caption was dropped before the script\'s encoding of "" was taken (a patch out of order).'
            )
        return self.empty_rows

    def drop_caption_rows(self, epoch: int, samples: int, rows: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Whole-caption dropout on one encoder's rows (FLUX.2): a dropped sample's rows become ``""``'s."""
        if not self.preset.caption:
            return rows
        dropped = [bool(d) for d in self._decisions(epoch, samples)]
        if not any(dropped):
            return rows
        return tuple(_swap_rows(row, empty, dropped) for row, empty in zip(rows, self._empty(), strict=True))

    def drop_caption_pairs(self, epoch: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """Qwen-Image's instance (embedding, mask) pairs: a dropped sample's pair becomes ``""``'s."""
        if not self.preset.caption:
            return pairs
        dropped = self._decisions(epoch, len(pairs))
        return [tuple(self._empty()) if drop else pair for pair, drop in zip(pairs, dropped, strict=True)]

    def drop_caption_list(self, epoch: int, samples: int, entries: list[torch.Tensor]) -> list[torch.Tensor]:
        """Z-Image's list of per-sample embeddings: a dropped sample's entry becomes ``""``'s
        (the first ``samples`` entries: the script's shared list grows each step, see the note)."""
        if not self.preset.caption:
            return entries
        dropped = self._decisions(epoch, samples)
        empty = self._empty()[0]
        return [empty if index < samples and dropped[index] else entry for index, entry in enumerate(entries)]

    def drop_sd3_encoders(
        self, epoch: int, samples: int, embeds: torch.Tensor, pooled: torch.Tensor, t5_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's per-encoder dropout: CLIP-L's and CLIP-G's columns of the CLIP tokens, T5's tokens,
        and the pooled CLIP-L | CLIP-G halves, each from ``""``'s encoding for an encoder dropped."""
        if not self.preset.caption:
            return embeds, pooled
        draws = self._decisions(epoch, samples)
        if not any(draws):
            return embeds, pooled
        empty_embeds, empty_pooled, clip_l_width, clip_l_pooled = self._empty()
        clip_tokens = empty_embeds.shape[1] - t5_tokens
        regions = {  # encoder -> (embeddings slices, pooled slice)
            "clip_l": ((slice(0, clip_tokens), slice(0, clip_l_width)), slice(0, clip_l_pooled)),
            "clip_g": ((slice(0, clip_tokens), slice(clip_l_width, None)), slice(clip_l_pooled, None)),
            "t5xxl": ((slice(clip_tokens, None), slice(None)), None),
        }
        embeds = (embeds.expand(samples, *embeds.shape[1:]) if embeds.shape[0] == 1 else embeds).clone()
        pooled = (pooled.expand(samples, *pooled.shape[1:]) if pooled.shape[0] == 1 else pooled).clone()
        empty_embeds, empty_pooled = empty_embeds.to(embeds.device, embeds.dtype), empty_pooled.to(pooled.device, pooled.dtype)
        for row, draw in enumerate(draws):
            for encoder in draw:
                (tokens, columns), pooled_columns = regions[encoder]
                embeds[row, tokens, columns] = empty_embeds[0, tokens, columns]
                if pooled_columns is not None:
                    pooled[row, pooled_columns] = empty_pooled[0, pooled_columns]
        return embeds, pooled

    def _drawn(self) -> torch.Tensor:
        if self.timesteps is None:
            raise flags.DiffusersConflictError(
                f"{self.script}: the loss ran before the plan's draw (a patch out of order, or a step sdplug does not know)."
            )
        return self.timesteps


def _swap_rows(rows: torch.Tensor, empty: torch.Tensor, dropped: list[bool]) -> torch.Tensor:
    """``rows`` with each dropped sample's row replaced by ``empty``'s (both padded with zeros to
    the longer sequence: a mask's padding is 0 too); one shared row is repeated per sample first."""
    samples = len(dropped)
    rows = rows.expand(samples, *rows.shape[1:]) if rows.shape[0] == 1 else rows
    empty = empty.to(rows.device, rows.dtype)
    if rows.dim() > 1 and empty.dim() == rows.dim() and empty.shape[1] != rows.shape[1]:
        length = max(rows.shape[1], empty.shape[1])
        rows, empty = _pad(rows, length), _pad(empty, length)
    where = torch.tensor(dropped, device=rows.device).view(-1, *([1] * (rows.dim() - 1)))
    return torch.where(where, empty[:1].expand_as(rows), rows)


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    if tensor.shape[1] == length:
        return tensor
    shape = (tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)


def _model_attention(kind: str) -> dict[str, Any]:
    return {"changed": 0, "modules": "the model's own attention (diffusers' dispatch to scaled_dot_product_attention)"}
