"""The prediction type the model declares, against the one sd-scripts trains.

sd-scripts trains v-prediction only with ``--v_parameterization`` and never reads the model's
own scheduler config, so a v-prediction model (SD 2.x 768, a v-pred fine-tune) trained without
the flag is trained, and sdplug's plan bound, as epsilon: wrong targets and wrong weights from
the first step, without an error. A diffusers model folder declares its type in
``scheduler/scheduler_config.json`` (``prediction_type``; diffusers' default, epsilon, when the
key is absent). Where it does, the adapter records it in ``audit.json`` (``host.
model_prediction_type``) and warns when it differs from what the flag makes kohya train. A
single-file checkpoint or a hub name declares nothing here: nothing is recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdplug.log import logger

FLAG = "--v_parameterization"


def declared_prediction_type(model: str | None) -> tuple[str, Path] | None:
    """(prediction type, the file that says so) of a diffusers model folder; None when it declares none."""
    if not model:
        return None
    folder = Path(model)
    for config in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if not config.is_file():
            continue
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a broken config: loading the model reports it
        return str(data.get("prediction_type") or "epsilon").replace("-", "_"), config
    return None


def check_prediction_type(args: Any) -> dict[str, str] | None:
    """The audit record of the model's declared prediction type; a warning when kohya trains another."""
    found = declared_prediction_type(getattr(args, "pretrained_model_name_or_path", None))
    if found is None:
        return None
    declared, config = found
    trained = "v_prediction" if getattr(args, "v_parameterization", False) else "epsilon"
    record = {"declared": declared, "by": str(config), "trained_as": trained}
    if declared != trained:
        if trained == "epsilon":
            runs = f"sd-scripts runs without {FLAG}, so it trains (and sdplug binds the preset to) epsilon prediction"
        else:
            runs = f"{FLAG} makes sd-scripts train (and sdplug bind the preset to) v-prediction"
        if declared == "v_prediction":
            advice = f"add {FLAG}"
        elif trained == "v_prediction":
            advice = f"remove {FLAG}"
        else:
            advice = f"sd-scripts trains epsilon, or v-prediction with {FLAG}, never {declared!r}"
        record["warning"] = (
            f"the model {args.pretrained_model_name_or_path} declares prediction_type {declared!r} ({config}), but {runs}: "
            f"{advice}, unless you mean to retrain it to another prediction type."
        )
        logger.warning(record["warning"])
    return record
