"""The preset's optimizer inside EveryDream2's ``EveryDreamOptimizer``.

``EveryDreamOptimizer`` reads ``optimizer.json`` and builds two optimizers in
``create_optimizers`` (text encoder, UNet), then their lr schedulers, its grad scaler and its
step. The plugin replaces ``create_optimizers`` only, from its constructor (the wrapper is
built after the plugins): one optimizer through ``plan.optimizer`` over two parameter groups
-- the UNet at EveryDream2's UNet lr, the text encoder at its text-encoder lr (a disabled part
has no group) -- unless the preset's ``lr`` rules both. EveryDream2 keeps its lr scheduler (the
UNet's, which now scales both groups), grad scaler, clipping, logging and saving;
``get_textenc_lr`` reads the text encoder's group.
"""

from __future__ import annotations

from typing import Any

from sdplug.log import logger
from sdplug.plan.optimizer_groups import learning_rate

_DEFAULT_LR = 1e-6  # EveryDream2's own when neither optimizer.json nor train.json names one


def _lr(args: Any, config: dict | None) -> float:
    if getattr(args, "lr", None) is not None:  # EveryDream2: the main config's lr wins
        return float(args.lr)
    value = (config or {}).get("lr")
    return float(value) if value is not None else _DEFAULT_LR


def install(host: Any, optimizer_class: type) -> None:
    record = host.optimizer_record

    def create_optimizers(wrapper, args, text_encoder_params, unet_params):
        groups, names = [], []
        if not args.disable_unet_training:
            groups.append({"params": list(unet_params), "lr": _lr(args, wrapper.base_config)})
            names.append("unet")
        if not args.disable_textenc_training:
            groups.append({"params": list(text_encoder_params), "lr": _lr(args, wrapper.te_config)})
            names.append("text_encoder")
        optimizer = host.plan.optimizer(groups)
        record.update(
            {
                "groups": names,
                "learning_rates": [learning_rate(g["lr"]) for g in optimizer.param_groups],
                "replaced": f"optimizer.json {wrapper.base_config.get('optimizer')!r} (unet) and "
                f"{wrapper.te_config.get('optimizer')!r} (text encoder)",
            }
        )
        spec = host.plan.optimizer_spec
        rule = (
            f"EveryDream2's optimizers ({record['replaced']}) -> the preset's {spec.type!r}: one optimizer, groups "
            f"{', '.join(names)} at lr {record['learning_rates']}; EveryDream2's {'unet' if names[0] == 'unet' else 'text encoder'} "
            "lr schedule scales them all"
        )
        host.rules.append(rule)
        logger.info(rule)
        # EveryDream2 steps, schedules and saves each optimizer it holds: one, in the slot of its first group
        return (None, optimizer) if names[0] == "unet" else (optimizer, None)

    def get_textenc_lr(wrapper):
        optimizer = wrapper.optimizer_unet or wrapper.optimizer_te
        groups = record.get("groups", [])
        if optimizer is None or "text_encoder" not in groups:
            return 0
        return optimizer.param_groups[groups.index("text_encoder")]["lr"]

    host.session.replace(optimizer_class, "create_optimizers", create_optimizers)
    host.session.replace(optimizer_class, "get_textenc_lr", get_textenc_lr)


def watch_own(host: Any, optimizer_class: Any) -> None:
    """No ``[optimizer]``: EveryDream2's own optimizers train; the plan watches the weights they
    step for non-finite values. EveryDream2 steps the text encoder's optimizer first, then the
    UNet's: the first one it steps counts the steps, so both mark a step with its own number."""
    original = optimizer_class.create_optimizers

    def create_optimizers(wrapper, args, text_encoder_params, unet_params):
        optimizer_te, optimizer_unet = original(wrapper, args, text_encoder_params, unet_params)
        for index, optimizer in enumerate(o for o in (optimizer_te, optimizer_unet) if o is not None):
            host.plan.watch_optimizer(optimizer, counts_steps=index == 0)
        return optimizer_te, optimizer_unet

    host.session.replace(optimizer_class, "create_optimizers", create_optimizers)
