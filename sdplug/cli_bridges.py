"""The command line's bridges between presets and the hosts' own configs: from-/to-kohya,
from-/to-everydream (the translations live with each host)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write(output: Path | None, text: str) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)


def from_kohya(args: argparse.Namespace) -> int:
    from sdplug.hosts.kohya.config_bridge import preset_from_kohya_file

    preset, bridged = preset_from_kohya_file(args.config, args.script)
    text = preset.to_toml(with_defaults=False)
    notes = "".join(f"# note: {note}\n" for note in bridged.notes)
    write(args.output, f"# translated by sdplug from {args.config}\n{notes}\n{text}")
    for note in bridged.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def to_kohya(args: argparse.Namespace) -> int:
    from tomli_w import dumps

    from sdplug.hosts.kohya.config_bridge import to_kohya
    from sdplug.preset import load_preset

    bridged = to_kohya(load_preset(args.preset), args.script)
    notes = "".join(f"# kohya cannot express: {note}\n" for note in bridged.notes)
    body = dumps(bridged.data) if bridged.data else ""
    write(args.output, f"# kohya config keys for preset {args.preset}\n{notes}\n{body}")
    for note in bridged.notes:
        print(f"cannot express: {note}", file=sys.stderr)
    return 0


def from_everydream(args: argparse.Namespace) -> int:
    from sdplug.hosts.everydream.bridge import from_everydream, read_train_json
    from sdplug.preset import parse_preset

    config = read_train_json(args.config)
    optimizer_file = args.config.parent / str(config.get("optimizer_config", "optimizer.json"))
    optimizer = read_train_json(optimizer_file) if optimizer_file.is_file() else None
    bridged = from_everydream(config, name=args.config.stem, optimizer=optimizer)
    text = parse_preset(bridged.data, path=str(args.config)).to_toml(with_defaults=False)
    notes = "".join(f"# note: {note}\n" for note in bridged.notes)
    write(args.output, f"# translated by sdplug from {args.config}\n{notes}\n{text}")
    for note in bridged.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def to_everydream(args: argparse.Namespace) -> int:
    import json

    from sdplug.hosts.everydream.bridge import to_everydream
    from sdplug.preset import load_preset

    bridged = to_everydream(load_preset(args.preset))
    write(args.output, json.dumps(bridged.data, indent=2) + "\n")
    for note in bridged.notes:
        print(f"cannot express: {note}", file=sys.stderr)
    return 0
