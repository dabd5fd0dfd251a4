"""``sdplug diffusers``: run one of diffusers' training scripts with a preset, its file untouched.

    sdplug diffusers --preset P.toml -- train_text_to_image_lora.py <the script's usual args>
    accelerate launch -m sdplug diffusers --preset P.toml -- SCRIPT <args>

The script's source is patched in memory with the same edits ``sdplug patch diffusers-examples``
writes to disk, compiled under the script's own path and run as ``__main__`` with
``--sdplug_preset`` added to its arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts.diffusers_scripts import edits, session
from sdplug.hosts.lifecycle import HostLifecycle, problems_exit_status
from sdplug.preset import Preset, load_preset


def resolve_script(script: str) -> Path:
    path = Path(script)
    if not path.is_file():
        raise SdplugError(f"diffusers script {script!r} not found")
    edits.edits_for(path.name)
    return path.resolve()


def launch(preset_path: str, script: str, script_args: list[str]) -> list[str]:
    """Run the script with the preset; the audit's problems (empty when every trick applied)."""
    load_preset(preset_path)  # a bad preset is refused before the script starts
    path = resolve_script(script)
    text = path.read_bytes().decode("utf-8")
    source = text if edits.is_patched(text) else edits.patch_source(text, path.name)
    code = compile(source, str(path), "exec")
    session.LAUNCHED = True
    sys.argv = [str(path), *script_args, "--sdplug_preset", preset_path]
    sys.path.insert(0, str(path.parent))
    try:
        exec(code, {"__name__": "__main__", "__file__": str(path), "__builtins__": __builtins__})
    except BaseException as exc:
        session.record_failure(exc)
        _write()
        raise
    written = _write()
    return json.loads(written.read_text())["problems"] if written is not None else ["the script never bound the plan"]


def _write() -> Path | None:
    current = session.current()
    return current.write_audit() if current is not None else None


def _refusal_output_dir(script_args: list[str]) -> str | None:
    for index, arg in enumerate(script_args):
        if arg == "--output_dir" and index + 1 < len(script_args):
            return script_args[index + 1]
        if arg.startswith("--output_dir="):
            return arg.split("=", 1)[1]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdplug diffusers", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", required=True, help="a preset file or a shipped preset's name")
    parser.add_argument("script", help=", ".join(edits.SCRIPTS))
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    if args.script == "--" and script_args:
        args.script, script_args = script_args[0], script_args[1:]
    try:
        problems = launch(args.preset, args.script, script_args)
    except SdplugError as exc:
        current = session.current()
        if current is None or current.plan is None:  # refused before the plan: its audit says so
            preset = current.preset if current is not None else _readable_preset(args.preset)
            host = {"script": Path(args.script).name, "version": edits.VERSION}
            HostLifecycle(session.HOST_NAME).write_refusal(_refusal_output_dir(script_args), exc, host, preset)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status, error = problems_exit_status(problems)
    if error is not None:
        print(error, file=sys.stderr)
    return status


def _readable_preset(reference: str) -> Preset | None:
    """The preset a refusal's audit lists the strategies of; None when the preset was refused."""
    try:
        return load_preset(reference)
    except SdplugError:
        return None
