"""``sdplug kohya``: run an sd-scripts training script with a preset, without changing its source.

    sdplug kohya --preset P.toml [--sd-scripts DIR] -- train_network.py <usual kohya args>
    accelerate launch -m sdplug kohya --preset P.toml [--sd-scripts DIR] -- train_network.py <args>

The hooks are installed into sd-scripts' library modules before the script runs, so its own
imports bind to them; then the script runs as ``__main__`` with its own arguments.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts.kohya import audits
from sdplug.hosts.kohya.adapter import KohyaAdapter
from sdplug.hosts.kohya.command_line import resolve_script, script_arguments, script_command
from sdplug.hosts.kohya.flow_runtime import KohyaFlowAdapter
from sdplug.hosts.kohya.runtime import activate_for_launch, record_failure
from sdplug.hosts.kohya.version import FLOW_ROUTES, SCRIPTS, check_flow_script, detect
from sdplug.hosts.lifecycle import problems_exit_status
from sdplug.log import logger
from sdplug.preset import load_preset


def launch(preset_path: str, script: str, script_args: list[str], sd_scripts: Path | None = None) -> list[str]:
    """Run the script with the preset; the audit's problems (empty when every trick applied)."""
    preset = load_preset(preset_path)
    path = resolve_script(script, sd_scripts, (*SCRIPTS, *FLOW_ROUTES))
    root = Path(sd_scripts).resolve() if sd_scripts else path.parent
    version = detect(root)
    check_flow_script(path.name, root, version, "Nothing was run.")
    adapter_class = KohyaFlowAdapter if path.name in FLOW_ROUTES else KohyaAdapter
    adapter = activate_for_launch(preset, version, root, path.name, adapter_class)
    logger.info(f"preset {preset.name!r} on sd-scripts {version.name} ({path.name})")
    sys.argv = [str(path), *script_args]
    runpy.run_path(str(path), run_name="__main__")
    # the script returned: take the hooks out and write the audit now (not at exit), so that
    # its problems can set the exit status
    adapter.session.undo()
    written = adapter.write_audit()
    return json.loads(written.read_text())["problems"] if written is not None else []


def build_parser() -> argparse.ArgumentParser:
    parser = script_command("sdplug kohya", __doc__.splitlines()[0], f"one of {', '.join((*SCRIPTS, *FLOW_ROUTES))}")
    parser.add_argument("--preset", required=True, help="a preset file or a shipped preset's name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    script_args = script_arguments(args)
    try:
        problems = launch(args.preset, args.script, script_args, args.sd_scripts)
    except SdplugError as exc:
        if not record_failure(exc):
            # refused before the adapter configured (preset, script, version): the audit says so
            audits.write_early_refusal(exc, audits.output_dir_from_args(script_args), Path(args.script).name)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status, error = problems_exit_status(problems)  # weights saved by the script, audit written: non-zero exit
    if error is not None:
        print(error, file=sys.stderr)
    return status
