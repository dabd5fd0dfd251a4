"""The ``sdplug`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sdplug import cli_bridges
from sdplug.errors import SdplugError, error_lines, printable


def _cmd_list(args: argparse.Namespace) -> int:
    from sdplug.params import declared_parameters
    from sdplug.strategies import FAMILIES, registry

    families = [args.family] if args.family else list(FAMILIES)
    for family in families:
        entries = registry(family).entries()
        print(f"{family}:")
        width = max(len(e.name) for e in entries)
        for entry in entries:
            # plugins' names and docstrings are third-party text: escaped like everything echoed
            print(printable(f"  {entry.name:<{width}}  {entry.description}  [{entry.origin}]"))
            if args.params:
                parameters = declared_parameters(entry.cls)
                if not parameters:
                    print("      (no parameters)")
                names = max((len(p.name) for p in parameters), default=0)
                defaults = max((len(p.default) for p in parameters), default=0)
                for p in parameters:
                    print(printable(f"      {p.name:<{names}}  default {p.default:<{defaults}}  {p.allowed}"))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from sdplug.errors import PresetError
    from sdplug.preset import load_preset

    failed = 0
    for path in args.files:
        try:
            preset = load_preset(path)
        except SdplugError as exc:
            failed += 1
            for error in exc.errors if isinstance(exc, PresetError) else (exc,):  # every problem, one paragraph each
                print(f"error: {printable(str(error))}", file=sys.stderr)
        else:
            print(f"ok: {printable(path)} ({printable(preset.name)})")
    return 1 if failed else 0


def _cmd_show(args: argparse.Namespace) -> int:
    from sdplug.errors import PresetErrors
    from sdplug.preset import load_preset

    try:
        preset = load_preset(args.file)
    except PresetErrors as exc:  # every problem, one paragraph each, as validate prints them
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(preset.to_toml(with_defaults=not args.as_written))
    return 0


_EVIDENCE_BENCHES = ("noise-range", "min-snr", "cfg", "cost", "flow-samplers", "flow-weightings", "flow-noise-range")
_BENCH_OPTIONS = {
    "pyramid": ("repeats",),
    "plan-overhead": ("preset", "steps", "rounds", "batch_size", "quick"),
    **{name: ("quick", "seeds", "output") for name in _EVIDENCE_BENCHES},
}


def _cmd_bench(args: argparse.Namespace) -> int:
    # the benches share one subparser: an option of another bench is refused, not ignored
    mine_names = _BENCH_OPTIONS[args.what]
    foreign = sorted(
        {n for names in _BENCH_OPTIONS.values() for n in names if n not in mine_names and getattr(args, n) not in (None, False)}
    )
    if foreign:
        mine = ", ".join("--" + n.replace("_", "-") for n in (*_BENCH_OPTIONS[args.what], "threads"))
        raise SdplugError(
            f"sdplug bench {args.what}: {', '.join('--' + n.replace('_', '-') for n in foreign)} belongs to another bench; "
            f"{args.what} takes {mine}."
        )
    if args.what in _EVIDENCE_BENCHES:
        from sdplug.bench import evidence

        return evidence.main(
            args.what, quick=args.quick, seeds=3 if args.seeds is None else args.seeds, output=args.output, threads=args.threads
        )
    if args.what == "plan-overhead":
        from sdplug.bench import plan_overhead

        return plan_overhead.main(
            args.preset or "tiny-default",
            steps=args.steps,
            rounds=args.rounds,
            batch_size=args.batch_size,
            threads=args.threads,
            quick=args.quick,
        )
    from sdplug.bench import pyramid_cost

    return pyramid_cost.main(repeats=200 if args.repeats is None else args.repeats, threads=args.threads)


def _cmd_train(args: argparse.Namespace) -> int:
    from sdplug.trainer.config import TrainConfig, check_before_loading
    from sdplug.trainer.requirements import check_trainer_requirements

    config = TrainConfig(
        preset=args.preset,
        model=args.model,
        data=args.data,
        mode=args.mode,
        output=args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        resolution=args.resolution,
        prediction_type=args.prediction_type,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        train_text_encoder=args.train_text_encoder,
        class_data=args.class_data,
        prior_loss_weight=args.prior_loss_weight,
        save_every=args.save_every,
        validation_data=args.validation_data,
        validation_split=args.validation_split,
        validate_every=args.validate_every,
        masked_loss=args.masked_loss,
        resume=args.resume,
        log_with=args.log_with,
        sample_prompts_file=args.sample_prompts,
        sample_steps=args.sample_steps,
        samples=not args.no_samples,
        progress=not args.no_progress,
    )
    check_before_loading(config)  # a mistake on the command line is reported before diffusers loads
    check_trainer_requirements()  # before the trainer's imports: a bad diffusers/peft pair fails in them
    from sdplug.trainer.loop import train

    train(config, checked=True)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from sdplug.trainer.requirements import check_trainer_requirements

    check_trainer_requirements()  # before the trainer's imports, as for train
    from sdplug.trainer.generate import SampleRequest, generate

    request = SampleRequest(
        prompts=args.prompt,
        output=args.output,
        model=args.model,
        lora=args.lora,
        preset=args.preset,
        guidance_scales=args.guidance,
        seeds=args.seed,
        steps=args.steps,
        noise=args.noise,
        device=args.device,
    )
    print(generate(request)[1])
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    from sdplug.hosts.diffusers_scripts import edits
    from sdplug.hosts.everydream import patching as everydream_patching
    from sdplug.hosts.kohya import patching

    module = {"kohya": patching, "everydream": everydream_patching, "diffusers-examples": edits}[args.host]
    action = module.apply if args.command == "patch" else module.revert
    try:
        done = action(args.directory)
    except OSError as exc:  # reading the tree to recognise it (writing reports its own errors, all or nothing)
        raise SdplugError(f"{exc.filename or args.directory}: {exc.strerror or exc}; nothing was changed.") from exc
    for line in done:
        print(line)
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = all(action.default is not v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text
        if shown and action.option_strings and "default:" not in text:
            value = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
            text += f" (default: {value})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdplug", description="Diffusion-training tricks for every trainer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered strategies (name, description, providing package)")
    p.add_argument("family", nargs="?", help="one family: noise, timesteps, loss, loss_weighting, caption, optimizer, attention")
    p.add_argument("--params", action="store_true", help="also each strategy's parameters, defaults and allowed values")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("validate", help="validate preset files; exit 1 if any is invalid")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=_cmd_validate)

    p = sub.add_parser("show", help="print a preset fully resolved (after extends, with defaults) as TOML")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--as-written", action="store_true", help="only what the file (and its parents) wrote, no defaults")
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser(
        "train",
        help="train LoRA / DreamBooth with a preset (the embedded tiny default when no --model/--data)",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("preset", metavar="PRESET", help="a preset file, or a shipped preset's name")
    p.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help="a local diffusers SD 1.x/2.x folder, or a folder sdplug saved; a single-file .safetensors/.ckpt loads "
        "only where diffusers finds its configs offline, else convert it once to a folder (default: embedded tiny model)",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="a folder of images with same-named .txt captions (default: embedded synthetic shapes)",
    )
    p.add_argument("--mode", choices=["lora", "dreambooth"], default="lora", help="what to train and save")
    p.add_argument(
        "--output", type=Path, default=Path("output"), metavar="DIR", help="folder for the weights, grids, plots and audit"
    )
    p.add_argument("--steps", type=int, default=400, metavar="N", help="optimizer steps")
    p.add_argument("--batch-size", type=int, metavar="N", default=16, help="images per step and process")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seeds every random stream (a run repeats exactly)")
    p.add_argument("--resolution", type=int, metavar="N", help="training resolution for --model (default: the model's own)")
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "sample", "velocity"],
        help="embedded model only (default: epsilon); velocity trains it as a rectified flow (SD3's process)",
    )
    p.add_argument("--lora-rank", type=int, metavar="N", default=8, help="LoRA rank (--mode lora)")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder (LoRA in lora mode)")
    p.add_argument("--class-data", type=Path, metavar="DIR", help="dreambooth prior-preservation images with captions")
    p.add_argument("--prior-loss-weight", type=float, default=1.0, metavar="W", help="weight of the prior-preservation loss")
    p.add_argument("--save-every", type=int, metavar="N", default=0, help="write a resumable checkpoint every N steps; 0: none")
    p.add_argument("--masked-loss", action="store_true", help="loss masks: <image>-masklabel.png files or the alpha channel")
    p.add_argument("--validation-data", type=Path, metavar="DIR", help="held-out images with captions for the validation loss")
    p.add_argument("--validation-split", type=float, default=0.0, metavar="SHARE", help="hold out this share of --data instead")
    p.add_argument(
        "--validate-every", type=int, default=0, metavar="N", help="validation loss every N steps (0: before and after)"
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="CHECKPOINT",
        help="a checkpoint folder to continue from, or 'latest': the newest complete checkpoint in --output",
    )
    p.add_argument("--log-with", choices=["tensorboard"], help="log through accelerate's trackers")
    p.add_argument(
        "--sample-prompts",
        type=Path,
        metavar="FILE",
        help="prompts for the sample grids, one a line (default: 4 captions of --data, else built-in shape prompts)",
    )
    p.add_argument("--sample-steps", type=int, metavar="N", default=25, help="DDIM steps per sample image")
    p.add_argument("--no-samples", action="store_true", help="skip the before/after sample grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("sample", help="draw a grid of images from a trained model or LoRA", formatter_class=_DefaultsFormatter)
    p.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help="a model folder (default: the base model the LoRA's metadata records: the embedded tiny model, "
        "or the model path it was trained on, while that exists)",
    )
    p.add_argument("--lora", type=Path, metavar="FILE", help="a LoRA .safetensors (kohya format, as sdplug train writes it)")
    p.add_argument("--prompt", nargs="+", required=True, metavar="TEXT", help="one or more prompts (one grid row each)")
    p.add_argument("--preset", help="whose noise family starts the sampling (default: the preset saved with the LoRA or model)")
    p.add_argument(
        "--guidance",
        nargs="+",
        type=float,
        default=[1.0, 3.0, 7.5],
        metavar="G",
        help="classifier-free guidance scales, each from -100 to 100. 1: the prompt alone; 0: the unconditional model "
        "(prompt ignored); above 1: pushed towards the prompt (3-12 usual); between 0 and 1: in between; below 0: "
        "pushed away from the prompt",
    )
    p.add_argument(
        "--seed", nargs="+", type=int, default=[0, 1], metavar="N", help="one grid column per seed and guidance (0 to 2**64 - 1)"
    )
    p.add_argument("--steps", type=int, default=25, metavar="N", help="DDIM steps, from 1 to the schedule's length (1000 for SD)")
    p.add_argument(
        "--noise", choices=["training", "gaussian"], default="training", help="start noise: the preset's family, or N(0, I)"
    )
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("-o", "--output", type=Path, default=Path("samples.png"), metavar="FILE", help="the grid image to write")
    p.set_defaults(run=_cmd_sample)

    p = sub.add_parser(
        "kohya", help="run an sd-scripts script with a preset: sdplug kohya --preset P [--sd-scripts DIR] -- SCRIPT ARGS"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    # listed for `sdplug --help` only: main() hands `sdplug kohya ...` to the launcher before
    # argparse, which cannot pass options after a subcommand through as REMAINDER

    p = sub.add_parser(
        "check",
        help="which of an sd-scripts script's flags it ignores, or fails on, and what would act: "
        "sdplug check kohya [--sd-scripts DIR] -- SCRIPT ARGS (exit 1 when one is)",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)  # listed for --help; main() hands it over, as for kohya

    p = sub.add_parser(
        "diffusers", help="run a diffusers example training script with a preset: sdplug diffusers --preset P -- SCRIPT ARGS"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("from-kohya", help="translate a kohya --config_file into a preset")
    p.add_argument("config", type=Path)
    p.add_argument(
        "--script",
        metavar="SCRIPT",
        help="the sd-scripts script the config is for, where it reads the config its own way (the flow scripts: "
        "flux_train_network.py, sd3_train_network.py, lumina_train_network.py, hunyuan_image_train_network.py, "
        "anima_train_network.py); default: the SD scripts' reading",
    )
    p.add_argument("-o", "--output", type=Path)
    p.set_defaults(run=cli_bridges.from_kohya)

    p = sub.add_parser("to-kohya", help="kohya config keys for a preset, and what kohya cannot express")
    p.add_argument("preset")
    p.add_argument("--script", metavar="SCRIPT", help="the sd-scripts script the keys are for (as for from-kohya)")
    p.add_argument("-o", "--output", type=Path)
    p.set_defaults(run=cli_bridges.to_kohya)

    p = sub.add_parser("from-everydream", help="translate an EveryDream2 train.json (and its optimizer.json) into a preset")
    p.add_argument("config", type=Path)
    p.add_argument("-o", "--output", type=Path)
    p.set_defaults(run=cli_bridges.from_everydream)

    p = sub.add_parser("to-everydream", help="EveryDream2 train.json keys for a preset, and what it cannot express")
    p.add_argument("preset")
    p.add_argument("-o", "--output", type=Path)
    p.set_defaults(run=cli_bridges.to_everydream)

    for name, text in (
        ("patch", "add --sdplug_preset to an sd-scripts tree, EveryDream2's train.py or diffusers' example scripts"),
        ("unpatch", "restore the files 'patch' changed, byte for byte"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("host", choices=["kohya", "everydream", "diffusers-examples"])
        p.add_argument("directory", type=Path)
        p.set_defaults(run=_cmd_patch)

    p = sub.add_parser(
        "bench",
        help="print cost ratios measured side by side (pyramid, plan-overhead), or train tiny models to test each "
        "article's claim and write report.md, plots and figures.json (noise-range, min-snr, cfg, cost, flow-samplers, flow-weightings, flow-noise-range)",
    )
    p.add_argument("what", choices=["pyramid", "plan-overhead", *_EVIDENCE_BENCHES])
    p.add_argument("--repeats", type=int, help="pyramid: timed calls per method and shape (median reported; default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable on shared machines)")
    p.add_argument("--preset", help="plan-overhead: the preset whose plan calls are timed (default tiny-default)")
    p.add_argument("--steps", type=int, help="plan-overhead: steps per side per round (default 5)")
    p.add_argument("--rounds", type=int, help="plan-overhead: timed rounds (default 15; medians over rounds)")
    p.add_argument("--batch-size", type=int, help="plan-overhead: batch size (default 8)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="plan-overhead: 3 rounds x 3 steps of batch 4; noise-range, min-snr, cfg, cost, flow-samplers, flow-weightings, flow-noise-range: a smoke run (about 1-2 minutes)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="noise-range, min-snr, cfg, cost, flow-samplers, flow-weightings, flow-noise-range: runs with seeds 0..N-1 (default 3)",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="noise-range, min-snr, cfg, cost, flow-samplers, flow-weightings, flow-noise-range: folder for report.md (default bench-NAME)",
    )
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sdplug.log import show_messages

    show_messages()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kohya"]:  # everything after belongs to the launcher and the script
        from sdplug.hosts.kohya.launcher import main as kohya_main

        return kohya_main(argv[1:])
    if argv[:2] == ["check", "kohya"]:  # likewise: the script's arguments follow
        from sdplug.hosts.kohya.flag_check import main as check_kohya

        return check_kohya(argv[2:])
    if argv[:1] == ["diffusers"]:  # likewise: diffusers' example scripts
        from sdplug.hosts.diffusers_scripts.launcher import main as diffusers_main

        return diffusers_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SdplugError as exc:
        print("\n".join(error_lines(exc)), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `sdplug list | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except KeyboardInterrupt:  # Ctrl-C: what was kept is already said; no traceback
        print(f"sdplug {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
