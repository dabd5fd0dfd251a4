"""The kohya adapter's caption hooks: ``BaseDataset.process_caption``, ``__getitem__`` and the
dataset's text-encoder caching method.

- The preset's caption transforms run after kohya's own text handling (prefix, wildcards).
- With cached text-encoder outputs there is no caption text: a dropped sample's cached rows
  are replaced by the empty caption's outputs (see ``cached_text``).
- A batch's caption decisions count in the audit only once the batch trains: kohya's loader
  (accelerate) fetches one batch ahead, and main's validation batches
  (``is_training_dataset`` False) never train. Each fetched batch's decisions wait in a queue
  that the noise hook, called once per training step, takes the oldest from.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from sdplug.errors import MissingDependencyError, SdplugError
from sdplug.hosts.kohya import cached_text
from sdplug.hosts.kohya.reconcile import check_subset


def _epoch(dataset) -> int:
    # kohya counts epochs from 1; sdplug's caption transforms count from 0
    return max(int(getattr(dataset, "current_epoch", 1) or 1) - 1, 0)


class CaptionHooks:
    def __init__(self, adapter):
        self.adapter = adapter
        self.empty_caption_outputs: list[torch.Tensor] | None = None
        self.pending: collections.deque[list[dict[str, Any]]] = collections.deque()

    def install(self, train_util, text_cache_method: str) -> None:
        hooks = self
        dataset_class = train_util.BaseDataset
        original_caption = dataset_class.process_caption
        original_getitem = dataset_class.__getitem__
        original_cache = getattr(dataset_class, text_cache_method)

        def process_caption(dataset, subset, caption):
            return hooks.process_caption(original_caption, dataset, subset, caption)

        def getitem(dataset, index):
            return hooks.getitem(original_getitem, dataset, index)

        def cache_text_encoder_outputs(dataset, *args, **kwargs):
            return hooks.text_cache(original_cache, dataset, args, kwargs)

        self.adapter._replace(dataset_class, "process_caption", process_caption)
        self.adapter._replace(dataset_class, "__getitem__", getitem)
        # the empty caption is encoded right after the dataset's own caching
        self.adapter._replace(dataset_class, text_cache_method, cache_text_encoder_outputs)

    def process_caption(self, original, dataset, subset, caption):
        adapter = self.adapter
        if not adapter.preset.caption:
            return original(dataset, subset, caption)
        check_subset(adapter.preset, subset, adapter.defaults)
        text = original(dataset, subset, caption)
        return str(adapter.plan.caption(text, epoch=_epoch(dataset)))

    def text_cache(self, original, dataset, args, kwargs):
        result = original(dataset, *args, **kwargs)
        if self.adapter.preset.caption and self.empty_caption_outputs is None:
            self.empty_caption_outputs = self._encode_empty_caption(dataset, args, kwargs)
        return result

    def _encode_empty_caption(self, dataset, args, kwargs) -> list[torch.Tensor]:
        train_util = self.adapter._train_util
        if self.adapter.version.name == "main":  # new_cache_text_encoder_outputs(models, accelerator)
            models = args[0] if args else kwargs["models"]
            outputs = cached_text.encode_empty_main(train_util, models)
        else:  # cache_text_encoder_outputs(tokenizers, text_encoders, device, weight_dtype, ...)
            names = ("tokenizers", "text_encoders", "device", "weight_dtype")
            bound = {**dict(zip(names, args, strict=False)), **kwargs}  # positional, then keyword
            outputs = cached_text.encode_empty_v087(
                train_util, dataset, bound["tokenizers"], bound["text_encoders"], bound.get("weight_dtype")
            )
        return [o.detach().cpu() for o in outputs]

    def getitem(self, original, dataset, index):
        if not self.adapter.preset.caption:
            return original(dataset, index)
        with self.adapter.plan.deferred_captions() as decisions:  # held, not counted yet
            example = self._cached_captions(original(dataset, index), dataset)
        if getattr(dataset, "is_training_dataset", True):
            self.pending.append(decisions)
        return example

    def commit(self) -> None:
        """A training step runs: the oldest fetched batch's caption decisions count now."""
        if self.pending:
            self.adapter.plan.count_captions(self.pending.popleft())

    def _cached_captions(self, example, dataset):
        adapter = self.adapter
        tensors = cached_text.cached_tensors(example, adapter.version.name)
        if tensors is None:
            return example  # captions went through process_caption
        if self.empty_caption_outputs is None:
            raise SdplugError(
                "sd-scripts gave cached text-encoder outputs, but the adapter did not see them cached, so it has no empty "
                f"caption to substitute for dropped captions. Caching route not known to the {adapter.version.name} adapter."
            )
        captions = example.get("captions")
        slots = adapter.encoder_slots  # a flow script's encoders, one by one
        main = adapter.version.name == "main"  # its collation pads variable-length rows; v0.8.7's are fixed
        for row in range(tensors[0].shape[0]):
            try:
                if slots:
                    encoders = adapter.plan.dropped_encoders(tuple(slots), epoch=_epoch(dataset))
                    dropped = encoders == frozenset(slots)
                else:
                    encoders, dropped = frozenset(), adapter.plan.caption_dropped(epoch=_epoch(dataset))
            except MissingDependencyError as exc:
                raise SdplugError(f"{adapter.preset.path}: with cached text-encoder outputs: {exc}") from None
            if slots and encoders:  # each encoder's own part (a row may carry more, e.g. Anima's dropout rate)
                cached_text.substitute_encoders(tensors, row, self.empty_caption_outputs, slots, encoders, main)
            elif dropped:
                cached_text.substitute_row(tensors, row, self.empty_caption_outputs, main)
            if dropped and isinstance(captions, list) and row < len(captions):
                captions[row] = ""
        if main:  # a tensor padded longer for the empty caption's rows replaced its list entry
            example["text_encoder_outputs_list"] = tensors
        return example
