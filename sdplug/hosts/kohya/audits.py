"""The kohya adapter's audits: of a run refused before training, and of a configured run.

A refused run writes an audit too (``steps`` 0, the refusal in ``problems``), in kohya's
``--output_dir`` when the arguments name one, so a missing audit never stands for a refusal.
Both go through the host lifecycle (``sdplug.hosts.lifecycle``); this module says what only
kohya knows: where its output folder is and what its ``host`` record holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdplug.hosts.lifecycle import HostLifecycle
from sdplug.log import logger

HOST_NAME = "kohya sd-scripts"


def write_early_refusal(message: object, output_dir: str | None, script: str) -> Path | None:
    """The audit of a run refused before an adapter was configured (the preset, the script, the
    version): nothing is known of kohya yet but the script."""
    host: dict[str, Any] = {"version": None, "script": script, "rules": []}
    return HostLifecycle(HOST_NAME).write_refusal(output_dir, message, host)


def output_dir_from_args(script_args: list[str]) -> str | None:
    """kohya's ``--output_dir`` from a script's arguments, or from its ``--config_file``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_dir")
    parser.add_argument("--config_file")
    known, _ = parser.parse_known_args(script_args)
    if known.output_dir or not known.config_file:
        return known.output_dir
    from sdplug.errors import PresetError
    from sdplug.hosts.kohya.command_line import config_file_path
    from sdplug.hosts.kohya.config_bridge import read_kohya_config

    try:
        return read_kohya_config(config_file_path(known.config_file)).get("output_dir")
    except PresetError:  # an unreadable config: kohya reports it itself; there is just no audit
        return None


# -- the audit of a configured run ----------------------------------------------------------------
def _host(adapter) -> dict[str, Any]:
    host = {"version": adapter.version.name, "script": adapter.script, "rules": adapter.rules}
    if adapter.model_prediction is not None:  # the model folder declares its prediction type
        host["model_prediction_type"] = adapter.model_prediction
    return host


def write_refusal(adapter, exc: BaseException) -> Path | None:
    """The audit of a run the adapter refused while configuring (no step ran)."""
    output_dir = getattr(adapter.args, "output_dir", None)
    return adapter.lifecycle.write_refusal(output_dir, exc, {**_host(adapter), **adapter.flag_record}, adapter.preset)


def write_run(adapter) -> Path | None:
    """``audit.json`` of a configured run (at exit, after training or a crash): the plan's report
    and problems, with what only kohya knows."""
    if adapter.plan is None or adapter.args is None or not getattr(adapter.args, "output_dir", None):
        return None
    host = {**_host(adapter), "prediction_type": adapter.plan.prediction_type, **adapter.flag_record}
    path = adapter.lifecycle.write_audit(adapter.args.output_dir, host)
    if adapter.rank == 0:
        logger.info(f"audit ({path}):\n{adapter.plan.summary()}")
    return path
