"""What the user wrote: the script and its arguments (``sdplug kohya`` and ``sdplug check kohya``
share that command line), and the sd-scripts arguments given on it or in ``--config_file``.

A flag conflicts with a preset section when the user set it, whatever its value: ``--loss_type
l2`` is a choice of loss even though l2 is kohya's default, so comparing the parsed value with
the parser's default cannot tell. The command line is parsed again with kohya's own parser
into a namespace that already holds a marker for every argument: argparse fills in defaults
only for names the namespace lacks, so exactly the arguments given (abbreviations resolved as
kohya's parse resolved them) lose their marker. kohya's ``read_config_from_file`` merges every
table of the config file into the arguments, so each of its keys was written too.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError, SdplugError
from sdplug.hosts.kohya.version import SCRIPTS, KohyaVersionError
from sdplug.log import logger

_NOT_GIVEN = object()


class _NotThisCommandLine(Exception):
    """The arguments do not parse with this parser (they were not the script's command line)."""


def given_on_command_line(parser: argparse.ArgumentParser, names: Iterable[str], argv: Sequence[str]) -> set[str]:
    """The argument names (``dest``) among ``names`` that ``argv`` gives."""
    names = list(names)
    namespace = argparse.Namespace(**dict.fromkeys(names, _NOT_GIVEN))
    probe = copy.copy(parser)  # the same arguments; its errors raise instead of exiting the script

    def refuse(message: str) -> Any:
        raise _NotThisCommandLine(message)

    probe.error = refuse  # type: ignore[method-assign]
    try:
        parsed, _ = probe.parse_known_args(list(argv), namespace)
    except _NotThisCommandLine as exc:
        # kohya parsed the same sys.argv already, so this happens only where a program called the
        # adapter with arguments of its own (an embedding, a test)
        logger.warning(
            f"sd-scripts' command line could not be read again ({exc}): only flags whose value differs from "
            "kohya's default are checked against the preset"
        )
        return set()
    return {name for name in names if getattr(parsed, name, _NOT_GIVEN) is not _NOT_GIVEN}


def config_file_path(config_file: str) -> Path:
    """The file kohya reads for ``--config_file`` (it adds ``.toml`` when the name lacks it)."""
    return Path(config_file if config_file.endswith(".toml") else config_file + ".toml")


def written_in_config_file(config_file: str | None) -> set[str]:
    """The keys of kohya's ``--config_file`` (its tables merged into one namespace, as kohya reads it)."""
    if not config_file:
        return set()
    from sdplug.hosts.kohya.config_bridge import read_kohya_config

    try:
        return set(read_kohya_config(config_file_path(config_file)))
    except PresetError:  # kohya read the file before the adapter configures: it reports a broken one
        return set()


def written_flags(parser: argparse.ArgumentParser | None, args: argparse.Namespace, argv: Sequence[str]) -> set[str]:
    """Every argument the user wrote for this run: on the command line or in ``--config_file``."""
    names = vars(args)
    written = given_on_command_line(parser, names, argv) if parser is not None else set()
    return written | (written_in_config_file(getattr(args, "config_file", None)) & set(names))


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
        raise KohyaVersionError(f"{path.name}: {who} {', '.join(supported)}.")
    return path.resolve()


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
