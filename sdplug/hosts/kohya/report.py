"""The kohya adapter's audits: of a run refused before training, and of a configured run.

A refused run writes an audit too (``steps`` 0, the refusal in ``problems``), in kohya's
``--output_dir`` when the arguments name one, so a missing audit never stands for a refusal;
``write`` (``sdplug.plan_report.write_data``, atomic) puts it there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdplug.audit import preset_strategies
from sdplug.log import logger
from sdplug.plan_report import write_data as write

HOST_NAME = "kohya sd-scripts"


def refusal(message: str, *, preset=None, version: str | None = None, script: str | None = None) -> dict[str, Any]:
    """The audit of a run sdplug refused before its first step."""
    strategies = preset_strategies(preset) if preset is not None else {}
    return {
        "steps": 0,
        "completed": False,  # as sdplug's own trainer writes a refused run
        "strategies": strategies,
        "host": {"name": HOST_NAME, "version": version, "script": script, "rules": []},
        "problems": [f"refused before training: {message}"],
    }


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
    host = {"name": HOST_NAME, "version": adapter.version.name, "script": adapter.script, "rules": adapter.rules}
    if adapter.model_prediction is not None:  # the model folder declares its prediction type
        host["model_prediction_type"] = adapter.model_prediction
    return host


def write_refusal(adapter, exc: BaseException) -> Path | None:
    """The audit of a run the adapter refused while configuring (no step ran)."""
    output_dir = getattr(adapter.args, "output_dir", None)
    if not output_dir:
        return None
    refused = refusal(str(exc), preset=adapter.preset, version=adapter.version.name, script=adapter.script)
    refused["host"] = {**_host(adapter), **adapter.flag_report}
    return write(refused, output_dir, adapter.rank)


def write_run(adapter) -> Path | None:
    """``audit.json`` of a configured run (at exit, after training or a crash): the plan's report
    and problems, with what only kohya knows."""
    if adapter.plan is None or adapter.args is None or not getattr(adapter.args, "output_dir", None):
        return None
    host = {**_host(adapter), "prediction_type": adapter.plan.prediction_type, **adapter.flag_report}
    path = adapter.plan.write_audit(adapter.args.output_dir, host=host)
    if adapter.rank == 0:
        logger.info(f"audit ({path}):\n{adapter.plan.summary()}")
    return path
