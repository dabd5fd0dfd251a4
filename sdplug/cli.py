"""The ``sdplug`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sdplug.errors import SdplugError


def _cmd_list(args: argparse.Namespace) -> int:
    from sdplug.strategies import FAMILIES, registry

    families = [args.family] if args.family else list(FAMILIES)
    for family in families:
        entries = registry(family).entries()
        print(f"{family}:")
        width = max(len(e.name) for e in entries)
        for entry in entries:
            print(f"  {entry.name:<{width}}  {entry.description}  [{entry.origin}]")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from sdplug.presets import load_preset

    failed = 0
    for path in args.files:
        try:
            preset = load_preset(path)
        except SdplugError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
        else:
            print(f"ok: {path} ({preset.name})")
    return 1 if failed else 0


def _cmd_show(args: argparse.Namespace) -> int:
    from sdplug.presets import load_preset

    sys.stdout.write(load_preset(args.file).to_toml(with_defaults=not args.as_written))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sdplug.bench import pyramid_cost

    return pyramid_cost.main(repeats=args.repeats, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdplug", description="Diffusion-training tricks for every trainer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered strategies (name, description, providing package)")
    p.add_argument("family", nargs="?", help="one family: noise, timesteps, loss_weighting, caption, optimizer, attention")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("validate", help="validate preset files; exit 1 if any is invalid")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=_cmd_validate)

    p = sub.add_parser("show", help="print a preset fully resolved (after extends, with defaults) as TOML")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--as-written", action="store_true", help="omit parameters left at their defaults")
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser("bench", help="print pyramid-noise cost ratios against randn_like, measured side by side")
    p.add_argument("what", choices=["pyramid"])
    p.add_argument("--repeats", type=int, default=200, help="timed calls per method and shape (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable on shared machines)")
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SdplugError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
