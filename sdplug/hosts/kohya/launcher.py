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
from sdplug.hosts.kohya.flow_flags import FLOW_SCRIPTS
from sdplug.hosts.kohya.runtime import activate_for_launch, record_failure
from sdplug.hosts.kohya.version import SCRIPTS, KohyaVersionError, detect
from sdplug.hosts.lifecycle import problems_exit_status
from sdplug.log import logger
from sdplug.preset import load_preset


def resolve_script(
    script: str, sd_scripts: Path | None, supported: tuple[str, ...] = SCRIPTS, who: str = "the sdplug kohya adapter supports"
) -> Path:
    """The script's path (as given, or in ``--sd-scripts``), refused unless it is ``supported``."""
    path = Path(script)
    if not path.is_file() and sd_scripts is not None:
        path = Path(sd_scripts) / script
    if not path.is_file():
        raise SdplugError(
            f"kohya script {script!r} not found" + (f" in {sd_scripts}" if sd_scripts else "; pass --sd-scripts DIR")
        )
    if path.name not in supported:
        raise KohyaVersionError(f"{path.name}: {who} {', '.join(supported)}.{_flow_advice(path.name, supported)}")
    return path.resolve()


def _flow_advice(script: str, supported: tuple[str, ...]) -> str:
    """For a flow script the adapter cannot run yet: what sdplug can already say about its flags."""
    if script not in FLOW_SCRIPTS or script in supported:
        return ""
    return (
        f" It does not run {script} yet; `sdplug check kohya --sd-scripts DIR -- {script} ARGS` says which of your flags "
        "that script ignores, and `sdplug from-kohya CONFIG --script` / `to-kohya PRESET --script` read and write its config."
    )


def script_command(prog: str, description: str, script_help: str) -> argparse.ArgumentParser:
    """``[--sd-scripts DIR] SCRIPT ARGS...``: the command line of everything run on a kohya script."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--sd-scripts", type=Path, help="the sd-scripts folder (default: the script's folder)")
    parser.add_argument("script", help=script_help)
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def script_arguments(args: argparse.Namespace) -> list[str]:
    """The script's own arguments, without the ``--`` that separates them."""
    return args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args


def launch(preset_path: str, script: str, script_args: list[str], sd_scripts: Path | None = None) -> list[str]:
    """Run the script with the preset; the audit's problems (empty when every trick applied)."""
    preset = load_preset(preset_path)
    path = resolve_script(script, sd_scripts)
    root = Path(sd_scripts).resolve() if sd_scripts else path.parent
    version = detect(root)
    adapter = activate_for_launch(preset, version, root, path.name)
    logger.info(f"preset {preset.name!r} on sd-scripts {version.name} ({path.name})")
    sys.argv = [str(path), *script_args]
    runpy.run_path(str(path), run_name="__main__")
    # the script returned: take the hooks out and write the audit now (not at exit), so that
    # its problems can set the exit status
    adapter.session.undo()
    written = adapter.write_audit()
    return json.loads(written.read_text())["problems"] if written is not None else []


def build_parser() -> argparse.ArgumentParser:
    parser = script_command(
        "sdplug kohya", __doc__.splitlines()[0], "train_network.py, sdxl_train_network.py, train_db.py or fine_tune.py"
    )
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
