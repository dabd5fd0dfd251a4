"""``sdplug check kohya``: which of the flags given to an sd-scripts script it ignores, or fails
on, and what would do what the user meant -- without training or loading a model, with or
without a preset.

    sdplug check kohya [--sd-scripts DIR] -- flux_train_network.py --noise_offset 0.1 ...

The script's own parser reads the arguments (its ``setup_parser()``, imported from the tree,
which loads no model), then ``--config_file`` as kohya merges it (the command line wins); the
flags the user wrote are checked against ``flow_flags.SCRIPT_EFFECTS``. Exit status 1 when a
written flag is ignored or fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError, SdplugError
from sdplug.hosts.kohya.command_line import (
    config_file_path,
    given_on_command_line,
    resolve_script,
    script_arguments,
    script_command,
)
from sdplug.hosts.kohya.config_bridge import read_kohya_config
from sdplug.hosts.kohya.flow_flags import FLOW_SCRIPTS, effects_for
from sdplug.hosts.kohya.version import FLOW_ROUTES, SCRIPTS, check_flow_script, detect


@dataclasses.dataclass(frozen=True)
class Finding:
    """One flag the user wrote that the script ignores (or fails on)."""

    flag: str
    value: Any
    effect: str  # "ignored" | "fails"
    why: str
    instead: str


@dataclasses.dataclass(frozen=True)
class Notice:
    """A default of the script that does something the user may not expect (the flag unwritten)."""

    flag: str
    value: Any
    text: str


def findings(script: str, arguments: Mapping[str, Any], written: set[str]) -> list[Finding]:
    """The written flags ``script`` ignores or fails on, with these parsed ``arguments``."""
    found = []
    for name in sorted(written):
        for row in effects_for(script, name):
            if row.holds(script, arguments):
                instead = row.instead.replace("{preset}", _how_a_preset_reaches(script))
                found.append(Finding(name, arguments.get(name), row.effect, row.why, instead))
                break
    return found


def _how_a_preset_reaches(script: str) -> str:
    if script in SCRIPTS or script in FLOW_ROUTES:
        return f"sdplug kohya --preset P.toml -- {script}"
    return f"no kohya flag does it in this script; `sdplug kohya` runs {', '.join(FLOW_ROUTES)} of the flow scripts, not this one yet"


def notices(script: str, arguments: Mapping[str, Any], written: set[str]) -> list[Notice]:
    """Defaults worth knowing: FLUX's ``--model_prediction_type sigma_scaled`` compares the x0 the
    output implies (``x_t - sigma v``) with the velocity target ``noise - x0``, a loss whose
    minimiser is not the velocity its sampler steps with; kohya's docs recommend ``raw``."""
    if script == "flux_train_network.py" and "model_prediction_type" not in written:
        if arguments.get("model_prediction_type") == "sigma_scaled":
            return [
                Notice(
                    "model_prediction_type",
                    "sigma_scaled",
                    "the default: the loss compares x_t - sigma * output with the velocity target noise - x0, whose "
                    "minimiser is not the velocity the sampler steps with (SD3's form compares it with x0). kohya's "
                    "docs recommend --model_prediction_type raw.",
                )
            ]
    return []


def script_parser(path: Path, root: Path) -> argparse.ArgumentParser:
    """The script's own parser: the module imported from the tree (not run), its ``setup_parser()``.
    The tree's own modules leave ``sys.modules`` and ``sys.path`` afterwards (the packages they
    imported stay), so a caller that checks two trees (or then runs one) imports each afresh."""
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise SdplugError(f"{path}: cannot be imported as a Python module.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # the flow scripts import train_network by name, as kohya's do
        spec.loader.exec_module(module)
        return module.setup_parser()
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if Path(origin).is_relative_to(root) or name == path.stem:  # the tree's own, not torch's
                del sys.modules[name]


def parsed_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[dict[str, Any], set[str]]:
    """The arguments as the script reads them (defaults, then ``--config_file``'s keys, then the
    command line) and the names the user wrote (on the command line or in the file)."""
    namespace, _ = parser.parse_known_args(list(argv))
    arguments = vars(namespace)
    written = given_on_command_line(parser, arguments, argv)
    if arguments.get("config_file"):
        path = config_file_path(arguments["config_file"])
        try:
            config = read_kohya_config(path)
        except PresetError as exc:
            raise SdplugError(str(exc)) from None
        for key, value in config.items():
            if key not in written:  # kohya: the command line wins over the file
                arguments[key] = value
        written |= set(config) & set(arguments)
    return arguments, written


def resolve(script: str, sd_scripts: Path | None) -> tuple[Path, Path]:
    """The script's path and its tree, refusing a script or tree the table does not describe."""
    path = resolve_script(script, sd_scripts, (*SCRIPTS, *FLOW_SCRIPTS), "sdplug check kohya knows")
    root = Path(sd_scripts).resolve() if sd_scripts else path.parent
    check_flow_script(path.name, root, detect(root), "Nothing was checked.")
    return path, root


def report(script: str, found: list[Finding], notes: list[Notice], written: set[str]) -> str:
    lines = []
    if not found:
        lines.append(f"{script}: none of the {len(written)} flags given is ignored by this script that sdplug knows of.")
    else:
        ignored = sum(f.effect == "ignored" for f in found)
        failing = len(found) - ignored
        counts = [f"{ignored} ignored"] if ignored else []
        counts += [f"{failing} failing"] if failing else []
        lines.append(f"{script}: of the {len(written)} flags given, {' and '.join(counts)}:")
        for f in found:
            verb = "ignored" if f.effect == "ignored" else "fails on the first training step"
            lines.append(f"  --{f.flag} {_shown(f.value)}: {verb}: {f.why}.")
            lines.append(f"      what does what you meant: {f.instead}")
    for n in notes:
        lines.append(f"note: --{n.flag} {_shown(n.value)}: {n.text}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return "" if value is True else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = script_command("sdplug check kohya", __doc__.splitlines()[0], f"one of {', '.join((*SCRIPTS, *FLOW_SCRIPTS))}")
    args = parser.parse_args(argv)
    script_args = script_arguments(args)
    try:
        path, root = resolve(args.script, args.sd_scripts)
        arguments, written = parsed_arguments(script_parser(path, root), script_args)
    except SdplugError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    found = findings(path.name, arguments, written)
    print(report(path.name, found, notices(path.name, arguments, written), written))
    return 1 if found else 0
