"""Step time, peak memory and optimizer state per trainable parameter, side by side.

Run: ``python -m sdplug.bench.trainer_memory [--steps N] [--output DIR]``. Each
configuration trains the embedded tiny model in its own process (so peak memory is its own)
and the numbers are read from that run's audit.json. On CPU, peak memory is the process's
maximum resident set; on CUDA it is also torch's peak allocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OPTIMIZERS = {
    "adamw": '[optimizer]\ntype = "adamw"\nlr = 1e-3\n',
    "adamw8bit": '[optimizer]\ntype = "adamw8bit"\nlr = 1e-3\n',
    "adamw8bit, min_8bit_size=256": '[optimizer]\ntype = "adamw8bit"\nlr = 1e-3\nmin_8bit_size = 256\n',
}
MEMORY_OPTIONS = '[attention]\ntype = "sliced"\nslice_size = "max"\n[memory]\ngradient_checkpointing = true\ncache_text_encoder_outputs = true\n'


def run(preset_text: str, workdir: Path, name: str, extra: list[str], steps: int) -> dict:
    preset = workdir / f"{name}.toml"
    preset.write_text(preset_text)
    out = workdir / name
    command = [
        sys.executable,
        "-m",
        "sdplug",
        "train",
        str(preset),
        "--steps",
        str(steps),
        "--no-samples",
        "--no-progress",
        "--output",
        str(out),
        *extra,
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((out / "audit.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print(f"embedded tiny model, batch 16, {args.steps} steps per run, one process per run\n")
        print(f"{'run':<52} {'s/step':>7} {'peak RSS MiB':>13} {'state B/param':>14} {'trainable':>10}")
        for rank in (4, 16, 32):
            for label, optimizer in OPTIMIZERS.items():
                report = run(optimizer, workdir, f"r{rank}-{len(label)}", ["--lora-rank", str(rank)], args.steps)
                _row(f"LoRA rank {rank:<2} {label}", report)
        for label, extra in (
            ("dreambooth, no memory options", ""),
            ("dreambooth, checkpointing+sliced+cached TE", MEMORY_OPTIONS),
        ):
            report = run(OPTIMIZERS["adamw"] + extra, workdir, f"db-{len(label)}", ["--mode", "dreambooth"], args.steps)
            _row(label, report)
    return 0


def _row(label: str, report: dict) -> None:
    run_info, optimizer = report["run"], report["optimizer"]
    print(
        f"{label:<52} {run_info['seconds_per_step']:>7.3f} {run_info['peak_memory']['process_max_rss_mib']:>13.0f} "
        f"{optimizer['state_bytes_per_trainable_parameter']:>14.3f} {optimizer['trainable_parameters']:>10}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
